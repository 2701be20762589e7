"""Batched log-likelihood scoring in lm-evaluation-harness conventions.

The model is a callable ``logits_fn(input_ids: LongTensor[B, T]) -> FloatTensor[B, T, V]``
(:func:`hf_logits_fn` wraps a Hugging Face causal LM). A request is a ``(context, continuation)``
pair; its score is the summed log-prob of the continuation tokens given everything before them.

Tokenization follows lm-eval's ``_encode_pair``: trailing whitespace of the context moves to the
front of the continuation; the context is tokenized alone and the continuation tokens are those of
``tokenize(context + continuation)`` after the context's tokens. The tokenizer's own special-token
setting applies (as in lm-eval: a tokenizer that prepends BOS prepends it to the context). An empty
context is replaced by the prefix token (BOS, else EOS).

Batching:

* ``equal_length_batches=False``: inputs are sorted by length and right-padded; the pad positions
  come after every scored position, so under causal attention they change nothing, and they are
  never read (masked out of the scores).
* ``equal_length_batches=True``: ``logits_fn`` only ever sees rows of exactly the same length, no
  padding (requests are bucketed by token length) -- for models whose per-token decisions (token
  pruning) would change with padding.

Requests whose inputs are identical (e.g. MMLU's four one-token answers) share one row.

A request longer than ``max_length + 1`` tokens is truncated from the left (the continuation is
kept whole; the oldest context tokens go), exactly as lm-eval does; the number truncated is counted
in the task's result.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..core.errors import ParameterError, TurboLMError
from .tasks import ChoiceItem, ContinuationItem, Document, Task

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
#: (context ids [1, c], the rest [1, k]) -> logits [1, 1 + k, vocab]: the context's last position, then the rest
PrefillFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
TokenRequest = tuple[list[int], list[int]]  # (context tokens, continuation tokens)


def hf_logits_fn(model) -> LogitsFn:
    """``logits_fn`` for a Hugging Face causal LM: one plain forward, no cache, no attention mask."""
    device = next(model.parameters()).device

    @torch.inference_mode()
    def logits_fn(input_ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=input_ids.to(device), use_cache=False).logits

    return logits_fn


def hf_prefill_fn(model) -> PrefillFn:
    """``prefill_fn`` for a Hugging Face causal LM: the context in one forward into a fresh KV
    cache (only its last position's logits kept), then the rest in a second forward over that
    cache - how a served prompt is prefilled and its answer decoded. A ``prefill_only`` token
    pruner skips tokens in the first forward only; the second runs the dense model on its cache."""
    from ..core.generation import forward, new_cache

    device = next(model.parameters()).device

    @torch.inference_mode()
    def prefill_fn(context: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
        cache = new_cache(model)
        first = forward(model, context.to(device), cache, logits_to_keep=1).logits
        if rest.shape[1] == 0:
            return first
        return torch.cat([first, forward(model, rest.to(device), cache).logits], dim=1)

    return prefill_fn


def prefix_token_id(tokenizer) -> int:
    """lm-eval's prefix token for an empty context / the first token of a document: BOS, else EOS."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return tid
    raise TurboLMError("the tokenizer has neither a BOS nor an EOS token to condition the first token on")


@dataclass
class Scorer:
    """Tokenizes and scores requests. ``max_length``: the longest input the model takes (tokens).

    ``prefill_fn`` (:func:`hf_prefill_fn`): score every continuation *after a prefill* of its
    context instead of in one forward over both - one request at a time, and perplexity windows
    that each score ``stride`` tokens after a prefill of the tokens before them
    (:func:`rolling_windows`' ``first``). With a prefill-only token pruner this is the quality of
    text that follows a pruned prompt, the part of the model's output a pruned prefill serves.
    """

    logits_fn: LogitsFn
    tokenizer: object
    max_length: int
    batch_size: int = 8
    equal_length_batches: bool = False
    progress: bool = True
    prefill_fn: PrefillFn | None = None
    truncated: int = field(default=0, init=False)  # requests truncated from the left, since the last reset
    calls: int = field(default=0, init=False)  # logits_fn calls

    def __post_init__(self):
        if self.batch_size < 1:
            raise ParameterError(f"{{}} must be >= 1, got {self.batch_size}", "batch_size")
        if self.max_length < 2:
            raise TurboLMError(f"the model's context must be at least 2 tokens, got {self.max_length}")
        self.prefix_id = prefix_token_id(self.tokenizer)

    # --- tokenization ------------------------------------------------------------------------

    def _encode_many(self, texts: Sequence[str]) -> dict[str, list[int]]:
        unique = list(dict.fromkeys(texts))
        out: dict[str, list[int]] = {}
        for i in range(0, len(unique), 1024):
            chunk = unique[i:i + 1024]
            for text, ids in zip(chunk, self.tokenizer(chunk)["input_ids"]):
                out[text] = list(ids)
        return out

    def encode_pairs(self, pairs: Sequence[tuple[str, str]], task: str = "") -> list[TokenRequest]:
        """lm-eval's ``_encode_pair`` for every ``(context, continuation)``, batched through the tokenizer."""
        split = []
        for context, continuation in pairs:
            n = len(context) - len(context.rstrip())
            if n and context.strip():
                context, continuation = context[:-n], context[-n:] + continuation
            split.append((context, continuation))
        texts = [c for c, _ in split if c] + [c + k for c, k in split if c]
        enc = self._encode_many(texts)
        empty = [k for c, k in split if not c]
        enc_cont = dict(zip(empty, self.tokenizer(empty, add_special_tokens=False)["input_ids"])) if empty else {}
        out = []
        for context, continuation in split:
            if not context:  # lm-eval: condition on the prefix token
                cont = list(enc_cont[continuation])
                if cont and cont[0] == self.prefix_id:
                    ctx, cont = cont[:1], cont[1:]
                else:
                    ctx = [self.prefix_id]
            else:
                ctx = enc[context]
                cont = enc[context + continuation][len(ctx):]
            if not cont:
                raise TurboLMError(f"{task + ': ' if task else ''}the continuation {continuation!r} encodes to no "
                                   f"tokens after the context {context[-60:]!r}")
            out.append((ctx, cont))
        return out

    # --- scoring -----------------------------------------------------------------------------

    def _input(self, ctx: list[int], cont: list[int]) -> list[int]:
        """The tokens a request feeds the model (context + continuation but the last, cut from
        the left to ``max_length``); counts the truncation."""
        if not cont:
            raise TurboLMError("a request has an empty continuation")
        if len(cont) > self.max_length:
            raise TurboLMError(f"a continuation of {len(cont)} tokens is longer than the model's context "
                               f"({self.max_length} tokens)")
        whole = ctx + cont
        if len(whole) > self.max_length + 1:
            self.truncated += 1
        return whole[-(self.max_length + 1):][:-1]

    @staticmethod
    def _score(lp: torch.Tensor, cont: list[int]) -> tuple[float, bool]:
        """(summed log-prob, greedy match) of ``cont`` under ``lp``, its log-probs [len(cont), vocab]."""
        tokens = torch.tensor(cont, dtype=torch.long, device=lp.device)
        return float(lp.gather(-1, tokens[:, None]).sum()), bool((lp.argmax(dim=-1) == tokens).all())

    def loglikelihood_tokens(self, requests: Sequence[TokenRequest], desc: str = "scoring") -> list[tuple[float, bool]]:
        """(summed log-prob of the continuation, whether greedy decoding gives exactly the continuation)."""
        if self.prefill_fn is not None:
            return self._after_prefill(requests, desc)
        rows: dict[tuple[int, ...], list[int]] = {}  # input -> indices of the requests it serves
        for i, (ctx, cont) in enumerate(requests):
            rows.setdefault(tuple(self._input(ctx, cont)), []).append(i)
        inputs = sorted(rows, key=lambda r: -len(r))
        if self.equal_length_batches:
            batches, start = [], 0
            while start < len(inputs):
                end = start
                n = len(inputs[start])
                while end < len(inputs) and end - start < self.batch_size and len(inputs[end]) == n:
                    end += 1
                batches.append(inputs[start:end])
                start = end
        else:
            batches = [inputs[i:i + self.batch_size] for i in range(0, len(inputs), self.batch_size)]

        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = _progress(len(requests), desc, self.progress)
        try:
            for batch in batches:
                width = len(batch[0])
                ids = torch.zeros(len(batch), width, dtype=torch.long)
                for r, inp in enumerate(batch):
                    ids[r, :len(inp)] = torch.tensor(inp, dtype=torch.long)
                logits = self.logits_fn(ids)
                self.calls += 1
                if logits.dim() != 3 or logits.shape[:2] != ids.shape:
                    raise TurboLMError(f"logits_fn returned shape {tuple(logits.shape)} for input {tuple(ids.shape)}; "
                                       "expected [batch, length, vocab]")
                done = 0
                for r, inp in enumerate(batch):
                    n = len(inp)
                    served = rows[inp]
                    longest = max(len(requests[i][1]) for i in served)
                    # logits at positions n-longest .. n-1 predict the last `longest` tokens of ctx+cont
                    lp = torch.log_softmax(logits[r, n - longest:n].float(), dim=-1)
                    for i in served:
                        results[i] = self._score(lp[longest - len(requests[i][1]):], requests[i][1])
                    done += len(served)
                del logits
                bar.update(done)
        finally:
            bar.close()
        return results  # type: ignore[return-value]

    def _after_prefill(self, requests: Sequence[TokenRequest], desc: str) -> list[tuple[float, bool]]:
        """Each request alone: its context prefilled, its continuation run over that cache."""
        results = []
        bar = _progress(len(requests), desc, self.progress)
        try:
            for ctx, cont in requests:
                inp = torch.tensor([self._input(ctx, cont)], dtype=torch.long)
                split = inp.shape[1] - len(cont) + 1  # the context: every input token before the continuation's
                logits = self.prefill_fn(inp[:, :split], inp[:, split:])
                self.calls += 1
                if logits.dim() != 3 or logits.shape[:2] != (1, len(cont)):
                    raise TurboLMError(f"prefill_fn returned shape {tuple(logits.shape)} for a continuation of "
                                       f"{len(cont)} tokens; expected [1, {len(cont)}, vocab]")
                results.append(self._score(torch.log_softmax(logits[0].float(), dim=-1), cont))
                bar.update(1)
        finally:
            bar.close()
        return results

    def loglikelihood(self, pairs: Sequence[tuple[str, str]], desc: str = "scoring") -> list[tuple[float, bool]]:
        return self.loglikelihood_tokens(self.encode_pairs(pairs, desc), desc)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="req", disable=not enabled, leave=False, dynamic_ncols=True)


# --- rolling windows ------------------------------------------------------------------------------


def rolling_windows(tokens: list[int], prefix_id: int, context_length: int, stride: int,
                    first: int | None = None) -> list[TokenRequest]:
    """Split a document into windows of ``context_length`` input tokens that together predict every token.

    The sequence is ``[prefix] + tokens``. The first window predicts the first ``first`` tokens
    (default ``context_length``); each later window predicts the next ``stride`` tokens with the
    ``context_length`` tokens before its last prediction as input, i.e. at least ``context_length -
    stride`` tokens of context. With ``stride == context_length`` these are lm-eval's
    ``loglikelihood_rolling`` windows (disjoint, the last one with a full window of context)."""
    if not 1 <= stride <= context_length:
        raise ParameterError(f"{{}} must be between 1 and the context length ({context_length}), got {stride}", "stride")
    x = [prefix_id] + list(tokens)
    n = len(tokens)
    windows = []
    t0 = 1
    while t0 <= n:
        t1 = min(t0 + ((first or context_length) if t0 == 1 else stride), n + 1)  # predict x[t0:t1]
        start = max(0, t1 - 1 - context_length)
        windows.append((x[start:t0], x[t0:t1]))
        t0 = t1
    return windows


# --- metrics ----------------------------------------------------------------------------------------


def mean_stderr(values: Sequence[float]) -> float | None:
    """lm-eval's ``mean_stderr``: sample standard deviation / sqrt(n)."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1) / n)


def _argmax(values: Sequence[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def evaluate_choice(task: Task, scorer: Scorer) -> dict:
    pairs, owner = [], []
    for k, item in enumerate(task.items):
        for ctx, cont in zip(item.contexts, item.continuations):
            pairs.append((ctx, cont))
            owner.append(k)
    scores = scorer.loglikelihood(pairs, desc=task.name)
    lls: list[list[float]] = [[] for _ in task.items]
    for k, (ll, _) in zip(owner, scores):
        lls[k].append(ll)
    acc, acc_norm, groups = [], [], {}
    for item, ll in zip(task.items, lls):
        hit = float(_argmax(ll) == item.gold)
        acc.append(hit)
        if item.norm_lengths is not None:
            acc_norm.append(float(_argmax([v / n for v, n in zip(ll, item.norm_lengths)]) == item.gold))
        if item.group is not None:
            groups.setdefault(item.group, []).append(hit)
    result = {"acc": _mean(acc), "acc_stderr": mean_stderr(acc),
              "acc_norm": _mean(acc_norm) if acc_norm else None,
              "acc_norm_stderr": mean_stderr(acc_norm) if acc_norm else None,
              "n": len(task.items)}
    if groups:  # MMLU: acc over all questions (lm-eval's size-weighted group mean), and per subject
        result["subtasks"] = {g: {"acc": _mean(v), "n": len(v)} for g, v in groups.items()}
    result["_lls"] = lls
    return result


def evaluate_loglikelihood(task: Task, scorer: Scorer) -> dict:
    scores = scorer.loglikelihood([(it.context, it.continuation) for it in task.items], desc=task.name)
    greedy = [float(g) for _, g in scores]
    lls = [ll for ll, _ in scores]
    return {"acc": _mean(greedy), "acc_stderr": mean_stderr(greedy), "acc_norm": None, "acc_norm_stderr": None,
            "n": len(task.items), "ppl": math.exp(-_mean(lls)), "_lls": lls}


def evaluate_rolling(task: Task, scorer: Scorer, context_length: int | None = None, stride: int | None = None) -> dict:
    context_length = context_length or scorer.max_length
    if context_length > scorer.max_length:
        raise ParameterError(f"{{}} {context_length} is longer than the model's context ({scorer.max_length})", "context_length")
    stride = stride or context_length
    enc = scorer._encode_many([d.text for d in task.items])
    windows, owner, n_tokens = [], [], 0
    for k, doc in enumerate(task.items):
        toks = enc[doc.text]
        n_tokens += len(toks)
        # after a prefill, every window scores `stride` tokens (the first's context is the prefix token alone)
        first = stride if scorer.prefill_fn is not None else None
        for w in rolling_windows(toks, scorer.prefix_id, context_length, stride, first):
            windows.append(w)
            owner.append(k)
    scores = scorer.loglikelihood_tokens(windows, desc=task.name)
    doc_ll = [0.0] * len(task.items)
    for k, (ll, _) in zip(owner, scores):
        doc_ll[k] += ll
    total = sum(doc_ll)
    words = sum(d.words for d in task.items)
    nbytes = sum(d.bytes for d in task.items)
    return {"acc": None, "acc_stderr": None, "acc_norm": None, "acc_norm_stderr": None, "n": len(task.items),
            "ppl": math.exp(-total / n_tokens), "word_ppl": math.exp(-total / words),
            "byte_ppl": math.exp(-total / nbytes), "bits_per_byte": -total / nbytes / math.log(2),
            "tokens": n_tokens, "context_length": context_length, "stride": stride, "_lls": doc_ll}


def evaluate_task(task: Task, scorer: Scorer, context_length: int | None = None, stride: int | None = None,
                  keep_lls: bool = False) -> dict:
    """Score one task; returns its metrics (``acc``, ``acc_norm``, ``n``, stderrs, ``ppl`` where relevant)."""
    start = time.perf_counter()
    scorer.truncated = 0
    if task.kind == "choice":
        result = evaluate_choice(task, scorer)
    elif task.kind == "loglikelihood":
        result = evaluate_loglikelihood(task, scorer)
    elif task.kind == "rolling":
        result = evaluate_rolling(task, scorer, context_length, stride)
    else:
        raise ValueError(f"unknown task kind {task.kind!r}")
    lls = result.pop("_lls")
    if keep_lls:
        result["lls"] = lls
    result.update(truncated=scorer.truncated, seconds=round(time.perf_counter() - start, 2),
                  source=task.source, prompt=task.prompt)
    return result


def evaluate(tasks: Sequence[Task], scorer: Scorer, context_length: int | None = None, stride: int | None = None,
             on_result: Callable[[str, dict], None] | None = None) -> dict[str, dict]:
    results = {}
    for task in tasks:
        results[task.name] = evaluate_task(task, scorer, context_length, stride)
        if on_result is not None:
            on_result(task.name, results[task.name])
    return results


__all__ = ["ChoiceItem", "ContinuationItem", "Document", "Scorer", "evaluate", "evaluate_task", "hf_logits_fn",
           "hf_prefill_fn", "mean_stderr", "rolling_windows"]
