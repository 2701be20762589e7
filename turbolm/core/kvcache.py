"""KV caches that grow in place.

transformers' ``DynamicLayer`` appends with ``torch.cat``, which copies the whole cache
at every forward: on a CPU that copy grows with the context (12% of a one-token forward
of the default model at 600 tokens of context, profiled on a 2-core Xeon). Here keys and
values are prefix views of a larger buffer and new positions are written into it; the
buffer doubles when full (amortised O(1) per position). Anything that slices or
re-assigns ``keys`` / ``values`` (truncation, tree surgery, transformers' own ``crop``)
keeps working: a prefix slice stays in the buffer, anything else is noticed and copied
into a fresh buffer on the next write.

The tensors returned hold exactly what ``torch.cat`` would return; only the memory they
live in differs, so outputs are bit-identical (tested).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

_HEADROOM = 256  # positions reserved beyond the first write


def append_in_place(view: torch.Tensor | None, buffer: torch.Tensor | None, new: torch.Tensor):
    """``view`` with ``new`` appended along dim 2, written into ``buffer`` where it fits.

    ``view`` is the current content (None or empty at first), ``buffer`` the memory behind
    it. Returns ``(view, buffer)``: the longer view and the (possibly new) buffer. While
    autograd records (training), it concatenates instead.
    """
    old = 0 if view is None or view.dim() != new.dim() else view.shape[2]
    if torch.is_grad_enabled() and (new.requires_grad or (old and view.requires_grad)):
        # autograd saved the earlier views for backward: writing into their memory would break it
        return (torch.cat([view, new], 2) if old else new), None
    in_buffer = (
        buffer is not None and old > 0 and view.data_ptr() == buffer.data_ptr() and view.stride() == buffer.stride()
        and view.shape[:2] == buffer.shape[:2] and view.shape[3:] == buffer.shape[3:]
        and view.dtype == buffer.dtype and view.device == buffer.device
    )
    need = old + new.shape[2]
    if not in_buffer or need > buffer.shape[2]:
        shape = list(new.shape)
        shape[2] = max(need + _HEADROOM, 2 * old)
        fresh = new.new_empty(shape)
        if old:
            fresh[:, :, :old] = view
        buffer = fresh
    buffer[:, :, old:need] = new
    return buffer[:, :, :need], buffer


class GrowingLayer(DynamicLayer):
    """transformers' full-attention cache layer, appending in place (``append_in_place``).

    A ``prefill_only`` token pruner (:mod:`turbolm.pruning.skipping`) leaves the prompt's
    tokens that skipped this block out of it, in one of two forms:

    - *compacted* (one sequence): only the kept tokens have entries. ``kept`` holds their
      positions (sorted, a long tensor) among the first ``front`` positions; every position from
      ``front`` on has its entry. ``get_seq_length()`` still counts every position (the model's
      positions and masks are the sequence's), ``dropped`` is how many have no entry, and
      :meth:`columns` picks a mask's columns for the entries there are. Attention then reads
      only real keys: after a 900-token prompt pruned at 30% a decoding step costs what a
      ~630-token one does.
    - *placeholders* (``visible``): an entry per position, zeros where a token skipped, and
      ``visible`` (bool, ``[batch, 1, 1, n]``; entries past ``n`` are all visible) says which
      later queries may attend to. Rows of different prompts batched together need this form
      (:mod:`turbolm.serving.batch` keeps the masks with their rows; :meth:`expand` turns a
      compacted layer into it).
    """

    _key_buffer: torch.Tensor | None = None
    _value_buffer: torch.Tensor | None = None
    visible: torch.Tensor | None = None
    kept: torch.Tensor | None = None
    front: int = 0

    @property
    def dropped(self) -> int:
        """Positions without an entry (all among the first ``front``)."""
        return 0 if self.kept is None else self.front - self.kept.numel()

    def get_seq_length(self) -> int:
        return super().get_seq_length() + self.dropped

    def compacted(self, kept: torch.Tensor, front: int) -> None:
        """Declare this layer's entries (one sequence, exactly ``len(kept)`` of them) to be those of
        positions ``kept`` (sorted) among the first ``front``: the others have none."""
        if self.kept is not None or self.visible is not None or (self.keys.shape[0], self.keys.shape[2]) != (1, kept.numel()):
            raise ValueError(f"compacted() takes one sequence's layer holding the {kept.numel()} kept entries only")
        self.kept, self.front = kept, front

    def crop_to(self, length: int) -> None:
        """Keep the first ``length`` positions (into a compacted prompt too)."""
        if self.kept is not None and length < self.front:
            self.kept = self.kept[: int((self.kept < length).sum())]
            self.front = length
        n = length - self.dropped
        self.keys, self.values = self.keys[:, :, :n], self.values[:, :, :n]

    def columns(self, width: int) -> torch.Tensor:
        """The columns of a mask over ``width`` positions that this layer's entries answer to."""
        rest = torch.arange(self.front, width, device=self.kept.device)
        return torch.cat([self.kept, rest])

    def expand(self) -> None:
        """A compacted layer in the placeholder form: zeros at the dropped positions, hidden by
        ``visible``. Attention over it computes the same; nothing changes for other layers."""
        if self.kept is None:
            return
        n = self.keys.shape[2] - self.kept.numel()
        index = self.columns(self.front + n)
        for name in ("keys", "values"):
            held = getattr(self, name)
            full = held.new_zeros(*held.shape[:2], self.front + n, held.shape[3])
            full[:, :, index] = held
            setattr(self, name, full)
        self.visible = torch.zeros(1, 1, 1, self.front, dtype=torch.bool, device=self.keys.device)
        self.visible[..., self.kept] = True
        self.kept, self.front = None, 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys, self._key_buffer = append_in_place(self.keys, self._key_buffer, key_states)
        self.values, self._value_buffer = append_in_place(self.values, self._value_buffer, value_states)
        return self.keys, self.values

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = self.visible = self.kept = None
        self.front = 0
        super().reset()


def entries(layer, length: int) -> int:
    """How many of a cache layer's entries hold its first ``length`` positions, ``length`` at
    least a compacted prompt's (a compacted layer holds fewer entries than positions; any other
    layer, one per position)."""
    if length < getattr(layer, "front", 0):
        raise ValueError(f"length {length} ends inside the compacted prompt ({layer.front} positions)")
    return length - getattr(layer, "dropped", 0)


def growing_cache(config=None) -> DynamicCache:
    """A ``DynamicCache`` whose full-attention layers append in place (``GrowingLayer``).

    With ``config`` the layers follow the model's layer types (sliding-window layers stay
    transformers' own); without, every layer is full attention, created on first use.
    """
    if config is None:
        cache = DynamicCache()
        cache.layer_class_to_replicate = GrowingLayer
        return cache
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache
