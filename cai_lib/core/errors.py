"""The one exception type for mistakes a user can fix.

The CLI prints a `CaiError` as a single line and exits with status 2; anything else is a bug
and keeps its traceback.
"""


class CaiError(Exception):
    """A user-caused error. The message names the file, row or field that was wrong."""
