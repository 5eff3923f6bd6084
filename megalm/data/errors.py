"""The data layer's error types; the trainer prints each as one ``error:`` line."""

from __future__ import annotations


class DataError(ValueError):
    """Missing, corrupt or unusable training data; the message names the file and the fix."""


class FetchError(DataError):
    """A remote file that could not be fetched; ``missing`` when the server says it does not exist."""

    def __init__(self, message: str, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing

    def __reduce__(self):  # keep ``missing`` when a DataLoader worker sends it back
        return type(self), (self.args[0], self.missing)


class CorruptFile(DataError):
    """A fetched file whose sha256 differs from the manifest's, twice in a row."""
