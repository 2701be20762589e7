"""Plain decoding of several sequences in one forward: the engine of continuous batching.

A request is prefilled alone, into its own KV cache, with exactly the forward vanilla decoding
runs; its first token comes from that prefill. It then joins the batch: the batch's cache holds
every row left-padded to the longest, an attention mask hides the padding and explicit position
ids give each row its own positions, so a row attends to exactly its own tokens. A step is one
forward over one token per row; a row leaves when its output ends or it is cancelled, and the
columns that no remaining row uses are cut. Joining and leaving copy the cache (one row more or
less); a step copies nothing (the cache grows in place, :mod:`turbolm.core.kvcache`).

A batch of one row runs vanilla decoding's forwards exactly (no mask, no padding). With more
rows the logits are those of a B-row product, which float32 matrix kernels round differently
from a 1-row product (~1e-6 relative, measured): a greedy row then gives the tokens decoding
alone gives unless two candidates tie to that precision (docs/serving.md).

A prefill_only token pruner (``turbolm serve --pruner``) leaves a row's cache holding only its
kept tokens' entries (compacted, :mod:`turbolm.core.kvcache`); a row that joins others gets an
entry per position instead, placeholders that the row's later queries are masked from (each
cache layer's ``visible``): joining and leaving carry those masks with the rows, and the
pruner applies them at every step, so a row decodes what it decodes alone after its pruned prefill.

Sliding-window layers keep a cropped cache that cannot be padded this way: such models decode
one request at a time (``Batch.max_rows`` is 1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..core.generation import (
    OutputTracker,
    SamplingParams,
    eos_token_ids,
    forward,
    new_cache,
    next_token,
)
from ..core.kvcache import GrowingLayer


@dataclass(eq=False)
class Row:
    """One sequence in the batch. ``length``: tokens in its cache; ``last``: the token to feed next."""

    key: object
    tracker: OutputTracker
    sampling: SamplingParams
    generator: torch.Generator | None
    prompt_tokens: int
    length: int
    last: int


def batchable(model) -> bool:
    """Whether ``model``'s cache can be padded into a batch (every layer full attention)."""
    return all(type(layer) is GrowingLayer for layer in new_cache(model).layers)


class Batch:
    """The rows being decoded together and their shared cache (see the module doc).

    ``add`` prefills a request and returns its row, finished already if the prefill's token ended
    it (then it never joins); ``step`` decodes one token for every row and returns the rows that
    finished; ``remove`` takes rows out (cancelled ones). Not thread-safe: one thread owns it.
    """

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.eos = eos_token_ids(model, tokenizer)
        self.max_rows = None if batchable(model) else 1
        self.rows: list[Row] = []
        self.cache = None
        self.width = 0  # columns of the cache: the longest row's length

    def __len__(self) -> int:
        return len(self.rows)

    @torch.inference_mode()
    def add(self, key, prompt: Sequence[int], max_new_tokens: int, sampling: SamplingParams, stop: Sequence[str] = (),
            on_text: Callable[[str], None] | None = None) -> Row:
        """Prefill ``prompt`` alone and pick its first token; the row joins the batch unless that
        token ended the output (check ``row.tracker.done``). ``max_new_tokens`` must fit the context."""
        device = self.model.device
        tracker = OutputTracker(self.tokenizer, self.eos, max_new_tokens, stop, on_text)
        generator = sampling.generator(device)
        cache = new_cache(self.model)
        out = forward(self.model, torch.tensor([list(prompt)], device=device), cache, logits_to_keep=1)
        tok = next_token(out.logits[0, -1], sampling, generator)
        row = Row(key, tracker, sampling, generator, len(prompt), len(prompt), tok)
        if not tracker.push([tok]):
            self._join(row, cache)
        return row

    @torch.inference_mode()
    def step(self) -> list[Row]:
        """One token for every row (one forward); returns the rows whose output ended (removed)."""
        rows, device = self.rows, self.model.device
        ids = torch.tensor([[r.last] for r in rows], device=device)
        if len(rows) == 1:  # exactly vanilla decoding's forward
            out = forward(self.model, ids, self.cache)
        else:
            pads = torch.tensor([self.width - r.length for r in rows])
            mask = torch.arange(self.width + 1)[None] >= pads[:, None]  # [rows, width + 1]
            positions = torch.tensor([[r.length] for r in rows])
            out = forward(self.model, ids, self.cache, attention_mask=mask.long().to(device),
                          position_ids=positions.to(device))
        self.width += 1
        logits = out.logits[:, -1]  # [rows, vocab]
        done = []
        for i, row in enumerate(rows):
            row.length += 1
            row.last = next_token(logits[i], row.sampling, row.generator)
            if row.tracker.push([row.last]):
                done.append(row)
        self.remove(done)
        return done

    def remove(self, rows: Sequence[Row]) -> None:
        """Take ``rows`` out of the batch and cut the cache to what the others need."""
        gone = {id(r) for r in rows}
        keep = [i for i, r in enumerate(self.rows) if id(r) not in gone]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache, self.width = None, 0
            return
        cut = self.width - max(r.length for r in self.rows)  # leading columns no remaining row uses
        index = torch.tensor(keep, device=self.model.device)
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, cut:]
            layer.values = layer.values.index_select(0, index)[:, :, cut:]
            if layer.visible is not None:  # aligned with the leading columns: cut the same ones
                layer.visible = layer.visible.index_select(0, index)[..., cut:]
        self.width -= cut

    def _join(self, row: Row, cache) -> None:
        """Add a prefilled row and its own cache to the batch: both sides left-padded to the longer."""
        if not self.rows:
            self.rows, self.cache, self.width = [row], cache, row.length
            return
        width = max(self.width, row.length)
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.expand()  # a pruned prompt held compacted: an entry per position from now on
            theirs.expand()
            if mine.visible is not None or theirs.visible is not None:
                mine.visible = torch.cat([_visible(mine.visible, self.width, width, mine.keys),
                                          _visible(theirs.visible, row.length, width, theirs.keys)])
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)])
            mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)])
        self.rows.append(row)
        self.width = width


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` [batch, heads, length, dim] with zeros before its positions up to ``width``."""
    n = width - t.shape[2]
    if n == 0:
        return t
    return torch.cat([t.new_zeros(t.shape[0], t.shape[1], n, t.shape[3]), t], dim=2)


def _visible(mask: torch.Tensor | None, length: int, width: int, keys: torch.Tensor) -> torch.Tensor:
    """A cache layer's ``visible`` mask (None: all visible) for its rows of ``length`` entries
    (``keys``: the layer's keys, for their rows and device), as ``[rows, 1, 1, width]``: entries
    past the mask visible, the left padding not."""
    if mask is None:
        mask = torch.ones(keys.shape[0], 1, 1, 0, dtype=torch.bool, device=keys.device)
    mask = mask[..., :length]
    right = torch.nn.functional.pad(mask, (0, length - mask.shape[-1]), value=True)
    return torch.nn.functional.pad(right, (width - length, 0), value=False)
