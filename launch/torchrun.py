"""``torchrun`` that exits with the ranks' own exit code when they all agree.

    python launch/torchrun.py --nproc_per_node 2 launch/pretrain.py --config configs/tiny.yaml

torchrun itself exits 1 whenever a worker exits non-zero, so a preempted job (every
rank exits ``preempt.exit_code``, 75: saved, run again) and a bad config (every rank
exits 2) look like a crash to a batch script. This wrapper runs torchrun unchanged
(same arguments, same agent) and, when every worker that failed by itself exited with
the same code, exits with that code. Workers that torchrun's agent stopped with SIGTERM
after the first failure (``exitcode: -15``) do not count; anything else (mixed codes,
another signal) stays torchrun's 1. With plain ``torchrun``, read the per-rank codes in
its "Failures:" table (``exitcode: 75``).
"""

from __future__ import annotations

import signal
import sys


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(argv)
    except ChildFailedError as e:
        codes = {f.exitcode for f in e.failures.values() if f.exitcode != -signal.SIGTERM}
        if len(codes) != 1 or min(codes) <= 0:
            raise
        code = codes.pop()
        print(f"torchrun: every failed rank exited {code}; exiting {code}", file=sys.stderr, flush=True)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
