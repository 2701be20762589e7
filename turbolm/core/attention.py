"""sdpa attention that leaves grouped-query heads to the kernel, masks or not.

transformers' ``sdpa`` attention, on a CPU, copies every key/value head once per query head
that shares it (``repeat_kv``) whenever a forward carries an attention mask and more than one
query - every speculative tree verification does. That copy grows with the context: for the
default model (9 query heads on 3 key/value heads), one layer's attention for a 10-node tree
takes 672 us after 940 tokens of context with the copy and 241 us without it (PyTorch's
``enable_gqa``; 2-core Xeon, measured); a whole 30-node verification forward after 900 tokens,
177 vs 157 ms. And for the one query of a decoding step without a mask it asks the kernel for
``enable_gqa``, whose CPU path is slow in bfloat16: one layer after 1,000 tokens of context
550 us, against 105 us with each key/value head's query heads folded into the query length
(``pack_gqa``, which transformers >= 5.2x uses only under a mask); an int4 token after 800 tokens of
context 33.9 -> 22.4 ms (2-core AMD EPYC, AVX-512 BF16, measured; float32 within noise).
:func:`use_gqa_attention` switches a model to ``turbolm_sdpa``: transformers' own sdpa function,
except that a single query is folded onto its key/value head (mask or not) and several queries
under a mask go to the kernel with ``enable_gqa=True``. The kernel computes the same attention
(the keys/values each query head reads are the same); the model's masks are sdpa's masks.

A registered attention implementation, through transformers' public ``AttentionInterface`` and
``AttentionMaskInterface`` and ``model.set_attn_implementation`` - no modeling file is touched,
and :func:`use_gqa_attention` returns what to restore.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "turbolm_sdpa"
#: attention implementations that compute what sdpa computes (for code that accepts sdpa only)
SDPA_LIKE = ("sdpa", NAME)


def gqa_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
                     **kwargs):
    """transformers' ``sdpa_attention_forward``, with grouped-query attention on the kernel's own
    heads: one query folded per key/value head, several queries under a mask with ``enable_gqa``."""
    groups = getattr(module, "num_key_value_groups", 1)
    one = query.shape[2] == 1
    mask_ok = attention_mask is None or attention_mask.dim() == 4
    if (groups <= 1 or not mask_ok or (attention_mask is None and not one) or kwargs.get("position_bias") is not None
            or kwargs.get("softcap") is not None or query.device.type != "cpu"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if attention_mask is not None:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    if one:
        batch, heads, _, dim = query.shape
        query = query.reshape(batch, heads // groups, groups, dim)
        if attention_mask is not None and attention_mask.shape[1] != 1:  # a mask per query head
            attention_mask = attention_mask.reshape(attention_mask.shape[0], heads // groups, groups, -1)
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                               dropout_p=dropout, scale=scaling)
        return out.reshape(out.shape[0], heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                                           scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, gqa_sdpa_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)


def attention_of(model) -> str:
    return getattr(model.config, "_attn_implementation", None) or "sdpa"


def use_gqa_attention(model) -> str | None:
    """Switch a CPU model that uses sdpa with grouped-query attention to ``turbolm_sdpa``.

    Returns the implementation to restore (``model.set_attn_implementation(previous)``), or None
    when nothing changed (another implementation, no grouped heads, not on a CPU).
    """
    config = model.config
    heads, kv_heads = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    if attention_of(model) != "sdpa" or not heads or not kv_heads or heads == kv_heads or model.device.type != "cpu":
        return None
    model.set_attn_implementation(NAME)
    return "sdpa"


def without_cudnn_attention():
    """A context in which scaled_dot_product_attention never picks the cuDNN backend (restored on
    exit). cuDNN builds a plan for every new shape; where shapes change every step - draft
    training on samples of varying length, batched generation with a growing cache - that
    dominates: measured on an H200 (torch 2.11), 10 draft-training steps of varying length took
    4.85 s with it and 0.70 s without, batched generation of 40 tokens 3.78 s vs 1.48 s. No effect
    on a CPU, where cuDNN is never used."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
