"""The one exception type users see: its message is printed as a single line by the CLI."""


class TurboLMError(Exception):
    """A user-facing error (bad input, missing file, unsupported model).

    The message must say what is wrong and, where possible, what to do about it.
    """
