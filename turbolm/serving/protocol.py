"""The OpenAI API's request and response shapes: parsing a request body into what to generate, and
the completion objects, stream chunks and errors sent back.

A request is checked whole before it is queued, so that every mistake answers 400 with the
parameter named (the OpenAI error object's ``param``); parameters this server does not implement
(``n`` > 1, ``logprobs``, penalties, tools, ...) are refused by name rather than ignored.
Fields the API has and generation does not need (``user``, ``metadata``, ...) are ignored, as vLLM does.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass

from ..core.chat import encode_chat
from ..core.errors import ParameterError, TurboLMError
from ..core.generation import SamplingParams, check_prompt_length, context_length


class RequestError(TurboLMError):
    """A request the API refuses: ``status`` (400 by default), the ``param`` at fault, an error ``code``."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


@dataclass(frozen=True)
class Generation:
    """What a request asks for, checked: prompt token ids, the new-token budget (fits the context)
    and how to sample, stop and stream."""

    kind: str  # "chat" or "completion"
    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


#: parameters refused unless they have the value that means "off": (name, is_off, why)
_UNSUPPORTED = [
    ("n", lambda v: v in (None, 1), "n must be 1: this server returns one choice per request"),
    ("best_of", lambda v: v in (None, 1), "best_of must be 1: this server returns one choice per request"),
    ("logprobs", lambda v: v in (None, False), "logprobs are not supported by this server"),
    ("top_logprobs", lambda v: v in (None, 0), "logprobs are not supported by this server"),
    ("echo", lambda v: v in (None, False), "echo is not supported by this server"),
    ("suffix", lambda v: v in (None, ""), "suffix (insertion) is not supported by this server"),
    ("presence_penalty", lambda v: v in (None, 0), "presence_penalty is not supported by this server"),
    ("frequency_penalty", lambda v: v in (None, 0), "frequency_penalty is not supported by this server"),
    ("logit_bias", lambda v: not v, "logit_bias is not supported by this server"),
    ("tools", lambda v: not v, "tools (function calling) are not supported by this server"),
    ("functions", lambda v: not v, "functions (function calling) are not supported by this server"),
    ("response_format", lambda v: v in (None, {"type": "text"}), "response_format other than text is not supported"),
]


def parse_body(raw: bytes) -> dict:
    """The request body as a JSON object, or a :class:`RequestError` saying what is wrong with it."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


def parse_generation(body: dict, kind: str, model, tokenizer, model_name: str) -> Generation:
    """Check a /v1/chat/completions (``kind`` chat) or /v1/completions (completion) body."""
    name = body.get("model")
    if name is not None and name != model_name:
        raise RequestError(f"the model {name!r} does not exist; this server serves {model_name!r}", "model",
                           "model_not_found")
    for param, is_off, why in _UNSUPPORTED:
        if not is_off(body.get(param)):
            raise RequestError(why, param, "unsupported_parameter")
    stream = _typed(body, "stream", bool, False)
    options = _typed(body, "stream_options", dict, None)
    if options is not None and not stream:
        raise RequestError("stream_options is only allowed with stream: true", "stream_options")
    include_usage = _typed(options or {}, "include_usage", bool, False, "stream_options.include_usage")

    if kind == "chat":
        prompt = _chat_prompt(body, tokenizer)
        max_tokens = _typed(body, "max_completion_tokens", int, None)
        if max_tokens is None:
            max_tokens = _typed(body, "max_tokens", int, None)
        budget_param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    else:
        prompt = _completion_prompt(body, tokenizer)
        max_tokens = _typed(body, "max_tokens", int, None)
        budget_param = "max_tokens"
    if max_tokens is not None and max_tokens < 1:
        raise RequestError(f"{budget_param} must be >= 1, got {max_tokens}", budget_param)
    ctx = context_length(model, tokenizer)
    if max_tokens is None:  # as OpenAI: as many as fit in the context
        max_tokens = max(1, ctx - len(prompt)) if ctx is not None else 4096
    try:
        budget = check_prompt_length(len(prompt), max_tokens, model, tokenizer)
    except TurboLMError as e:
        raise RequestError(str(e), "messages" if kind == "chat" else "prompt", "context_length_exceeded") from None

    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise RequestError(f"stop must be a string or a list of strings, got {json.dumps(stop)}", "stop")
    return Generation(kind, prompt, budget, _sampling(body), tuple(s for s in stop or () if s), stream, include_usage)


def _sampling(body: dict) -> SamplingParams:
    top_k = _typed(body, "top_k", int, 0)
    try:
        return SamplingParams(
            temperature=_typed(body, "temperature", float, 1.0),  # OpenAI's default; 0 is greedy
            top_p=_typed(body, "top_p", float, 1.0),
            top_k=0 if top_k == -1 else top_k,  # -1: off, as vLLM spells it
            seed=_typed(body, "seed", int, None),
        )
    except ParameterError as e:
        raise RequestError(str(e), e.params[0] if e.params else None) from None


def _typed(body: dict, name: str, kind: type, default, label: str | None = None):
    """``body[name]`` if it is a ``kind`` (a number for float, never a bool for int / float), else
    ``default`` when absent or null; a RequestError for any other value."""
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if kind is float and ok and not math.isfinite(value):
        ok = False
    if not ok:
        want = {bool: "a boolean", int: "an integer", float: "a number", dict: "an object", str: "a string"}[kind]
        raise RequestError(f"{label or name} must be {want}, got {json.dumps(value)}", label or name, "invalid_type")
    return value


def _chat_prompt(body: dict, tokenizer) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content} objects", "messages")
    turns = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(f"{where} must be an object with a string role", where)
        turns.append({"role": m["role"], "content": _message_text(m.get("content"), where)})
    try:
        return encode_chat(tokenizer, turns)
    except Exception as e:  # a chat template may refuse an order of roles (jinja raises its own errors)
        raise RequestError(f"the chat template refused the messages: {e}", "messages") from None


def _message_text(content, where: str) -> str:
    """A message's text: a string, or a list of text parts (the API's content parts)."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise RequestError(f"{where}.content: only text parts are supported, got {kind!r}", where)
            texts.append(part["text"])
        return "".join(texts)
    raise RequestError(f"{where}.content must be a string or a list of text parts", where)


def _completion_prompt(body: dict, tokenizer) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # one prompt in a list
    if isinstance(prompt, str):
        if not prompt:
            raise RequestError("prompt is empty", "prompt")
        return tokenizer(prompt)["input_ids"]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        vocab = len(tokenizer)
        if not all(0 <= t < vocab for t in prompt):
            raise RequestError(f"prompt holds token ids outside the vocabulary (0 .. {vocab - 1})", "prompt")
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise RequestError("one prompt per request: this server does not take a list of prompts", "prompt")
    raise RequestError("prompt must be a non-empty string or a list of token ids", "prompt")


# -- responses ------------------------------------------------------------------------------


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(kind: str, ident: str, model_name: str, text: str, finish_reason: str, prompt_tokens: int,
               completion_tokens: int) -> dict:
    """The whole answer: a ``chat.completion`` or a ``text_completion``."""
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return {"id": ident, "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model_name, "choices": [choice],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(kind: str, ident: str, model_name: str, created: int, *, text: str | None = None, role: bool = False,
          finish_reason: str | None = None, include_usage: bool = False) -> dict:
    """One streamed piece: a ``chat.completion.chunk`` (delta) or a ``text_completion``; with
    ``include_usage`` its ``usage`` is null, as the API sends before the final usage chunk."""
    if kind == "chat":
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    out = {"id": ident, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
           "created": created, "model": model_name, "choices": [choice]}
    if include_usage:
        out["usage"] = None
    return out


def usage_chunk(kind: str, ident: str, model_name: str, created: int, prompt_tokens: int,
                completion_tokens: int) -> dict:
    """The last chunk of a stream with ``stream_options.include_usage``: no choices, the usage."""
    return {"id": ident, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": created, "model": model_name, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}
