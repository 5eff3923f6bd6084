"""The entry of the checkpoint scripts (``launch/evaluate.py``, ``launch/generate.py``).

:func:`run` calls a module's ``main()`` and turns bad input (a config, data or missing
file problem) into one ``error:`` line on stderr and exit code 2, as ``launch/pretrain.py``
does for training.
"""

from __future__ import annotations

import importlib
import sys


def run(module: str) -> None:
    """Exit with ``module.main()``'s code; bad input is one ``error:`` line and exit 2."""
    from megalm.config import ConfigError
    from megalm.data import DataError

    try:
        sys.exit(importlib.import_module(module).main())
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
