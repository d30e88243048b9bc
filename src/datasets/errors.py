"""Errors raised by the data-set code: each names the file or setting, what was expected and
what was found."""

from __future__ import annotations


class DataError(ValueError):
    """A source file that cannot be used: missing, unreadable, truncated, inconsistent.

    Attributes: ``path`` (the file at fault), ``expected``, ``found``.
    """

    def __init__(self, path: str, expected: str, found: str) -> None:
        self.path = str(path)
        self.expected = expected
        self.found = found
        super().__init__(f"{self.path}: expected {expected}, found {found}")


class DatasetNotFoundError(FileNotFoundError):
    """The data set's root folder is missing or holds no case in the expected layout."""


class ConfigError(ValueError):
    """A setting with a value the code cannot use (names the setting, expected, found)."""

    def __init__(self, setting: str, expected: str, found: object) -> None:
        self.setting = setting
        super().__init__(f"setting {setting}: expected {expected}, found {found!r}")
