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
TokenRequest = tuple[list[int], list[int]]  # (context tokens, continuation tokens)


def hf_logits_fn(model) -> LogitsFn:
    """``logits_fn`` for a Hugging Face causal LM: one plain forward, no cache, no attention mask."""
    device = next(model.parameters()).device

    @torch.inference_mode()
    def logits_fn(input_ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=input_ids.to(device), use_cache=False).logits

    return logits_fn


def prefix_token_id(tokenizer) -> int:
    """lm-eval's prefix token for an empty context / the first token of a document: BOS, else EOS."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return tid
    raise TurboLMError("the tokenizer has neither a BOS nor an EOS token to condition the first token on")


@dataclass
class Scorer:
    """Tokenizes and scores requests. ``max_length``: the longest input the model takes (tokens)."""

    logits_fn: LogitsFn
    tokenizer: object
    max_length: int
    batch_size: int = 8
    equal_length_batches: bool = False
    progress: bool = True
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

    def loglikelihood_tokens(self, requests: Sequence[TokenRequest], desc: str = "scoring") -> list[tuple[float, bool]]:
        """(summed log-prob of the continuation, whether greedy decoding gives exactly the continuation)."""
        rows: dict[tuple[int, ...], list[int]] = {}  # input -> indices of the requests it serves
        for i, (ctx, cont) in enumerate(requests):
            if not cont:
                raise TurboLMError("a request has an empty continuation")
            if len(cont) > self.max_length:
                raise TurboLMError(f"a continuation of {len(cont)} tokens is longer than the model's context "
                                   f"({self.max_length} tokens)")
            whole = ctx + cont
            if len(whole) > self.max_length + 1:
                self.truncated += 1
            rows.setdefault(tuple(whole[-(self.max_length + 1):][:-1]), []).append(i)
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
                    greedy = lp.argmax(dim=-1)
                    for i in served:
                        cont = torch.tensor(requests[i][1], dtype=torch.long, device=lp.device)
                        c = len(cont)
                        tok_lp = lp[longest - c:].gather(-1, cont[:, None]).squeeze(-1)
                        results[i] = (float(tok_lp.sum()), bool((greedy[longest - c:] == cont).all()))
                    done += len(served)
                del logits
                bar.update(done)
        finally:
            bar.close()
        return results  # type: ignore[return-value]

    def loglikelihood(self, pairs: Sequence[tuple[str, str]], desc: str = "scoring") -> list[tuple[float, bool]]:
        return self.loglikelihood_tokens(self.encode_pairs(pairs, desc), desc)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="req", disable=not enabled, leave=False, dynamic_ncols=True)


# --- rolling windows ------------------------------------------------------------------------------


def rolling_windows(tokens: list[int], prefix_id: int, context_length: int, stride: int) -> list[TokenRequest]:
    """Split a document into windows of ``context_length`` input tokens that together predict every token.

    The sequence is ``[prefix] + tokens``. The first window predicts the first ``context_length`` tokens;
    each later window predicts the next ``stride`` tokens with the ``context_length`` tokens before its
    last prediction as input, i.e. at least ``context_length - stride`` tokens of context. With
    ``stride == context_length`` these are lm-eval's ``loglikelihood_rolling`` windows (disjoint, the
    last one with a full window of context)."""
    if not 1 <= stride <= context_length:
        raise ParameterError(f"{{}} must be between 1 and the context length ({context_length}), got {stride}", "stride")
    x = [prefix_id] + list(tokens)
    n = len(tokens)
    windows = []
    t0 = 1
    while t0 <= n:
        t1 = min(t0 + (context_length if t0 == 1 else stride), n + 1)  # predict x[t0:t1]
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
        for w in rolling_windows(toks, scorer.prefix_id, context_length, stride):
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
           "mean_stderr", "rolling_windows"]
