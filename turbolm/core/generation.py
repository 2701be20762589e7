"""Vanilla decoding with a KV cache: the baseline every faster method is compared with.

The pieces here are shared with the speculative engine: ``SamplingParams`` and
``logits_to_probs`` define the target distribution (temperature, then top-k, then
top-p, as transformers does), and ``OutputTracker`` decides where the output ends
(EOS, stop strings, max_new_tokens) and streams text, whatever produced the tokens.
"""

from __future__ import annotations

import functools
import inspect
import math
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch

from .errors import ParameterError, TurboLMError


@dataclass(frozen=True)
class SamplingParams:
    """``temperature == 0`` means greedy; ``top_k == 0`` and ``top_p == 1`` disable those filters."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ParameterError(f"{{}} must be a number >= 0, got {self.temperature}", "temperature")
        if not 0 < self.top_p <= 1:
            raise ParameterError(f"{{}} must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k < 0:
            raise ParameterError(f"{{}} must be >= 0, got {self.top_k}", "top_k")

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


@functools.cache
def cache_kwarg(model_cls) -> str:
    # transformers renamed `past_key_values` to `cache` after 5.17; accept both.
    return "cache" if "cache" in inspect.signature(model_cls.forward).parameters else "past_key_values"


def new_cache(model):
    """An empty KV cache laid out for ``model`` (sliding-window layers included), appending in place."""
    from .kvcache import growing_cache

    return growing_cache(model.config)


def forward(model, input_ids: torch.Tensor, cache, **kwargs):
    """One target forward that reads and extends ``cache`` in place (any transformers >= 5.17)."""
    return model(input_ids=input_ids, use_cache=True, **{cache_kwarg(type(model)): cache}, **kwargs)


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
        raise ParameterError(f"{{}} must be >= 1, got {max_new_tokens}", "max_new_tokens")
    ctx = context_length(model, tokenizer)
    if ctx is None:
        return max_new_tokens
    if n_prompt >= ctx:
        raise TurboLMError(f"the prompt has {n_prompt} tokens but the model's context is {ctx} tokens; shorten it")
    return min(max_new_tokens, ctx - n_prompt)


_CONTEXT_TOKENS = 4  # decoded tokens re-decoded as left context with each new token


class _Pieces:
    """A growing string kept as pieces: appending, reading the end and cutting the end cost the
    length of the end touched, not the length of the whole string (``value`` joins it once)."""

    __slots__ = ("parts", "length")

    def __init__(self, text: str = ""):
        self.parts = [text] if text else []
        self.length = len(text)

    def append(self, s: str) -> None:
        if s:
            self.parts.append(s)
            self.length += len(s)

    def tail(self, k: int) -> str:
        """The last ``k`` characters."""
        got: list[str] = []
        for part in reversed(self.parts):
            if k <= 0:
                break
            got.append(part[max(0, len(part) - k):])
            k -= len(part)
        return "".join(reversed(got))

    def drop(self, k: int) -> None:
        """Remove the last ``k`` characters."""
        self.length -= k
        while k > 0:
            part = self.parts.pop()
            if len(part) > k:
                self.parts.append(part[: len(part) - k])
            k -= len(part)

    def value(self) -> str:
        if len(self.parts) > 1:
            self.parts = ["".join(self.parts)]
        return self.parts[0] if self.parts else ""


def _common_prefix(a: str, b: str) -> int:
    if b.startswith(a):
        return len(a)
    i, n = 0, min(len(a), len(b))
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _special_ids(tokenizer) -> frozenset[int]:
    """Ids of the tokenizer's special tokens (candidates for ``skip_special_tokens``)."""
    ids = set(getattr(tokenizer, "all_special_ids", None) or ())
    added = getattr(tokenizer, "added_tokens_decoder", None)
    if isinstance(added, dict):
        ids.update(i for i, t in added.items() if getattr(t, "special", False))
    return frozenset(ids)


class OutputTracker:
    """Accumulates generated tokens and decides where the output ends.

    ``push`` takes one or more tokens (a speculative step may accept several at once)
    and keeps them one at a time until EOS (kept in ``token_ids``, as transformers
    does), a stop string (the visible ``text`` ends before the first one), or ``max_new_tokens``.
    Nothing past the end is ever kept or streamed. ``on_text`` receives text deltas;
    text that might be the start of a stop string, or an unfinished character, is held
    back until it is not.

    Text is decoded incrementally, in work linear in the output's length (vLLM's and
    ``TextStreamer``'s approach): each new token is decoded with a few tokens of left context and
    adds the difference from the context's own decode. The read offset moves past tokens only once
    their text ends in a finished character (not "\ufffd"), and windows start only at such points,
    so byte-level BPE, SentencePiece byte fallback and decoders that drop the leading space of a
    decode agree with a whole decode. A token that rewrites the end of the window's text (a byte
    completing or spoiling a byte-fallback run, ``clean_up_tokenization_spaces``) replaces that
    end; a rewrite that reaches the window's start widens the window, and a window that does not
    match the text read so far makes that token decode the whole output. Special tokens are left
    out of the windows; stop strings are searched only where the text changed. ``finish`` decodes
    the whole output once and keeps that if it differs (a decode that depends on more than the
    window, such as the clean-up's pairing of quotes), so ``text`` always equals
    ``tokenizer.decode(token_ids, skip_special_tokens=True)``, cut before a stop string; streamed
    text cannot be taken back, so there the deltas may not join to ``text`` (as before). A run of
    tokens that keeps the text ending in an unfinished character (invalid bytes) is one window:
    its cost grows with the square of the run's length.
    Without stop strings and ``on_text`` nothing is decoded before ``finish``.
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
        self.finish_reason: str | None = None
        self._needs_text = bool(self.stop) or on_text is not None
        self._longest_stop = max((len(s) for s in self.stop), default=0)
        self._stop_has_ufffd = any("\ufffd" in s for s in self.stop)
        self._emitted = 0  # characters of the text streamed so far
        self._cut: int | None = None  # where the stop string begins
        self._final: str | None = None  # the text, once finished
        # Incremental decoding. The current text is read[: len(read) - rewrite] + pending.
        self._special = _special_ids(tokenizer) if self._needs_text else frozenset()
        self._skips: dict[int, bool] = {}  # special id -> decodes to nothing (left out of windows)
        self._ids: list[int] = []  # the tokens that decode to text
        self._read_text = _Pieces()  # text of _ids[:_read]
        self._read = 0
        self._marks = [0]  # offsets where the text ended in a finished character: window starts
        self._mark_at = 0
        self._prefix = 0  # window start, one of _marks
        self._context = ""  # decode(_ids[_prefix:_read])
        self._rewrite = 0  # characters at the end of _read_text the pending tokens replace
        self._pending = ""  # text of the tokens after _read (not yet settled)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        if self._final is not None:
            return self._final
        if not self._needs_text:
            return ""
        text = self._current_text()
        return text if self._cut is None else text[: self._cut]

    def push(self, tokens: Iterable[int]) -> bool:
        """Add tokens in order; return True once the output has ended."""
        for tok in tokens:
            if self.done:
                break
            tok = int(tok)
            self.token_ids.append(tok)
            if self._needs_text:
                self._update_text(tok)
            if self.done:
                break
            if tok in self.eos_ids:
                self.finish_reason = "eos"
            elif len(self.token_ids) >= self.max_new_tokens:
                self.finish_reason = "length"
        if self.done:
            self.finish()
        return self.done

    # -- incremental decoding --------------------------------------------------------------

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def _update_text(self, tok: int) -> None:
        if tok in self._special and self._skipped(tok):
            return  # the text does not change
        self._ids.append(tok)
        changed = self._decode_window()
        if self.stop:
            i = self._find_stop(changed)
            if i is not None:
                self._cut = i
                self.finish_reason = "stop"
                return
        if self.on_text is not None:
            self._stream()
        self._settle()

    def _skipped(self, tok: int) -> bool:
        known = self._skips.get(tok)
        if known is None:  # a special id the tokenizer would not skip stays in the text
            known = self._skips[tok] = self._decode([tok]) == ""
        return known

    def _decode_window(self) -> int:
        """Decode the window with the new token; return where the text may have changed."""
        while True:
            new = self._decode(self._ids[self._prefix :])
            ctx = self._context
            if new.startswith(ctx):
                rewrite, pending = 0, new[len(ctx) :]
                break
            # The new token changed the end of the window's text. When the change reaches the
            # window's start (a byte-fallback run that a byte made invalid), it may reach further:
            # look further back, once the text ends in a finished character (before that, the
            # next bytes may undo the change, and only "\ufffd" in the window could differ from a
            # whole decode: that matters only to stop strings that contain it).
            same = _common_prefix(ctx, new)
            if same == 0 and (self._stop_has_ufffd or not new.endswith("\ufffd")) and self._widen():
                continue
            rewrite = len(ctx) - same
            if rewrite > self._read_text.length or self._read_text.tail(rewrite) != ctx[same:]:
                return self._resync()
            pending = new[same:]
            break
        before = self._read_text.length - max(rewrite, self._rewrite)
        end = self._read_text.tail(max(rewrite, self._rewrite))
        old = end[: len(end) - self._rewrite] + self._pending
        self._rewrite, self._pending = rewrite, pending
        return before + _common_prefix(old, end[: len(end) - rewrite] + pending)

    def _widen(self) -> bool:
        """Start the window at an earlier mark, twice as far back; False at the output's start."""
        if self._prefix == 0:
            return False
        target = self._prefix - max(_CONTEXT_TOKENS, self._read - self._prefix)
        while self._mark_at > 0 and self._marks[self._mark_at] > target:
            self._mark_at -= 1
        self._prefix = self._marks[self._mark_at]
        self._context = self._decode(self._ids[self._prefix : self._read])
        return True

    def _resync(self) -> int:
        """Decode the whole output: the window disagreed with the text read so far."""
        old = self._current_text()
        text = self._decode(self._ids)
        self._read_text = _Pieces(text)
        self._read = len(self._ids)
        self._rewrite, self._pending = 0, ""
        if not text.endswith("\ufffd"):
            self._mark(self._read)
        self._set_context()
        return _common_prefix(old, text)

    def _settle(self) -> None:
        """Move the read offset past the pending tokens once their text ends in a finished character."""
        n = len(self._ids)
        if n == self._read:
            return
        if not self._text_from(self._length() - 1).endswith("\ufffd"):
            window = self._context[: len(self._context) - self._rewrite] + self._pending  # decode(_ids[_prefix:])
            self._read_text.drop(self._rewrite)
            self._read_text.append(self._pending)
            self._rewrite, self._pending = 0, ""
            self._read = n
            self._mark(n)
            self._set_context(window)

    def _mark(self, offset: int) -> None:
        if offset > self._marks[-1]:
            self._marks.append(offset)

    def _set_context(self, window: str | None = None) -> None:
        """Start the window at the last mark at least _CONTEXT_TOKENS before the read offset;
        ``window`` is decode(_ids[_prefix:_read]) when the caller has it."""
        marks, target, at = self._marks, self._read - _CONTEXT_TOKENS, self._mark_at
        while self._mark_at + 1 < len(marks) and marks[self._mark_at + 1] <= target:
            self._mark_at += 1
        if window is None or marks[self._mark_at] != self._prefix:
            prefix = marks[self._mark_at]
            moved = self._decode(self._ids[prefix : self._read])
            if not moved and prefix > self._prefix:
                # Context without text (tokens that decode to nothing) could not stand in for the
                # text before it (a decoder that drops the leading space of a decode): stay.
                self._mark_at = at
                if window is None:
                    window = self._decode(self._ids[self._prefix : self._read])
            else:
                self._prefix, window = prefix, moved
        self._context = window

    def _length(self) -> int:
        return self._read_text.length - self._rewrite + len(self._pending)

    def _text_from(self, start: int) -> str:
        """current text[start:], for a start near the end."""
        start = max(0, start)
        base = self._read_text.length - self._rewrite
        if start >= base:
            return self._pending[start - base :]
        return self._read_text.tail(self._read_text.length - start)[: base - start] + self._pending

    def _current_text(self) -> str:
        read = self._read_text.value()
        return read[: len(read) - self._rewrite] + self._pending

    def _find_stop(self, changed: int) -> int | None:
        """Where the first stop string that includes text from ``changed`` on begins."""
        start = max(0, changed - self._longest_stop + 1)
        tail = self._text_from(start)
        found = [i for s in self.stop if (i := tail.find(s, max(0, changed - len(s) + 1 - start))) >= 0]
        return start + min(found) if found else None

    def _stream(self) -> None:
        # Unfinished characters are looked for in the window's text only: text before it is settled.
        floor = max(0, self._read_text.length - len(self._context))
        start = max(0, min(floor, self._emitted) - self._longest_stop)
        tail = self._text_from(start)
        safe = floor + len(tail[floor - start :].rstrip("\ufffd"))
        head = tail[: safe - start]
        # Hold back the longest end that could still grow into a stop string.
        held = max((k for s in self.stop for k in range(1, min(len(s), safe + 1)) if head.endswith(s[:k])), default=0)
        upto = safe - held
        if upto > self._emitted:
            self.on_text(tail[self._emitted - start : upto - start])
            self._emitted = upto

    def finish(self) -> None:
        """Settle ``text`` with one decode of the whole output and flush the held-back text."""
        if self._final is not None:
            return
        text = self._decode(self.token_ids)
        cut = self._cut
        if self._needs_text and self._current_text() != text:
            # Only for a tokenizer whose decode depends on more than the window: the whole decode
            # wins. Text streamed before cannot be taken back (the old whole-decode tracker did the same).
            import logging

            logging.getLogger(__name__).debug("turbolm: incremental text differs from a whole decode; using the latter")
            found = [i for s in self.stop if (i := text.find(s)) >= 0] if self.finish_reason == "stop" else []
            cut = min(found) if found else None
        self._final = text if cut is None else text[:cut]
        if self.on_text is not None and len(self._final) > self._emitted:
            self.on_text(self._final[self._emitted :])
            self._emitted = len(self._final)


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
        return tau_of([self])

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(new_tokens=self.new_tokens, tau=self.tau, tokens_per_second=self.tokens_per_second)
        return d


def tau_of(results: Iterable[GenerationResult]) -> float:
    """Tokens per target forward after the prefill, over several generations (1.0 when no
    generation took a step after its prefill): the one definition of tau."""
    tokens = steps = 0
    for r in results:
        if r.new_tokens > 1 and r.target_forwards > 1:
            tokens += r.new_tokens - 1
            steps += r.target_forwards - 1
    return tokens / steps if steps else 1.0


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
    steps = _vanilla_steps(model, tokenizer, list(input_ids), max_new_tokens, sampling or SamplingParams(), stop, on_text)
    return drain(steps)


def _vanilla_steps(model, tokenizer, input_ids: list[int], max_new_tokens: int, sampling: SamplingParams, stop,
                   on_text) -> Generator[None, None, GenerationResult]:
    """Vanilla decoding as a generator that yields after every token and returns the result."""
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
        yield
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


def drain(steps: Generator[None, None, GenerationResult]) -> GenerationResult:
    """Run a step generator to its end and return what it returns."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def stream_text(run: Callable[[Callable[[str], None]], Generator[None, None, GenerationResult]],
                on_result: Callable[[GenerationResult], None]) -> Iterator[str]:
    """Text pieces as a step generator produces them: ``run(on_text)`` starts the generation
    with a text callback; after every step the text gathered so far is yielded, and the final
    result goes to ``on_result``. Runs under inference mode."""
    pending: list[str] = []
    with torch.inference_mode():
        steps = run(pending.append)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                result = done.value
                break
            if pending:
                yield "".join(pending)
                pending.clear()
    if pending:
        yield "".join(pending)
    on_result(result)


class VanillaDecoder:
    """Plain decoding behind the same interface as the speculative decoders: ``generate`` and
    ``stream`` (``result`` holds the last streamed generation's statistics)."""

    name = "vanilla"
    tree = None
    tree_choice = None

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.result: GenerationResult | None = None

    def generate(self, input_ids: Sequence[int], max_new_tokens: int = 256, sampling: SamplingParams | None = None,
                 stop: Sequence[str] = (), on_text: Callable[[str], None] | None = None) -> GenerationResult:
        self.result = generate(self.model, self.tokenizer, input_ids, max_new_tokens, sampling, stop, on_text)
        return self.result

    def stream(self, input_ids: Sequence[int], max_new_tokens: int = 256, sampling: SamplingParams | None = None,
               stop: Sequence[str] = ()) -> Iterator[str]:
        def run(on_text):
            return _vanilla_steps(self.model, self.tokenizer, list(input_ids), max_new_tokens,
                                  sampling or SamplingParams(), stop, on_text)

        return stream_text(run, lambda r: setattr(self, "result", r))


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
