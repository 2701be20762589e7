"""Vanilla decoding with a KV cache: the baseline every faster method is compared with.

The pieces here are shared with the speculative engine: ``SamplingParams`` and
``logits_to_probs`` define the target distribution (temperature, then top-k, then
top-p, as transformers does), and ``OutputTracker`` decides where the output ends
(EOS, stop strings, max_new_tokens) and streams text, whatever produced the tokens.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from .errors import TurboLMError


@dataclass(frozen=True)
class SamplingParams:
    """``temperature == 0`` means greedy; ``top_k == 0`` and ``top_p == 1`` disable those filters."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise TurboLMError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise TurboLMError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise TurboLMError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, device) -> torch.Generator | None:
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


def logits_to_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The sampling distribution over the last dimension: softmax(logits / T) after top-k and top-p.

    Works on any leading shape; computed in float32. Not for greedy (T = 0).
    """
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cum <= 1 - params.top_p
        remove_sorted[..., -1] = False  # always keep the most likely token
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits.softmax(dim=-1)


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """Pick the next token from one row of logits: argmax if greedy, else a sample."""
    if params.greedy:
        return int(torch.argmax(logits))
    probs = logits_to_probs(logits, params)
    return int(torch.multinomial(probs, 1, generator=generator))


@functools.lru_cache(maxsize=None)
def _cache_kwarg(model_cls) -> str:
    # transformers renamed `past_key_values` to `cache` after 5.17; accept both.
    return "cache" if "cache" in inspect.signature(model_cls.forward).parameters else "past_key_values"


def new_cache(model):
    """An empty KV cache laid out for ``model`` (sliding-window layers included)."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def forward(model, input_ids: torch.Tensor, cache, **kwargs):
    """One target forward that reads and extends ``cache`` in place (any transformers >= 5.17)."""
    return model(input_ids=input_ids, use_cache=True, **{_cache_kwarg(type(model)): cache}, **kwargs)


def eos_token_ids(model, tokenizer) -> set[int]:
    """EOS ids from the model's generation config (all of them), else the tokenizer's EOS."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if ids is None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return set()
    return {int(i) for i in ([ids] if isinstance(ids, int) else ids)}


def context_length(model, tokenizer=None) -> int | None:
    """The longest sequence the model supports, or None if the config does not say."""
    n = getattr(model.config, "max_position_embeddings", None)
    tok_max = getattr(tokenizer, "model_max_length", None) if tokenizer is not None else None
    if tok_max is not None and tok_max < 10**7 and (n is None or tok_max < n):
        n = tok_max
    return n


def check_prompt_length(n_prompt: int, max_new_tokens: int, model, tokenizer=None) -> int:
    """Validate a prompt length; return the number of new tokens that fits in the context."""
    if n_prompt == 0:
        raise TurboLMError("empty prompt: it encodes to zero tokens")
    if max_new_tokens < 1:
        raise TurboLMError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    ctx = context_length(model, tokenizer)
    if ctx is None:
        return max_new_tokens
    if n_prompt >= ctx:
        raise TurboLMError(f"the prompt has {n_prompt} tokens but the model's context is {ctx} tokens; shorten it")
    return min(max_new_tokens, ctx - n_prompt)


class OutputTracker:
    """Accumulates generated tokens and decides where the output ends.

    ``push`` takes one or more tokens (a speculative step may accept several at once)
    and keeps them one at a time until EOS (kept in ``token_ids``, as transformers
    does), a stop string (the visible ``text`` ends before it), or ``max_new_tokens``.
    Nothing past the end is ever kept or streamed. ``on_text`` receives text deltas;
    text that might be the start of a stop string is held back until it is not.
    """

    def __init__(
        self,
        tokenizer,
        eos_ids: Iterable[int] = (),
        max_new_tokens: int = 256,
        stop: Sequence[str] = (),
        on_text: Callable[[str], None] | None = None,
    ):
        self.tokenizer = tokenizer
        self.eos_ids = set(eos_ids)
        self.max_new_tokens = max_new_tokens
        self.stop = [s for s in stop if s]
        self.on_text = on_text
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self._emitted = 0
        self._needs_text = bool(self.stop) or on_text is not None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def push(self, tokens: Iterable[int]) -> bool:
        """Add tokens in order; return True once the output has ended."""
        for tok in tokens:
            if self.done:
                break
            self.token_ids.append(int(tok))
            if self._needs_text:
                self._update_text()
            if self.done:
                break
            if int(tok) in self.eos_ids:
                self.finish_reason = "eos"
            elif len(self.token_ids) >= self.max_new_tokens:
                self.finish_reason = "length"
        if self.done:
            self.finish()
        return self.done

    def _update_text(self) -> None:
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        for s in self.stop:
            # Only the newly decoded tail can contain a stop string that was not there before.
            i = text.find(s, max(0, len(self.text) - len(s)))
            if i >= 0:
                self.text = text[:i]
                self.finish_reason = "stop"
                return
        self.text = text
        if self.on_text is not None:
            safe = len(text)
            if text.endswith("\ufffd"):  # an incomplete multi-byte character
                safe = len(text.rstrip("\ufffd"))
            # Hold back the longest tail that could still grow into a stop string.
            held = max((k for s in self.stop for k in range(1, min(len(s), safe + 1)) if text[:safe].endswith(s[:k])), default=0)
            self._emit(safe - held)

    def _emit(self, upto: int) -> None:
        if upto > self._emitted:
            self.on_text(self.text[self._emitted : upto])
            self._emitted = upto

    def finish(self) -> None:
        """Flush held-back text; fills ``text`` if nothing needed it so far."""
        if not self._needs_text:
            self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
            self._needs_text = True
        if self.on_text is not None:
            self._emit(len(self.text))


@dataclass
class GenerationResult:
    """What one generation call produced, with the statistics every method reports."""

    token_ids: list[int]
    text: str
    prompt_tokens: int
    finish_reason: str
    target_forwards: int
    seconds: float
    prefill_seconds: float
    stats: dict = field(default_factory=dict)

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tau(self) -> float:
        """New tokens per target forward after the prefill (the prefill yields the first token).

        1.0 for vanilla decoding; a speculative method's mean accepted length incl. the bonus token.
        """
        if self.target_forwards <= 1 or self.new_tokens <= 1:
            return 1.0
        return (self.new_tokens - 1) / (self.target_forwards - 1)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(new_tokens=self.new_tokens, tau=self.tau, tokens_per_second=self.tokens_per_second)
        return d


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    input_ids: Sequence[int],
    max_new_tokens: int = 256,
    sampling: SamplingParams | None = None,
    stop: Sequence[str] = (),
    on_text: Callable[[str], None] | None = None,
) -> GenerationResult:
    """Decode token by token with a KV cache (batch size 1).

    Greedy output equals ``model.generate(..., do_sample=False)`` token for token.
    """
    sampling = sampling or SamplingParams()
    input_ids = list(input_ids)
    budget = check_prompt_length(len(input_ids), max_new_tokens, model, tokenizer)
    tracker = OutputTracker(tokenizer, eos_token_ids(model, tokenizer), budget, stop, on_text)
    device = model.device
    generator = sampling.generator(device)

    start = time.perf_counter()
    cache = new_cache(model)
    out = forward(model, torch.tensor([input_ids], device=device), cache, logits_to_keep=1)
    forwards = 1
    prefill_seconds = time.perf_counter() - start
    while True:
        tok = next_token(out.logits[0, -1], sampling, generator)
        if tracker.push([tok]):
            break
        out = forward(model, torch.tensor([[tok]], device=device), cache)
        forwards += 1
    seconds = time.perf_counter() - start
    return GenerationResult(
        token_ids=tracker.token_ids,
        text=tracker.text,
        prompt_tokens=len(input_ids),
        finish_reason=tracker.finish_reason,
        target_forwards=forwards,
        seconds=seconds,
        prefill_seconds=prefill_seconds,
    )


def synchronize(device) -> None:
    """Wait for the device's queued work (CUDA) so a wall-clock reading covers it; no-op on CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class FeatureCapture:
    """Captures the target's last hidden state as the lm_head consumes it (the output of the
    decoder's final norm) during forwards run inside ``with``. ``features`` holds the latest
    one, shape (batch, seq, hidden). Works for any decoder with ``get_decoder().norm``."""

    def __init__(self, model):
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
        norm = getattr(decoder, "norm", None)
        if norm is None:
            raise TurboLMError(f"cannot find the final norm of {type(model).__name__} to read its features")
        self.norm = norm
        self.features: torch.Tensor | None = None
        self._handle = None

    def _hook(self, module, args, output):
        self.features = output

    def __enter__(self):
        self._handle = self.norm.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        self._handle = None
