"""The one exception type for bad input; the CLI turns it into a one-line message and exit 2."""
from __future__ import annotations


class RenormError(ValueError):
    """Bad input from the user: the message names the problem and the fix."""


def one_line(error: BaseException) -> str:
    """An exception's message on one line (whitespace collapsed), or its type's name when it has none."""
    return " ".join(str(error).split()) or type(error).__name__
