"""The one exception type a user can cause. The CLI prints it as a single `error: …` line."""


class SvdiffError(Exception):
    """A problem with the user's input (a file, a flag, a folder), explained in one line."""


class Interrupted(SvdiffError):
    """A run stopped by a signal after saving its work; the CLI exits 128 + the signal's number, as shells expect."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
