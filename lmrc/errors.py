"""The one error type for problems a user can fix (bad files, bad options)."""


class LmrcError(Exception):
    """A user-facing problem; the CLI prints it as one line `lmrc: error: ...`, without a traceback."""
