"""The one exception type users see: a message that names the file and the fix, no traceback; and the
operating system's errors that are the user's to fix too (a full disk)."""

import errno

# Errors of the disk the outputs go to, which a user fixes by freeing space or permissions and running again.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG, errno.EACCES}


class WanpairError(Exception):
    """A problem with the user's input that we can explain; the CLI prints it and exits non-zero."""


class DamagedFile(WanpairError):
    """A file whose bytes are not what its format says (truncated, corrupt header). `reason` is the bare
    fact; the message adds the advice for a file the user brought (download it again). Files wanpair
    makes itself (cache entries) are rebuilt instead, and their callers use `reason` alone."""

    def __init__(self, reason: str, advice: str = "Download it again."):
        super().__init__(f"{reason} {advice}")
        self.reason = reason


class StopRequested(Exception):
    """Raised after a clean stop (Ctrl-C, SIGTERM): state and a partial LoRA have been saved. Here, not beside
    the training state, so that the CLI catches it without importing torch: a Ctrl-C in a command's first
    second then ends it as a stop, not with a traceback from inside an import."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum
