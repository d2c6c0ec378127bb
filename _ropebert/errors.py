"""The error type the `ropebert` command reports as one line: a problem with what the user gave it.

Everything else that escapes a subcommand is a bug and keeps its traceback. `InputError` is also a
ValueError, so library callers that catch ValueError keep working.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, arguments, files or environment; the message says what and where."""


class InputError(UserError, ValueError):
    """Bad input: a malformed record (FILE:LINE), an invalid argument or setting, a mismatch on resume."""
