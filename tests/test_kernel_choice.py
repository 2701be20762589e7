"""Kernels chosen by measurement (turbolm.core.kernels): the table follows injected timings bucket by
bucket and keeps ``default`` within the margin; its cache round-trips, and a damaged or unwritable
cache costs a measurement, never the run; a model under a mixed table gives plain F.linear's logits
at every row count; restore() gives plain nn.Linear back; ``turbolm info`` reports the table and the
bandwidth bound. Timings are injected or only checked for shape: nothing here depends on speed."""

import copy
import json
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from turbolm import load_target
from turbolm.cli import main
from turbolm.core import kernels
from turbolm.core.errors import ParameterError
from turbolm.core.kernels import (
    BUCKETS,
    DEFAULT,
    PACKED,
    TRANSPOSED,
    FastLinear,
    KernelTable,
    apply_fast_cpu,
    choose,
    fast_cpu_mode,
    is_optimized,
    kernel_table,
    optimize_for_small_batches,
    optimize_like,
    restore,
    table_of,
)
from turbolm.core.machine import bytes_per_token, decoding_bound, memory_bandwidth

pytestmark = pytest.mark.skipif(not kernels.available(), reason="this PyTorch build has no oneDNN")


class Timer:
    """Stands in for a pass over a group's weights: seconds from ``times(group, rows, kernel)``,
    counting the calls."""

    def __init__(self, times):
        self.times, self.calls = times, []

    def __call__(self, group, rows, kernel):
        self.calls.append((group, rows, kernel))
        return self.times(group, rows, kernel)


def scripted(group, rows, kernel):
    """layers: packed clearly faster at 2..16 rows, 3% faster at 32 (within the margin), slower from 64
    and at 1 row; lm_head: transposed fastest at 1 row, packed 10% faster from 2 rows."""
    if kernel == DEFAULT:
        return 1.0
    if group == "layers":
        return {1: 1.2, 2: 0.5, 4: 0.5, 8: 0.6, 16: 0.8, 32: 0.97}.get(rows, 1.5)
    return 0.6 if kernel == TRANSPOSED else 0.9


@pytest.fixture
def two_groups():
    """Small layers and one vocabulary-sized weight (the lm_head group); never run, only timed by a Timer."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 48), nn.Linear(48, 64, bias=False), nn.Linear(512, 8192, bias=False)).eval()
    return m.requires_grad_(False)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TURBOLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def table_files(cache):
    return sorted((cache / kernels.TABLES_DIR).glob("*.json"))


def test_the_table_follows_the_timings_bucket_by_bucket(two_groups):
    timer = Timer(scripted)
    table = kernel_table(two_groups, timer=timer, repeats=3, cache=False)
    assert table.source == "measured" and table.dtype is torch.float32
    assert table.kernels["layers"] == (DEFAULT, PACKED, PACKED, PACKED, PACKED, DEFAULT, DEFAULT, DEFAULT)
    assert table.kernels["lm_head"] == (TRANSPOSED,) + (PACKED,) * 7
    # Every candidate of every bucket, once to warm up and then 3 times, interleaved; transposed only at 1 row.
    per_round = len(BUCKETS) * 2 * 2 + 1
    assert len(timer.calls) == 4 * per_round and timer.calls[:per_round] == timer.calls[per_round:2 * per_round]
    assert {rows for g, rows, k in timer.calls if k == TRANSPOSED} == {1}
    assert table.timings_ms["layers"]["32"] == {"default": 1000.0, "packed": 970.0}


def test_a_small_budget_takes_fewer_rounds(two_groups):
    """No time for repeats (a loaded machine): the warm-up round's timings decide."""
    timer = Timer(lambda g, rows, k: 0.5 if (k == PACKED and rows == 2) else 1.0)
    table = kernel_table(two_groups, timer=timer, budget_s=0.0, cache=False)
    assert len(timer.calls) == len(BUCKETS) * 2 * 2 + 1
    assert table.kernels["layers"] == (DEFAULT, PACKED) + (DEFAULT,) * 6


def test_default_is_kept_within_the_margin():
    def timings(packed):
        return {"layers": {rows: {DEFAULT: 1.0, PACKED: packed} for rows in BUCKETS}}

    assert choose(timings(0.96))["layers"] == (DEFAULT,) * len(BUCKETS)
    assert choose(timings(0.94))["layers"] == (PACKED,) * len(BUCKETS)
    assert choose(timings(0.96), margin=0.0)["layers"] == (PACKED,) * len(BUCKETS)
    assert choose(timings(1.5))["layers"] == (DEFAULT,) * len(BUCKETS)


def test_a_forward_takes_the_smallest_bucket_at_or_above_its_rows():
    table = KernelTable(torch.float32, {"layers": (DEFAULT, PACKED, DEFAULT, PACKED, DEFAULT, DEFAULT, DEFAULT, PACKED)})
    assert [table.kernel("layers", r) for r in (1, 2, 3, 4, 5, 8, 9, 100, 128, 129, 1000)] == \
        [DEFAULT, PACKED, DEFAULT, DEFAULT, PACKED, PACKED, DEFAULT, PACKED, PACKED, DEFAULT, DEFAULT]


def test_cache_round_trip_and_busy_measurements(two_groups, cache):
    timer = Timer(scripted)
    first = kernel_table(two_groups, timer=timer, busy_cpus=None)
    (path,) = table_files(cache)
    entry = json.loads(path.read_text())
    assert entry["version"] == kernels.TABLE_VERSION and entry["dtype"] == "torch.float32"
    timer.calls.clear()
    again = kernel_table(two_groups, timer=timer)
    assert again.source == "cached" and not timer.calls and again.kernels == first.kernels
    # The choice is made again from the cached timings: another margin needs no measurement.
    assert kernel_table(two_groups, timer=timer, margin=0.6).kernels["layers"] == (DEFAULT,) * len(BUCKETS)
    # Another dtype or another set of shapes is another entry.
    kernel_table(nn.Linear(64, 40), timer=timer, busy_cpus=None)
    assert len(table_files(cache)) == 2 and timer.calls
    # Measured while other processes kept CPUs busy: used, not cached.
    path.unlink()
    timer.calls.clear()
    busy = kernel_table(two_groups, timer=timer, busy_cpus=-1.0)
    assert busy.source == "measured" and timer.calls and busy.kernels == first.kernels and not path.exists()


@pytest.mark.parametrize("damage", ["not json", "not an object", "negative", "a kernel missing", "other dtype"])
def test_a_damaged_cache_is_measured_again_and_repaired(two_groups, cache, caplog, damage):
    timer = Timer(scripted)
    kernel_table(two_groups, timer=timer, busy_cpus=None)
    (path,) = table_files(cache)
    entry = json.loads(path.read_text())
    if damage == "not json":
        path.write_text('{"timings_ms": {"layers"')
    elif damage == "not an object":
        path.write_text("[1, 2]")
    else:
        if damage == "negative":
            entry["timings_ms"]["layers"]["4"]["packed"] = -1.0
        elif damage == "a kernel missing":
            del entry["timings_ms"]["lm_head"]["1"]["transposed"]
        else:
            entry["dtype"] = "torch.bfloat16"
        path.write_text(json.dumps(entry))
    timer.calls.clear()
    with caplog.at_level(logging.WARNING, logger="turbolm.core.kernels"):
        table = kernel_table(two_groups, timer=timer, busy_cpus=None)
    assert table.source == "measured" and timer.calls
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0] and "damaged" in warnings[0]
    assert kernel_table(two_groups, timer=timer).source == "cached"  # repaired


def test_an_unwritable_cache_is_used_for_this_run_only(two_groups, tmp_path, monkeypatch, caplog):
    (tmp_path / "a_file").write_text("not a directory")
    monkeypatch.setenv("TURBOLM_CACHE", str(tmp_path / "a_file"))
    timer = Timer(scripted)
    with caplog.at_level(logging.WARNING, logger="turbolm.core.kernels"):
        table = kernel_table(two_groups, timer=timer, busy_cpus=None)
    assert table.kernels["lm_head"][0] == TRANSPOSED
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "cannot write" in warnings[0] and "this run only" in warnings[0]
    timer.calls.clear()
    assert kernel_table(two_groups, timer=timer, busy_cpus=None).source == "measured" and timer.calls


def test_nothing_to_choose_is_not_timed(two_groups):
    timer = Timer(scripted)
    for model in (copy.deepcopy(two_groups).half(), copy.deepcopy(two_groups).double()):
        table = kernel_table(model, timer=timer, cache=False)
        assert table.source == "none" and not table.fast and not timer.calls


# -- a model under a mixed table ---------------------------------------------------------------------
MIXED = (TRANSPOSED, PACKED, DEFAULT, TRANSPOSED, PACKED, DEFAULT, PACKED, TRANSPOSED)
ROWS = (1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 33, 64, 65, 100, 128, 129)


def _close(a, b, rel):
    return float((a.float() - b.float()).abs().max()) <= rel * max(1.0, float(b.float().abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_table_gives_plain_logits_at_every_row_count(tiny_dir, dtype):
    if dtype is torch.bfloat16 and not kernels.bf16_supported():
        pytest.skip("oneDNN has no bf16 kernels on this CPU")
    plain, _ = load_target(tiny_dir, dtype=dtype)
    model = copy.deepcopy(plain)
    table = KernelTable(dtype, {"layers": MIXED, "lm_head": MIXED}, "test")
    optimize_for_small_batches(model, table=table)
    assert table_of(model) is table and fast_cpu_mode(model) == "auto"
    n_linear = sum(type(m) is nn.Linear for m in plain.modules())
    assert sum(type(m) is FastLinear for m in model.modules()) == n_linear
    rel = 1e-4 if dtype is torch.float32 else 3e-2
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for n in ROWS:
            ids = torch.randint(3, 300, (1, n), generator=g)
            got, want = model(ids).logits, plain(ids).logits
            assert _close(got, want, rel), (dtype, n)
            if table.kernel("layers", n) == DEFAULT:  # F.linear itself: bit-identical
                assert torch.equal(got, want), n
    lm_head = model.get_output_embeddings().weight
    assert set(kernels._DERIVED[lm_head]) == {PACKED, TRANSPOSED}
    restore(model)
    assert sum(type(m) is nn.Linear for m in model.modules()) == n_linear and not is_optimized(model)
    assert not any("fast_plan" in vars(m) for m in model.modules()) and "turbolm_patches" not in vars(model)
    assert lm_head not in kernels._DERIVED and lm_head not in kernels._PLANS
    with torch.inference_mode():
        ids = torch.arange(3, 12)[None]
        assert torch.equal(model(ids).logits, plain(ids).logits)


def test_layers_whose_table_says_default_stay_plain(two_groups):
    """Only layers with a fast kernel at some row count are swapped; only the copies a table uses are kept."""
    m = copy.deepcopy(two_groups)
    optimize_for_small_batches(m, mode="auto", timer=Timer(lambda g, r, k: 1.0), cache=False)
    assert fast_cpu_mode(m) == "auto" and not is_optimized(m) and all(type(x) is nn.Linear for x in m)
    restore(m)
    optimize_for_small_batches(m, mode="auto", timer=Timer(scripted), cache=False)
    assert all(type(x) is FastLinear for x in m)
    with torch.inference_mode():
        x = torch.randn(3, 64)
        assert torch.allclose(m[0](x), F.linear(x, m[0].weight, m[0].bias), atol=1e-5)
    assert set(kernels._DERIVED[m[0].weight]) == {PACKED}
    # max_rows: a plan with fast kernels only above it is not swapped
    restore(m)
    late = KernelTable(torch.float32, {"layers": (DEFAULT,) * 5 + (PACKED,) * 3, "lm_head": (DEFAULT,) * 8})
    optimize_for_small_batches(m, max_rows=16, table=late)
    assert not is_optimized(m)
    optimize_for_small_batches(m, max_rows=17, table=late)  # 17 rows fall in the 32-row bucket
    assert type(m[0]) is FastLinear and type(m[2]) is nn.Linear and m[0].fast_plan.max_rows == 17
    restore(m)


def test_only_the_copies_a_table_uses_are_kept(monkeypatch):
    """A real (tiny) measurement makes every derived copy; those of kernels the table does not use go."""
    monkeypatch.setattr(kernels, "TRANSPOSED_MIN_NUMEL", 32 * 1000)  # the last layer is the "lm_head" group
    m = nn.Sequential(nn.Linear(64, 48), nn.Linear(48, 32), nn.Linear(32, 1000, bias=False)).eval()
    table = kernel_table(m, repeats=1, cache=False)
    assert table.source == "measured" and set(table.timings_ms) == {"layers", "lm_head"}
    for layer in m:
        used = set(table.kernels[kernels.group_of(layer.weight)]) - {DEFAULT}
        assert set(kernels._DERIVED.get(layer.weight, {})) == used


def test_modes_and_drafts_that_follow_their_target(two_groups):
    target = copy.deepcopy(two_groups)
    assert not apply_fast_cpu(target, "off") and fast_cpu_mode(target) == "off"
    with pytest.raises(ParameterError, match="fast_cpu"):
        apply_fast_cpu(target, "always")
    assert apply_fast_cpu(target, "on") and table_of(target).source == "on"
    assert table_of(target).kernels["layers"][0] == DEFAULT  # a 1-row small layer stays on the gemv
    draft = nn.Sequential(nn.Linear(64, 64)).eval()
    head = torch.randn(300, 64)  # a weight a draft scores with through kernels.linear
    optimize_like(draft, target, extra_weights=[head])
    assert type(draft[0]) is FastLinear and fast_cpu_mode(draft) == "on"
    with torch.inference_mode():
        x = torch.randn(4, 64)
        assert torch.allclose(kernels.linear(x, head), F.linear(x, head), atol=1e-5)
        assert PACKED in kernels._DERIVED[head]  # through the plan the patch registered for it
    restore(draft)
    assert head not in kernels._PLANS
    with torch.inference_mode():
        assert torch.equal(kernels.linear(x, head), F.linear(x, head))
    restore(target)
    plain = nn.Sequential(nn.Linear(64, 64))
    assert optimize_like(plain, target) is plain and type(plain[0]) is nn.Linear


# -- the bandwidth bound and turbolm info --------------------------------------------------------------
def test_bandwidth_probe_is_cached_and_bytes_count_what_a_token_reads(tiny, cache):
    first = memory_bandwidth(mb=2, repeats=2, busy_cpus=None)
    assert first["source"] == "measured" and first["gb_per_s"] > 0
    assert memory_bandwidth(mb=2, repeats=2)["source"] == "cached"
    assert memory_bandwidth(mb=3, repeats=1, busy_cpus=-1.0)["source"] == "measured"
    assert memory_bandwidth(mb=3, repeats=1)["source"] == "measured"  # the busy one was not cached
    model, _ = tiny
    embed = model.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    assert bytes_per_token(model) == total - (embed.shape[0] - 1) * embed.shape[1] * 4  # untied: one row a token
    tied = nn.Module()
    tied.emb = nn.Embedding(10, 4)
    tied.get_input_embeddings = lambda: tied.emb
    tied.get_output_embeddings = lambda: tied.emb
    assert bytes_per_token(tied) == 10 * 4 * 4
    bound = decoding_bound(model, 10.0, 25.0)
    assert bound["limit_tokens_per_s"] == pytest.approx(10e9 / bytes_per_token(model), rel=1e-3)
    assert bound["fraction_of_limit"] == pytest.approx(25.0 / bound["limit_tokens_per_s"], rel=1e-2)


def test_info_reports_the_kernel_table_and_the_bandwidth_bound(capsys, tiny_dir, cache):
    small = ["--model", str(tiny_dir), "--probe-mb", "2", "--decode-tokens", "4"]
    assert main(["info", *small, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    k = info["kernels"]
    assert k["fast_cpu"] == "auto" and k["dtype"] == "float32" and k["source"] in ("measured", "cached")
    assert k["rows"] == list(BUCKETS) and len(k["kernels"]["layers"]) == len(BUCKETS)
    assert set(k["timings_ms"]["layers"]["1"]) == {"default", "packed"}
    b = info["bandwidth"]
    assert b["probe_mb"] == 2 and b["gb_per_s"] > 0 and b["limit_tokens_per_s"] > 0 and b["tokens_per_s"] > 0
    assert b["bytes_per_token"] > 0 and b["fraction_of_limit"] == pytest.approx(b["tokens_per_s"] / b["limit_tokens_per_s"], rel=1e-2)
    assert main(["info", *small, "--fast-cpu", "on"]) == 0
    out = capsys.readouterr().out
    assert "kernels:" in out and "--fast-cpu on" in out and "packed" in out and "limit_tokens_per_s" in out
    assert main(["info", "--model", str(tiny_dir), "--probe-mb", "0"]) == 2
    assert "--probe-mb" in capsys.readouterr().err
