"""The one base class of errors a user can fix: the CLI prints them as one line, without a traceback."""


class CodexError(ValueError):
    """Bad input, a bad config value, a corrupted file: what went wrong and what is allowed."""
