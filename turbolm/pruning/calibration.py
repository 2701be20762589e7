"""How far a pruned model is from the dense one: the fitness of the sparsity search.

Only the last ``score_last`` positions of each chunk are compared: a token that skips blocks
is still a key/value for later tokens, but its own next-token prediction is not what pruning
serves - the predictions that are used come after the context (the answer in generation, the
continuation in scoring). Comparing all positions would punish every skip through the skipped
token's own output. The dense log-probabilities of those positions are computed once (float16);
a schedule's fitness is minus the mean KL(dense || pruned) over them.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .skipping import TokenPruner


class DenseReference:
    def __init__(self, model, chunks: torch.Tensor, batch_size: int = 4, score_last: int | None = None):
        self.model = model
        self.chunks = chunks
        self.batch_size = batch_size
        self.score_last = default_score_last(chunks.shape[1]) if score_last is None else score_last
        self.log_probs = [lp.half() for lp in self._log_probs(None)]

    @torch.no_grad()
    def _log_probs(self, pruner: TokenPruner | None):
        device = self.model.device
        for i in range(0, len(self.chunks), self.batch_size):
            ids = self.chunks[i: i + self.batch_size].to(device)
            if pruner is None:
                logits = _dense_logits(self.model, ids, self.score_last)
            else:
                logits = self.model(input_ids=ids, use_cache=False, logits_to_keep=self.score_last).logits
            yield F.log_softmax(logits.float(), dim=-1)

    @torch.no_grad()
    def kl(self, pruner: TokenPruner) -> float:
        """Mean KL(dense || pruned) per token with ``pruner`` attached to the model."""
        total, count = 0.0, 0
        for ref, lp in zip(self.log_probs, self._log_probs(pruner)):
            ref = ref.float()
            total += float((ref.exp() * (ref - lp)).sum())
            count += ref.shape[0] * ref.shape[1]
        return total / count

    def fitness(self, pruner: TokenPruner):
        """A ``fitness(schedule)`` for :func:`.scheduler.search_schedule`: minus the KL."""
        def fitness(schedule):
            pruner.schedule = [float(s) for s in schedule]
            return -self.kl(pruner)
        return fitness


def default_score_last(seq_len: int) -> int:
    """The scored tail of a chunk: its last quarter."""
    return max(1, seq_len // 4)


def _dense_logits(model, ids, score_last: int):
    pruner = getattr(model, "turbolm_pruner", None)
    with pruner.disabled() if pruner is not None else contextlib.nullcontext():
        return model(input_ids=ids, use_cache=False, logits_to_keep=score_last).logits
