"""turbolm: faster inference for Hugging Face causal language models."""

__version__ = "0.1.0"

from .core.chat import Conversation, encode_chat, encode_prompt, run_turns  # noqa: E402
from .core.errors import TurboLMError  # noqa: E402
from .core.generation import GenerationResult, SamplingParams, generate  # noqa: E402
from .core.models import load_target  # noqa: E402

__all__ = [
    "Conversation",
    "GenerationResult",
    "SamplingParams",
    "TurboLMError",
    "encode_chat",
    "encode_prompt",
    "generate",
    "load_target",
    "run_turns",
]
