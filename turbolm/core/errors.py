"""turbolm's exception family. Every error a user can cause is a :class:`TurboLMError`; the command
line prints its message as one line (``turbolm: error: ...``, exit status 2).

Library code speaks in its own parameter names; a :class:`ParameterError` keeps those names apart
from the sentence (``ParameterError("{} must be >= 1, got 0", "max_new_tokens")``), so that the
command line can say ``--max-new-tokens`` where a Python caller reads ``max_new_tokens``.
"""

from __future__ import annotations

from collections.abc import Callable


class TurboLMError(Exception):
    """A user-facing error (bad input, missing file, unsupported model).

    The message must say what is wrong and, where possible, what to do about it.
    """


class ParameterError(TurboLMError, ValueError):
    """A bad value for a parameter. ``template`` holds one ``{}`` per name in ``params``."""

    def __init__(self, template: str, *params: str):
        self.template = template
        self.params = params
        super().__init__(template.format(*params))

    def rename(self, name: Callable[[str], str]) -> str:
        """The message with every parameter name passed through ``name`` (e.g. to a flag)."""
        return self.template.format(*(name(p) for p in self.params))


def literal(text) -> str:
    """``text`` (a path, a list of settings) placed inside a :class:`ParameterError` template: its
    braces are text, not placeholders."""
    return str(text).replace("{", "{{").replace("}", "}}")


class DataError(TurboLMError):
    """A file or dataset that is missing, unreadable, damaged or does not match what it is used with."""


class ModelError(TurboLMError):
    """A model that cannot be loaded or is not supported for what was asked."""
