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

    ``visible``: which of the layer's first entries later queries may attend to (bool, ``[batch,
    1, 1, n]``; entries past ``n`` are all visible), or None: every entry. A ``prefill_only``
    token pruner sets it to hide the placeholders its skipped tokens leave
    (:mod:`turbolm.pruning.skipping`); whatever batches or reorders rows keeps it with them
    (:mod:`turbolm.serving.batch`).
    """

    _key_buffer: torch.Tensor | None = None
    _value_buffer: torch.Tensor | None = None
    visible: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys, self._key_buffer = append_in_place(self.keys, self._key_buffer, key_states)
        self.values, self._value_buffer = append_in_place(self.values, self._value_buffer, value_states)
        return self.keys, self.values

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = self.visible = None
        super().reset()


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
