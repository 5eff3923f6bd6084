"""``python -m megalm.checkpoint inspect|export|import`` (see :mod:`megalm.checkpoint.cli`)."""

import sys

from megalm.checkpoint.cli import main

sys.exit(main())
