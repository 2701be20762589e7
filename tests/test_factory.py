"""The composition layer: one factory per method package, used by the command line, the benchmark and
the evaluation alike; library errors name parameters, the command line names flags."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import pytest
import torch

from turbolm import SamplingParams, TurboLMError, encode_prompt, generate
from turbolm.cli import build_parser, main
from turbolm.commands.common import error_message
from turbolm.commands.generate import decoder_spec
from turbolm.core.errors import ParameterError
from turbolm.speculative import DecoderSpec, build_decoder
from turbolm.speculative.draft.model import DraftConfig, DraftModel
from turbolm.speculative.factory import tree_cache_key
from turbolm.speculative.sizing import SizingGrid, timing_key
from turbolm.speculative.tree import TreeConfig


@pytest.fixture(scope="module")
def jakiro_dir(tiny, tmp_path_factory):
    target, _ = tiny
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("jakiro")
    DraftModel(DraftConfig.for_target(target, arch="jakiro")).save(d)
    return d


@pytest.fixture(scope="module")
def eagle2_dir(tiny, tmp_path_factory):
    target, _ = tiny
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("eagle2")
    DraftModel(DraftConfig.for_target(target, arch="eagle2")).save(d)
    return d


@pytest.mark.parametrize("spec, params", [
    (DecoderSpec("beam"), ("method",)),
    (DecoderSpec("none", depth=3), ("total_tokens", "depth", "top_k", "method")),
    (DecoderSpec("jakiro", tree="auto", top_k=2), ("tree", "total_tokens", "depth", "top_k")),
    (DecoderSpec("model"), ("method", "draft", "draft_layers")),
    (DecoderSpec("prompt-lookup", draft_layers=2), ("draft_layers", "method")),
    (DecoderSpec("prompt-lookup", candidate_mode="mixture"), ("candidate_mode", "method")),
    (DecoderSpec("jakiro", depth=0), ("depth",)),
    (DecoderSpec("jakiro", hybrid_mode="merge"), ("hybrid_mode", "method")),
    (DecoderSpec("hybrid", hybrid_mode="both"), ("hybrid_mode",)),
    (DecoderSpec("prompt-lookup", tree="auto"), ("tree", "method")),
])
def test_decoder_spec_errors_name_parameters(spec, params):
    with pytest.raises(ParameterError) as e:
        spec.check()
    assert e.value.params == params
    assert "--" not in str(e.value)  # the library speaks in parameter names
    assert all(p in str(e.value) for p in params)


def test_the_command_line_speaks_in_flags(capsys):
    assert main(["generate", "--prompt", "hi", "--speculative", "none", "--depth", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "turbolm: error: --total-tokens / --depth / --top-k need a --speculative other than none"
    assert main(["generate", "--prompt", "hi", "--temperature", "nan"]) == 2
    assert capsys.readouterr().err.strip() == "turbolm: error: --temperature must be a number >= 0, got nan"
    e = ParameterError("{} must be >= 1, got 0", "max_new_tokens")
    assert str(e) == "max_new_tokens must be >= 1, got 0" and error_message(e) == "--max-new-tokens must be >= 1, got 0"
    assert error_message(TurboLMError("plain")) == "plain"
    assert main(["generate", "--prompt", "hi", "--speculative", "jakiro", "--hybrid", "choose"]) == 2
    assert capsys.readouterr().err.strip() == "turbolm: error: --hybrid is only used with --speculative hybrid"


def test_every_method_builds_and_is_lossless(tiny, jakiro_dir, eagle2_dir):
    model, tok = tiny
    ids = encode_prompt(tok, "Write a short poem about the sea")
    reference = generate(model, tok, ids, max_new_tokens=16)
    specs = [DecoderSpec("none"), DecoderSpec("prompt-lookup"), DecoderSpec("model", draft_layers=1, tree="fixed"),
             DecoderSpec("jakiro", draft=str(jakiro_dir), tree="fixed", total_tokens=6, depth=3, top_k=2),
             DecoderSpec("hybrid", draft=str(jakiro_dir), tree="fixed", total_tokens=6, depth=3, top_k=2),
             DecoderSpec("hybrid", draft=str(eagle2_dir), hybrid_mode="choose", tree="fixed"),
             DecoderSpec("hybrid", draft=str(eagle2_dir), hybrid_mode="merge", tree="fixed")]
    for spec in specs:
        decoder = build_decoder(model, tok, spec)
        result = decoder.generate(ids, max_new_tokens=16)
        assert result.token_ids == reference.token_ids, spec
        assert "".join(decoder.stream(ids, max_new_tokens=16)) == reference.text, spec
        assert decoder.result.token_ids == reference.token_ids
        assert (decoder.tree is None) == (spec.method == "none") and decoder.tree_choice is None
        if spec.method == "hybrid":
            assert result.stats["hybrid"]["mode"] == (spec.hybrid_mode or "merge")
            assert decoder.proposer.drafter.draft.config.arch == ("jakiro" if spec.draft == str(jakiro_dir) else "eagle2")
    sampled = build_decoder(model, tok, DecoderSpec("none")).generate(ids, max_new_tokens=8,
                                                                     sampling=SamplingParams(temperature=1, seed=3))
    assert sampled.token_ids == generate(model, tok, ids, max_new_tokens=8,
                                         sampling=SamplingParams(temperature=1, seed=3)).token_ids


def _seed_tree_cache(model, tok, spec, grid, tmp_path, monkeypatch, acceptance=True):
    """Put made-up timings and (unless not ``acceptance``) acceptance in the --tree auto cache for
    ``spec``: a choice then measures nothing, and which tree wins is known."""
    monkeypatch.setenv("TURBOLM_CACHE", str(tmp_path / "cache"))
    accepted = {"2": {"2": {"2": 0.9, "4": 1.2}}, "3": {"2": {"4": 1.3, "8": 2.4}}}
    entry = {"verify_seconds": {"1": 0.01, "3": 0.011, "5": 0.012, "9": 0.013},
             "draft_seconds": {"2": {"2": 0.001}, "3": {"2": 0.0015}}}
    if acceptance:
        entry["acceptance"] = {"accepted": accepted, "steps": 10, "calibration": {}, "version": 2}
    path = tmp_path / "cache" / "tree-sizing" / f"{tree_cache_key(model, tok, spec, grid)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entry))
    # The fresh one-token step every use times first matches the seeded one: the timings are trusted.
    monkeypatch.setattr("turbolm.speculative.sizing.time_step", lambda target: entry["verify_seconds"]["1"])


def test_cli_and_benchmark_build_the_same_decoder(tiny, tiny_dir, jakiro_dir, tmp_path, monkeypatch):
    from turbolm.bench.specbench import SpecBenchConfig
    from turbolm.bench.specbench import decoder_spec as bench_decoder_spec

    model, tok = tiny
    args = build_parser().parse_args(["generate", "--prompt", "x", "--speculative", "jakiro", "--draft", str(jakiro_dir)])
    cli = decoder_spec(args)
    bench = bench_decoder_spec("jakiro", SpecBenchConfig(questions="q", out="o", drafts={"jakiro": str(jakiro_dir)},
                                                         tree="auto"))
    assert cli.auto_tree and bench.auto_tree
    assert tree_cache_key(model, tok, cli) == tree_cache_key(model, tok, bench)

    # ... and so the same tree, from the one cache entry both read.
    grid = SizingGrid(total_tokens=(2, 4, 8), depths=(2, 3), top_ks=(2,), verify_sizes=(1, 3, 5, 9))
    _seed_tree_cache(model, tok, cli, grid, tmp_path, monkeypatch)
    trees = {build_decoder(model, tok, s, grid=grid).tree for s in (cli, bench)}
    assert trees == {TreeConfig(8, 3, 2)}


def test_a_retrained_draft_gets_its_own_tree_timings(tiny, jakiro_dir, tmp_path):
    """The auto-tree cache key follows the draft's content, not its path (a retrained draft at the
    same path must not reuse the old draft's measurements), and the grid it was measured on."""
    model, tok = tiny
    spec = DecoderSpec("jakiro", draft=str(tmp_path / "d"))
    torch.manual_seed(1)
    DraftModel(DraftConfig.for_target(model, arch="jakiro")).save(tmp_path / "d")
    first = tree_cache_key(model, tok, spec)
    torch.manual_seed(2)
    DraftModel(DraftConfig.for_target(model, arch="jakiro")).save(tmp_path / "d")
    assert tree_cache_key(model, tok, spec) != first
    assert tree_cache_key(model, tok, spec, SizingGrid(depths=(1, 2))) != tree_cache_key(model, tok, spec)
    assert tree_cache_key(model, tok, DecoderSpec("jakiro", draft=str(jakiro_dir), candidate_mode="decoupled")) != \
        tree_cache_key(model, tok, DecoderSpec("jakiro", draft=str(jakiro_dir)))
    assert len(timing_key(model, build_decoder(model, tok, DecoderSpec("prompt-lookup")).proposer, "x")) == 16


def test_hybrid_auto_tree_and_stored_acceptance(tiny, tmp_path, monkeypatch):
    """A version-1 acceptance.json is used (and marked) for the draft alone and for hybrid choose,
    which sizes its draft as the draft alone; hybrid merge needs the table of merged trees, so it
    measures one (version 2) and counts the n-gram nodes in the verification cost."""
    model, tok = tiny
    torch.manual_seed(0)
    DraftModel(DraftConfig.for_target(model, arch="jakiro")).save(tmp_path / "d")
    old = {"accepted": {"2": {"2": {"2": 0.9, "4": 1.2}}, "3": {"2": {"4": 1.3, "8": 2.4}}}, "steps": 10,
           "calibration": {"tree": {"total_tokens": 64, "depth": 8, "top_k": 10}}}
    (tmp_path / "d" / "acceptance.json").write_text(json.dumps(old))
    grid = SizingGrid(total_tokens=(2, 4, 8), depths=(2, 3), top_ks=(2,), verify_sizes=(1, 3, 5, 9),
                      prompts=("Hello world",), max_new_tokens=8)
    specs = {m: DecoderSpec(m.split("-")[0], draft=str(tmp_path / "d"), hybrid_mode=(m.split("-") + [None])[1])
             for m in ("jakiro", "hybrid-choose", "hybrid-merge")}
    assert len({tree_cache_key(model, tok, s, grid) for s in specs.values()}) == 3
    for s in specs.values():
        _seed_tree_cache(model, tok, s, grid, tmp_path, monkeypatch, acceptance=False)
    for name, spec in specs.items():
        lines = []
        decoder = build_decoder(model, tok, spec, grid=grid, log=lines.append)
        choice = decoder.tree_choice
        measured = any("measuring" in line for line in lines)
        if name == "hybrid-merge":
            assert measured and choice.exact and "version-1" not in choice.explain()
            assert decoder.proposer.max_nodes == choice.tree.total_tokens + 10
        else:
            assert not measured and not choice.exact and "version-1" in choice.explain()
            assert choice.tree == TreeConfig(8, 3, 2) and choice.ngram_nodes == 0
        assert decoder.tree == choice.tree
    cached = json.loads(next(p for p in (tmp_path / "cache" / "tree-sizing").glob("*.json")
                             if "acceptance" in json.loads(p.read_text())).read_text())["acceptance"]
    assert cached["version"] == 2 and cached["ngram"]["settings"]["tree"]["total_tokens"] == 10


def test_pruner_spec_and_factory(tiny, tmp_path):
    from turbolm.pruning import LearnedRouter, PrunerSpec, TokenPruner, build_pruned
    from turbolm.pruning.checkpoint import pruner_config, save_pruner

    model, tok = tiny
    for spec, params in [(PrunerSpec(), ("checkpoint", "method", "sparsity", "schedule")),
                         (PrunerSpec("static"), ("method", "sparsity", "schedule")),
                         (PrunerSpec("shortgpt", sparsity=1.5), ("method", "sparsity")),
                         (PrunerSpec("static", checkpoint="x"), ("checkpoint", "method")),
                         (PrunerSpec("random", sparsity=0.3, router="learned"), ("router", "checkpoint")),
                         (PrunerSpec("shortgpt", sparsity=0.3, prefill_only=True), ("prefill_only",)),
                         (PrunerSpec("blockpruner", sparsity=0.3, dense_kv=True), ("dense_kv",))]:
        with pytest.raises(ParameterError) as e:
            spec.check()
        assert e.value.params == params
    router = LearnedRouter()
    save_pruner(tmp_path / "p", pruner_config(model, router, [0.2, 0.4], target_sparsity=0.3), router)
    ids = torch.tensor([encode_prompt(tok, "The capital of France is Paris. The capital of Italy is")])
    dense = model(ids).logits
    for spec in (PrunerSpec(checkpoint=str(tmp_path / "p")), PrunerSpec("static", sparsity=0.3)):
        pruned = build_pruned(model, tok, spec)
        assert isinstance(pruned.patch, TokenPruner) and pruned.token_level
        with pruned:
            assert not torch.equal(model(ids).logits, dense)
        assert torch.equal(model(ids).logits, dense)
        assert pruned.compute_removed() is not None and 0 < pruned.compute_removed() < 1


def test_auto_tree_when_sampling_sizes_from_a_sampled_table(tiny, tmp_path, monkeypatch):
    """A decoder built for sampling sizes its tree from statistics recorded sampling with the same
    settings: measured once and cached beside the greedy table (which stays and still serves greedy
    decoders), then read back; a stored acceptance.json's sampled table is used without measuring."""
    from turbolm.speculative import sizing

    model, tok = tiny
    torch.manual_seed(0)
    DraftModel(DraftConfig.for_target(model, arch="jakiro")).save(tmp_path / "d")
    grid = SizingGrid(total_tokens=(2, 4, 8), depths=(2, 3), top_ks=(2,), verify_sizes=(1, 3, 5, 9),
                      prompts=("Hello world",), max_new_tokens=8)
    t1 = SamplingParams(temperature=1.0, seed=5)
    greedy_spec = DecoderSpec("jakiro", draft=str(tmp_path / "d"))
    _seed_tree_cache(model, tok, greedy_spec, grid, tmp_path, monkeypatch)  # greedy: 8 / 3 / 2 wins
    assert build_decoder(model, tok, greedy_spec, grid=grid).tree_choice.tree == TreeConfig(8, 3, 2)

    recorded = []
    real = sizing.record_acceptance

    def record(*a, sampling=None, **k):
        recorded.append(sampling)
        return real(*a, sampling=sampling, **k)

    monkeypatch.setattr(sizing, "record_acceptance", record)
    lines = []
    choice = build_decoder(model, tok, replace(greedy_spec, sampling=t1), grid=grid, log=lines.append).tree_choice
    assert recorded == [t1] and any("temperature 1" in line for line in lines)
    path = next((tmp_path / "cache" / "tree-sizing").glob("*.json"))
    entry = json.loads(path.read_text())
    assert entry["acceptance"]["accepted"]["3"]["2"]["8"] == 2.4  # the greedy table kept
    (sampled,) = entry["sampled_acceptance"]
    assert sampled["sampling"] == {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
    assert choice.tokens_per_step == 1 + sampled["accepted"][str(choice.tree.depth)]["2"][str(choice.tree.total_tokens)]
    # Cached: no second recording, for this setting; greedy still reads its own table.
    build_decoder(model, tok, replace(greedy_spec, sampling=SamplingParams(temperature=1.0)), grid=grid)
    assert build_decoder(model, tok, greedy_spec, grid=grid).tree_choice.tree == TreeConfig(8, 3, 2)
    assert recorded == [t1]

    # Stored with the draft: the sampled table of acceptance.json is used, nothing measured.
    table = sizing.AcceptanceTable({"2": {"2": {"2": 0.5, "4": 0.6}}, "3": {"2": {"4": 0.7, "8": 0.8}}}, 10,
                                   version=2)
    table.sampled.append(asdict(sizing.AcceptanceTable({"2": {"2": {"2": 0.3, "4": 0.31}}, "3": {"2": {"4": 0.32,
                                                        "8": 0.33}}}, 10, version=2, sampling=sampled["sampling"])))
    table.save(tmp_path / "d" / "acceptance.json")
    path.unlink()
    _seed_tree_cache(model, tok, greedy_spec, grid, tmp_path, monkeypatch, acceptance=False)
    choice = build_decoder(model, tok, replace(greedy_spec, sampling=t1), grid=grid).tree_choice
    assert recorded == [t1] and choice.tokens_per_step == 1 + 0.3 and choice.tree == TreeConfig(2, 2, 2)
