"""Put first on ``PYTHONPATH`` of a launched run: ``tensorboard`` then looks uninstalled
(``importlib.util.find_spec`` returns None, ``import`` fails), for the error-line test in
tests/test_train.py."""

import sys

sys.modules["tensorboard"] = None
