"""Generate text from a checkpoint with a KV cache, streaming to stdout.

    python launch/generate.py --checkpoint RUN/checkpoints/latest --prompt "def " --max-new-tokens 64

Runs under the trainer's launchers and layouts (``deepspeed``, ``torchrun``, ``srun``,
``mpirun``, plain ``python``; ``parallel.tp=2`` ...). The logic lives in
``megalm/train/generate_text.py``. Bad input ends with one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from megalm.cli import run  # noqa: E402

if __name__ == "__main__":
    run("megalm.train.generate_text")
