"""The one exception type a user can cause. The CLI prints it as a single `error: …` line."""


class SvdiffError(Exception):
    """A problem with the user's input (a file, a flag, a folder), explained in one line."""
