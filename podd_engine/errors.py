"""The one kind of error a user can fix, and how errors are said in one line.

Every error caused by input (a setting, a spec field, a data set, an artifact, a store) is a
`UserError`: its message is one line that names what is wrong and the fix, and `field` names
the setting at fault when one is, so a sweep spec can point at its own field path without
reading the message. The CLI turns a UserError into `error: ...` and exit code 2.
"""

from __future__ import annotations


class UserError(ValueError):
    """Input that cannot work; the message says what is wrong and how to fix it."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field  # the setting or spec field at fault, when known


class SettingError(UserError):
    """A setting of a trial (TrialConfig) that cannot work."""


class GeometryError(SettingError):
    """An impossible poster geometry; the message names the setting and how to fix it."""


def first_line(error: BaseException | str) -> str:
    """The first non-empty line of an error's message (the type's name when it has none)."""
    text = error if isinstance(error, str) else str(error)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if lines:
        return lines[0]
    return type(error).__name__ if isinstance(error, BaseException) else "unknown error"
