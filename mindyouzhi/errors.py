"""User-facing errors.

A ``UserError`` is raised for anything the user can fix (a bad flag, a missing or malformed file,
an illegal fold).  The CLI prints its message as one line and exits with code 2; library callers
get an ordinary exception they can catch.  Programming errors are never wrapped in it.
"""


class UserError(Exception):
    """Bad input from the user: one-line message naming the file/flag/tensor and what was expected."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
