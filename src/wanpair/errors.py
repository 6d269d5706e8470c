"""The one exception type users see: a message that names the file and the fix, no traceback."""


class WanpairError(Exception):
    """A problem with the user's input that we can explain; the CLI prints it and exits non-zero."""
