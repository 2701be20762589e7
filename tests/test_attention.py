"""turbolm_sdpa (core.attention): masked grouped-query attention without copying keys/values,
the same logits as transformers' sdpa; switched on by load_target for CPU models, restorable."""

from __future__ import annotations

import torch

from conftest import make_model_dir
from turbolm import load_target
from turbolm.core.attention import NAME, attention_of, use_gqa_attention
from turbolm.core.generation import forward, new_cache


def _tree_mask(n_past: int, n: int) -> torch.Tensor:
    allowed = torch.ones(n, n_past + n, dtype=torch.bool)
    allowed[:, n_past:] = torch.ones(n, n, dtype=torch.bool).tril()
    if n > 3:
        allowed[3:, n_past + 1] = False  # a branch: later nodes do not see node 1
    return torch.zeros(1, 1, n, n_past + n).masked_fill(~allowed, torch.finfo(torch.float32).min)


def _masked_logits(model, ids, n_past, n):
    cache = new_cache(model)
    forward(model, ids[:, :n_past], cache)
    return forward(model, ids[:, n_past:n_past + n], cache, attention_mask=_tree_mask(n_past, n),
                   position_ids=torch.arange(n_past, n_past + n)[None]).logits


def test_load_target_switches_cpu_gqa_models_and_the_logits_do_not_change(tiny_dir, monkeypatch):
    model, _ = load_target(tiny_dir)  # 4 query heads on 2 key/value heads
    assert attention_of(model) == NAME
    ids = torch.randint(3, 300, (1, 30), generator=torch.Generator().manual_seed(0))
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        calls.append((q.shape[1], k.shape[1], kw.get("enable_gqa", False)))
        return sdpa(q, k, v, **kw)

    with torch.no_grad():
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        ours = {n: _masked_logits(model, ids, 20, n) for n in (1, 6)}
        monkeypatch.undo()
        assert (4, 2, True) in calls  # the masked tree ran on the kernel's grouped heads, no copy
        model.set_attn_implementation("sdpa")
        for n, logits in ours.items():
            torch.testing.assert_close(logits, _masked_logits(model, ids, 20, n), rtol=1e-5, atol=1e-5)


def test_other_implementations_and_plain_heads_are_left_alone(tiny_dir, tmp_path):
    eager, _ = load_target(tiny_dir, attn_implementation="eager")
    assert attention_of(eager) == "eager" and use_gqa_attention(eager) is None
    plain, _ = load_target(make_model_dir(tmp_path, "llama", num_key_value_heads=4))
    assert attention_of(plain) == "sdpa" and use_gqa_attention(plain) is None
    model, _ = load_target(tiny_dir, attn_implementation="sdpa")
    assert attention_of(model) == "sdpa"
    assert use_gqa_attention(model) == "sdpa" and attention_of(model) == NAME
    model.set_attn_implementation("sdpa")
    assert attention_of(model) == "sdpa"


def test_one_query_runs_on_the_key_value_heads(tiny_dir, monkeypatch):
    """Decoding's single query is folded onto its key/value head (no enable_gqa, no copies), with a
    mask or without one, and the logits are sdpa's."""
    model, _ = load_target(tiny_dir)  # 4 query heads on 2 key/value heads
    ids = torch.randint(3, 300, (1, 30), generator=torch.Generator().manual_seed(1))
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        calls.append((tuple(q.shape[1:3]), k.shape[1], kw.get("enable_gqa", False)))
        return sdpa(q, k, v, **kw)

    def decode(masked: bool):
        cache = new_cache(model)
        forward(model, ids[:, :20], cache)
        calls.clear()
        extra = {"attention_mask": _tree_mask(20, 1), "position_ids": torch.tensor([[20]])} if masked else {}
        return forward(model, ids[:, 20:21], cache, **extra).logits

    with torch.no_grad():
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        ours = {}
        for m in (False, True):
            ours[m] = decode(m)
            assert set(calls) == {((2, 2), 2, False)}  # every layer: 2 kv heads with 2 queries each
        monkeypatch.undo()
        model.set_attn_implementation("sdpa")
        for m, logits in ours.items():
            torch.testing.assert_close(logits, decode(m), rtol=1e-5, atol=1e-5)


def test_one_query_with_a_mask_per_head():
    from transformers.integrations.sdpa_attention import repeat_kv

    from turbolm.core.attention import gqa_sdpa_forward

    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(2, 6, 1, 8, generator=g), torch.randn(2, 3, 9, 8, generator=g), torch.randn(2, 3, 9, 8, generator=g)
    mask = torch.zeros(2, 6, 1, 9).masked_fill(torch.rand(2, 6, 1, 9, generator=g) < 0.3, float("-inf"))
    mask[..., 0] = 0.0  # every head sees something
    module = torch.nn.Module()
    module.num_key_value_groups = 2
    out, _ = gqa_sdpa_forward(module, q, k, v, mask, scaling=0.5)
    want = torch.nn.functional.scaled_dot_product_attention(q, repeat_kv(k, 2), repeat_kv(v, 2), attn_mask=mask, scale=0.5)
    torch.testing.assert_close(out, want.transpose(1, 2), rtol=1e-6, atol=1e-6)
