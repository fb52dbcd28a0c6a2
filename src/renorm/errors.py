"""The one exception type for bad input; the CLI turns it into a one-line message and exit 2."""
from __future__ import annotations


class RenormError(ValueError):
    """Bad input from the user: the message names the problem and the fix."""
