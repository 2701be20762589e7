"""Prompt formatting through the tokenizer's chat template, single- and multi-turn."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .errors import ParameterError, TurboLMError


def encode_chat(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of ``messages`` (``[{"role", "content"}, ...]``) under the tokenizer's chat template.

    A tokenizer without a chat template (a base model) gets the plain concatenation of
    the message contents, encoded with the tokenizer's own special tokens.
    """
    if not messages:
        raise TurboLMError("empty conversation: give at least one message")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise TurboLMError(f"malformed chat message {m!r}: expected {{'role': ..., 'content': ...}}")
    if getattr(tokenizer, "chat_template", None):
        # Render to text, then encode without adding special tokens: the template already
        # places BOS and the role markers (this is what apply_chat_template(tokenize=True) does).
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    text = "\n\n".join(m["content"] for m in messages)
    return tokenizer(text)["input_ids"]


def encode_prompt(tokenizer, prompt: str, system: str | None = None, chat: bool = True) -> list[int]:
    """Token ids for one user prompt: chat-formatted by default, raw text with ``chat=False``."""
    if not prompt or not prompt.strip():
        raise ParameterError("empty prompt: give some text with {}", "prompt")
    if not chat:
        return tokenizer(prompt)["input_ids"]
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return encode_chat(tokenizer, messages)


@dataclass
class Conversation:
    """A multi-turn chat: user turns are asked one at a time, each after the model's previous answer.

    This is how MT-bench questions (two turns) are run: the second turn's prompt contains
    the model's own first answer.
    """

    system: str | None = None
    messages: list[dict] = field(default_factory=list)

    def __post_init__(self):
        if self.system:
            self.messages.insert(0, {"role": "system", "content": self.system})

    def ask(self, tokenizer, user_text: str) -> list[int]:
        """Append a user turn and return the prompt ids for the assistant's answer."""
        if not user_text or not user_text.strip():
            raise TurboLMError("empty user turn")
        self.messages.append({"role": "user", "content": user_text})
        return encode_chat(tokenizer, self.messages)

    def answer(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})


def run_turns(tokenizer, turns: Sequence[str], respond: Callable[[list[int]], str], system: str | None = None) -> list[str]:
    """Ask ``turns`` in order; ``respond(prompt_ids) -> answer_text`` generates each answer."""
    conv = Conversation(system=system)
    answers = []
    for turn in turns:
        answer = respond(conv.ask(tokenizer, turn))
        conv.answer(answer)
        answers.append(answer)
    return answers
