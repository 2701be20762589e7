"""KV-cache surgery after a tree verification: keep only the accepted path.

After the tree forward the cache holds the committed prefix followed by every tree
node. The next step must see the prefix, the root and the accepted nodes only, in
that order, so the accepted nodes' keys/values are moved up behind the root and the
rest is dropped. Works on transformers' ``DynamicCache`` of full-attention layers (ours grow in place)
(``cache.layers[i].keys / .values`` of shape (batch, kv_heads, seq, head_dim)), and on layers whose
pruned prompt holds fewer entries than positions (``core.kvcache.GrowingLayer.kept``): positions
here are the sequence's.
"""

from __future__ import annotations

import torch

from ..core.kvcache import GrowingLayer, entries, growing_cache


def new_tree_cache():
    """A cache whose every layer keeps all positions, so tree nodes can be dropped afterwards.

    Sliding-window models are still correct: the window is applied by the attention mask.
    Layers append in place (``core.kvcache``); the slicing below keeps them in their buffers.
    """
    return growing_cache()


def cache_length(cache) -> int:
    return cache.get_seq_length()


def keep_only(cache, start: int, keep: list[int]) -> None:
    """Keep positions ``[:start]`` and then ``start + i`` for each i in ``keep`` (in order)."""
    m = len(keep)
    if keep == list(range(m)):  # a prefix of the appended block: a plain truncation
        truncate(cache, start + m)
        return
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", True) or layer.keys is None or layer.keys.numel() == 0:
            continue
        first = entries(layer, start)
        idx = torch.tensor(keep, device=layer.keys.device) + first
        layer.keys[:, :, first : first + m] = layer.keys[:, :, idx]
        layer.values[:, :, first : first + m] = layer.values[:, :, idx]
        layer.keys = layer.keys[:, :, : first + m]
        layer.values = layer.values[:, :, : first + m]


def truncate(cache, length: int) -> None:
    """Drop every position from ``length`` on."""
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", True) or layer.keys is None or layer.keys.numel() == 0:
            continue
        if isinstance(layer, GrowingLayer):
            layer.crop_to(length)
        else:
            layer.keys = layer.keys[:, :, :length]
            layer.values = layer.values[:, :, :length]
