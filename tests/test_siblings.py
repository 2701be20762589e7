"""Sibling layers joined (turbolm.core.kernels._Siblings): q/k/v and gate/up computed as one product
give bit for bit the outputs of their own products with the same kernel, in fewer kernel calls; the
join is decided by measurement per kernel and cached; a module that feeds its siblings differently,
a weight changed in place, a quantised model, a deep copy and restore() all stay exact."""

import copy
import json

import pytest
import torch
from torch import nn

from conftest import make_model_dir
from turbolm import load_target
from turbolm.core import kernels
from turbolm.core.generation import forward, new_cache
from turbolm.core.kernels import (
    BUCKETS,
    DEFAULT,
    PACKED,
    FastLinear,
    KernelTable,
    choose_joins,
    kernel_table,
    linear_siblings,
    optimize_for_small_batches,
    restore,
)
from turbolm.core.quantize import INT4, INT8

pytestmark = pytest.mark.skipif(not kernels.available(), reason="this PyTorch build has no oneDNN")


def packed_table(dtype=torch.float32, joins=True, layers=PACKED):
    return KernelTable(dtype, {"layers": (layers,) * len(BUCKETS), "lm_head": (DEFAULT,) * len(BUCKETS)}, "test",
                       joins=(joins,) * len(BUCKETS))


class Calls:
    """Counts the kernel calls of single layers (``kernels._run``) and of joined groups."""

    def __init__(self, monkeypatch):
        self.single = self.joined = 0
        run, product = kernels._run, kernels._Siblings.product

        def counted_run(*a, **k):
            self.single += 1
            return run(*a, **k)

        def counted_product(group, kernel, x):
            out = product(group, kernel, x)
            self.joined += out is not None
            return out

        monkeypatch.setattr(kernels, "_run", counted_run)
        monkeypatch.setattr(kernels._Siblings, "product", counted_product)


def logits_after_cache(model, ids, prefix):
    with torch.inference_mode():
        cache = new_cache(model)
        forward(model, prefix, cache)
        return forward(model, ids, cache).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_joined_siblings_equal_their_own_products_bit_for_bit(tmp_path, arch, monkeypatch):
    path = make_model_dir(tmp_path, arch)
    apart, _ = load_target(path)
    joined, _ = load_target(path)
    optimize_for_small_batches(apart, table=packed_table(), join=False)
    optimize_for_small_batches(joined, table=packed_table())
    layers = joined.config.num_hidden_layers
    assert len(linear_siblings(joined)) == 2 * layers
    assert all(m.fast_siblings is None for m in apart.modules() if type(m) is FastLinear)
    calls = Calls(monkeypatch)
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, joined.config.vocab_size, (1, 20), generator=g)
    for n in (1, 2, 3, 8, 17):
        ids = torch.randint(0, joined.config.vocab_size, (1, n), generator=g)
        want = logits_after_cache(apart, ids, prefix)
        calls.single = calls.joined = 0
        got = logits_after_cache(joined, ids, prefix)
        assert torch.equal(got, want), (arch, n)
        # two forwards (the prefix, then n tokens): per layer 2 joined products, and o_proj, down_proj alone
        # (the tiny lm_head, too small for its own group, too)
        assert calls.joined == 2 * 2 * layers and calls.single == 2 * (2 * layers + 1), (calls.joined, calls.single)


def test_joins_follow_the_table_per_bucket(tiny_dir, monkeypatch):
    model, _ = load_target(tiny_dir)
    joins = tuple(rows == 1 for rows in BUCKETS)  # joined for one row only
    table = KernelTable(torch.float32, {"layers": (PACKED,) * len(BUCKETS), "lm_head": (DEFAULT,) * len(BUCKETS)},
                        "test", joins=joins)
    optimize_for_small_batches(model, table=table)
    calls = Calls(monkeypatch)
    with torch.inference_mode():
        model(torch.arange(3, 4)[None])
        assert calls.joined > 0
        calls.joined = 0
        model(torch.arange(3, 7)[None])
        assert calls.joined == 0


@pytest.mark.parametrize("scheme", [INT8, INT4])
def test_quantised_siblings_join_exactly(tiny_dir, scheme, monkeypatch):
    if not kernels.bf16_supported():
        pytest.skip("oneDNN has no bf16 kernels on this CPU")
    apart, _ = load_target(tiny_dir, dtype=scheme)
    joined, _ = load_target(tiny_dir, dtype=scheme)
    for model, join in ((apart, False), (joined, True)):
        optimize_for_small_batches(model, table=packed_table(torch.bfloat16, layers=scheme), join=join)
    calls = Calls(monkeypatch)
    prefix = torch.arange(5, 25)[None]
    for n in (1, 3):
        ids = torch.arange(30, 30 + n)[None]
        assert torch.equal(logits_after_cache(joined, ids, prefix), logits_after_cache(apart, ids, prefix)), (scheme, n)
    groups = {id(m.fast_siblings): m.fast_siblings for m in joined.modules() if type(m) is FastLinear and m.fast_siblings}
    made = [g.operands[scheme][1] is not None for g in groups.values()]
    # int8 forms always join; a packed int4 layout joins only where a probe product says it does
    # (the tiny model's widths need not fill the kernel's blocks): joined or not, the outputs are exact
    assert made and (all(made) if scheme == INT8 else True)
    assert calls.joined == sum(made) * 2 * 2  # the groups whose operand was made, in 2 forwards for each n


class Sibs(nn.Module):
    """q/k/v that a forward may feed from one tensor or from three."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(16, 16), nn.Linear(16, 8), nn.Linear(16, 8)

    def forward(self, x, y=None):
        y = x if y is None else y
        return self.q_proj(x), self.k_proj(y), self.v_proj(x)


def test_siblings_fed_different_inputs_stop_joining():
    torch.manual_seed(0)
    model = Sibs().eval().requires_grad_(False)
    plain = copy.deepcopy(model)
    optimize_for_small_batches(model, table=packed_table())
    group = model.q_proj.fast_siblings
    assert group is not None and group is model.v_proj.fast_siblings
    x, y = torch.randn(2, 16), torch.randn(2, 16)
    with torch.inference_mode():
        for a, b in zip(model(x), plain(x)):
            assert torch.allclose(a, b, atol=1e-6)
        assert group.on
        for a, b in zip(model(x, y), plain(x, y)):  # k_proj reads another tensor: computed alone
            assert torch.allclose(a, b, atol=1e-6)
        assert not group.on
        for a, b in zip(model(x), plain(x)):
            assert torch.allclose(a, b, atol=1e-6)


def test_a_weight_changed_in_place_is_joined_again_and_restore_is_exact(tiny_dir):
    model, _ = load_target(tiny_dir)
    ids = torch.arange(3, 12)[None]
    with torch.inference_mode():
        want = model(ids).logits
    optimize_for_small_batches(model, table=packed_table())
    layer = model.get_decoder().layers[0]
    with torch.inference_mode():
        assert torch.allclose(model(ids).logits, want, atol=1e-5)
    with torch.no_grad():
        layer.self_attn.k_proj.weight.mul_(2.0)
    with torch.inference_mode():
        changed = model(ids).logits
    restore(model)
    assert not any("fast_siblings" in vars(m) for m in model.modules())
    with torch.inference_mode():
        assert torch.allclose(changed, model(ids).logits, atol=1e-5)  # the joint operand followed the weight
        layer.self_attn.k_proj.weight.div_(2.0)
        assert torch.equal(model(ids).logits, want)


def test_a_deep_copy_gets_its_own_groups(tiny_dir):
    model, _ = load_target(tiny_dir)
    optimize_for_small_batches(model, table=packed_table())
    ids = torch.arange(3, 12)[None]
    with torch.inference_mode():
        want = model(ids).logits
    twin = copy.deepcopy(model)
    a, b = model.get_decoder().layers[0].mlp, twin.get_decoder().layers[0].mlp
    assert b.gate_proj.fast_siblings is not a.gate_proj.fast_siblings
    assert b.gate_proj.fast_siblings.members == [b.gate_proj, b.up_proj]
    with torch.inference_mode():
        assert torch.equal(twin(ids).logits, want)


def test_the_join_is_decided_per_kernel_by_its_average_gain():
    kinds = (INT4, INT4, PACKED, PACKED, PACKED, DEFAULT, DEFAULT, DEFAULT)
    timings = {1: {"apart": 1.0, "joined": 0.8}, 2: {"apart": 1.0, "joined": 1.05},  # int4: mean 0.925
               4: {"apart": 1.0, "joined": 0.97}, 8: {"apart": 1.0, "joined": 0.96}, 16: {"apart": 1.0, "joined": 0.95}}
    assert choose_joins(kinds, timings) == (True, True, False, False, False, False, False, False)
    assert choose_joins(kinds, timings, margin=0.0) == (True, True, True, True, True, False, False, False)
    assert choose_joins(kinds, {}) == (False,) * len(BUCKETS)


def test_join_timings_are_measured_cached_and_checked(tiny_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TURBOLM_CACHE", str(tmp_path / "cache"))
    model, _ = load_target(tiny_dir)
    calls = []

    def timer(group, rows, kernel):  # packed everywhere; joining saves 20%
        calls.append((group, rows, kernel))
        if group == "siblings":
            return 0.8 if kernel == "joined" else 1.0
        return 1.0 if kernel == DEFAULT else 0.5

    table = kernel_table(model, timer=timer, repeats=1, busy_cpus=None)
    assert table.joins == (True,) * len(BUCKETS) and set(table.joins_ms) == {str(r) for r in BUCKETS}
    assert {(rows, how) for g, rows, how in calls if g == "siblings"} == {(r, h) for r in BUCKETS for h in ("apart", "joined")}
    calls.clear()
    again = kernel_table(model, timer=timer)
    assert again.source == "cached" and not calls and again.joins == table.joins
    assert not kernel_table(model, timer=timer, join=False).joins[0]  # join=False: nothing joined, nothing timed
    assert not calls
    (path,) = (tmp_path / "cache" / kernels.TABLES_DIR).glob("*.json")
    entry = json.loads(path.read_text())
    entry["joins_ms"]["4"]["joined"] = "fast"
    path.write_text(json.dumps(entry))
    measured = kernel_table(model, timer=timer, busy_cpus=None)
    assert measured.source == "measured" and calls and "damaged" in caplog.text


def test_tree_timings_are_keyed_by_the_kernels(tiny_dir):
    """--tree auto's cached step timings belong to the kernels they were taken with: joining (or a
    new kernel choice) times the trees again."""
    from turbolm.speculative import PromptLookupProposer, TreeConfig
    from turbolm.speculative.sizing import timing_key

    model, _ = load_target(tiny_dir)
    proposer = PromptLookupProposer(TreeConfig(total_tokens=8, depth=4, top_k=2))
    keys = [timing_key(model, proposer, "x")]
    for table in (packed_table(), packed_table(joins=False)):
        optimize_for_small_batches(model, table=table)
        keys.append(timing_key(model, proposer, "x"))
    assert len(set(keys)) == 3
