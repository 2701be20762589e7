"""The composition layer: one factory per method package, used by the command line, the benchmark and
the evaluation alike; library errors name parameters, the command line names flags."""

from __future__ import annotations

import json

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


@pytest.mark.parametrize("spec, params", [
    (DecoderSpec("beam"), ("method",)),
    (DecoderSpec("none", depth=3), ("total_tokens", "depth", "top_k", "method")),
    (DecoderSpec("jakiro", tree="auto", top_k=2), ("tree", "total_tokens", "depth", "top_k")),
    (DecoderSpec("model"), ("method", "draft", "draft_layers")),
    (DecoderSpec("prompt-lookup", draft_layers=2), ("draft_layers", "method")),
    (DecoderSpec("prompt-lookup", candidate_mode="mixture"), ("candidate_mode", "method")),
    (DecoderSpec("jakiro", depth=0), ("depth",)),
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


def test_every_method_builds_and_is_lossless(tiny, jakiro_dir):
    model, tok = tiny
    ids = encode_prompt(tok, "Write a short poem about the sea")
    reference = generate(model, tok, ids, max_new_tokens=16)
    specs = [DecoderSpec("none"), DecoderSpec("prompt-lookup"), DecoderSpec("model", draft_layers=1, tree="fixed"),
             DecoderSpec("jakiro", draft=str(jakiro_dir), tree="fixed", total_tokens=6, depth=3, top_k=2)]
    for spec in specs:
        decoder = build_decoder(model, tok, spec)
        result = decoder.generate(ids, max_new_tokens=16)
        assert result.token_ids == reference.token_ids, spec
        assert "".join(decoder.stream(ids, max_new_tokens=16)) == reference.text, spec
        assert decoder.result.token_ids == reference.token_ids
        assert (decoder.tree is None) == (spec.method == "none") and decoder.tree_choice is None
    sampled = build_decoder(model, tok, DecoderSpec("none")).generate(ids, max_new_tokens=8,
                                                                     sampling=SamplingParams(temperature=1, seed=3))
    assert sampled.token_ids == generate(model, tok, ids, max_new_tokens=8,
                                         sampling=SamplingParams(temperature=1, seed=3)).token_ids


def _seed_tree_cache(model, tok, spec, grid, tmp_path, monkeypatch):
    """Put made-up timings and acceptance in the --tree auto cache for ``spec``: a choice then
    measures nothing, and which tree wins is known."""
    monkeypatch.setenv("TURBOLM_CACHE", str(tmp_path / "cache"))
    accepted = {"2": {"2": {"2": 0.9, "4": 1.2}}, "3": {"2": {"4": 1.3, "8": 2.4}}}
    entry = {"acceptance": {"accepted": accepted, "steps": 10, "calibration": {}},
             "verify_seconds": {"1": 0.01, "3": 0.011, "5": 0.012, "9": 0.013},
             "draft_seconds": {"2": {"2": 0.001}, "3": {"2": 0.0015}}}
    path = tmp_path / "cache" / "tree-sizing" / f"{tree_cache_key(model, tok, spec, grid)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entry))


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


def test_pruner_spec_and_factory(tiny, tmp_path):
    from turbolm.pruning import LearnedRouter, PrunerSpec, TokenPruner, build_pruned
    from turbolm.pruning.checkpoint import pruner_config, save_pruner

    model, tok = tiny
    for spec, params in [(PrunerSpec(), ("checkpoint", "method", "sparsity", "schedule")),
                         (PrunerSpec("static"), ("method", "sparsity", "schedule")),
                         (PrunerSpec("shortgpt", sparsity=1.5), ("method", "sparsity")),
                         (PrunerSpec("static", checkpoint="x"), ("checkpoint", "method")),
                         (PrunerSpec("random", sparsity=0.3, router="learned"), ("router", "checkpoint"))]:
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
