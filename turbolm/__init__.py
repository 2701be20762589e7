"""turbolm: faster inference for Hugging Face causal language models.

The public names below are imported on first use (PEP 562), so that ``import turbolm`` - and the
``turbolm`` command's start - does not pay for torch and transformers before it needs them (and a
Ctrl-C during that time reaches the command line's handler, not an import traceback).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Conversation": ".core.chat",
    "encode_chat": ".core.chat",
    "encode_prompt": ".core.chat",
    "run_turns": ".core.chat",
    "TurboLMError": ".core.errors",
    "GenerationResult": ".core.generation",
    "SamplingParams": ".core.generation",
    "generate": ".core.generation",
    "load_target": ".core.models",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'turbolm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *__all__])
