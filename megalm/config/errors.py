"""The one error type of configuration problems (printed as a single ``error:`` line)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config file, override or combination of values that cannot be used as given."""


def require(ok: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``ok``."""
    if not ok:
        raise ConfigError(message)
