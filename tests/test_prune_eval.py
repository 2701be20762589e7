"""`turbolm eval` on pruned models: FTP pruners, static/random routers, ShortGPT, BlockPruner."""

from __future__ import annotations

import json

import pytest
import torch
from test_eval_harness import cmd_eval, eval_args, make_data_dir

from turbolm.core.errors import TurboLMError


@pytest.fixture()
def alpaca(tmp_path):
    rows = [{"instruction": f"Question {i}: what is {i} plus {i}?", "input": "", "output": f"It is {2 * i}. " * 4}
            for i in range(40)]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(rows))
    return path


@pytest.mark.parametrize("how", [["--baseline", "static", "--sparsity", "0.3"],
                                 ["--baseline", "random", "--sparsity", "0.4"],
                                 ["--baseline", "shortgpt", "--sparsity", "0.5"],
                                 ["--baseline", "blockpruner", "--sparsity", "0.3"],
                                 "pruner"])
def test_pruned_model_evaluation_end_to_end(tmp_path, tiny, tiny_dir, alpaca, monkeypatch, capsys, how):

    from turbolm.pruning import LearnedRouter
    from turbolm.pruning.checkpoint import pruner_config, save_pruner

    monkeypatch.setenv("TURBOLM_CACHE", str(tmp_path / "cache"))
    if how == "pruner":
        model, _ = tiny
        router = LearnedRouter()
        save_pruner(tmp_path / "p", pruner_config(model, router, [0.2, 0.4], target_sparsity=0.3), router)
        how = ["--pruner", str(tmp_path / "p")]
    data = make_data_dir(tmp_path / "data")
    args = eval_args(["--model", str(tiny_dir), "--tasks", "piqa,wikitext", "--data-dir", str(data), "--limit", "5",
                      "--context-length", "32", "--stride", "16", "--calibration-data", str(alpaca), "--json", *how])
    assert cmd_eval(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["results"]["piqa"]["n"] == 5 and report["results"]["wikitext"]["ppl"] > 1
    removed = report["pruning"]["work_removed"]
    assert removed is not None and 0.15 < removed <= 0.55
    assert report["pruning"]["kl_to_dense"] > 0
    token_level = "token_stats" in report["pruning"]
    assert report["config"]["equal_length_batches"] == token_level
    assert token_level == (how[0] == "--pruner" or how[1] in ("static", "random"))


def _fake_run(accs: dict, ppl: float, pruning: dict | None = None) -> dict:
    res = {t: {"acc": a, "acc_norm": a, "acc_stderr": 0.01, "acc_norm_stderr": 0.01, "n": 100} for t, a in accs.items()}
    res["wikitext"] = {"ppl": ppl, "acc": None, "n": 10, "tokens": 53802}
    run = {"model": "m", "config": {"limit": 100, "context_length": 512, "stride": 256}, "results": res}
    if pruning:
        run["pruning"] = pruning
    return run


def test_report_from_fake_results(tmp_path, capsys):
    from turbolm.cli import main

    dense = {"piqa": 0.70, "arc_easy": 0.45, "winogrande": 0.50}
    (tmp_path / "dense.json").write_text(json.dumps(_fake_run(dense, 20.0)))
    (tmp_path / "ftp.json").write_text(json.dumps(_fake_run({"piqa": 0.65, "arc_easy": 0.40, "winogrande": 0.51}, 25.0, {
        "method": "FTP (learned)", "target_sparsity": 0.3, "work_removed": 0.3, "kl_to_dense": 0.1})))
    (tmp_path / "sg.json").write_text(json.dumps(_fake_run({"piqa": 0.50, "arc_easy": 0.25, "winogrande": 0.50}, 100.0, {
        "method": "ShortGPT", "target_sparsity": 0.3, "work_removed": 0.3, "kl_to_dense": 1.0})))
    assert main(["prune", "report", "--results", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "report.json").read_text())
    assert summary["above_chance_tasks"] == ["piqa", "arc_easy"]  # winogrande is at chance
    rows = {r["method"]: r for r in summary["rows"]}
    assert rows["FTP (learned)"]["retention"] == pytest.approx((0.65 + 0.40 + 0.51) / (0.70 + 0.45 + 0.50))
    assert rows["FTP (learned)"]["above_chance_retention"] == pytest.approx((0.15 / 0.20 + 0.15 / 0.20) / 2)
    assert rows["ShortGPT"]["above_chance_retention"] == pytest.approx(0.0)
    assert rows["ShortGPT"]["ppl_ratio"] == pytest.approx(5.0)
    assert (tmp_path / "out" / "retention.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "| FTP (learned) | 30.0% |" in out
    assert "first 100 items of each" in out and "WikiText-2 (10 articles, 53,802 tokens): window 512, stride 256" in out
    # full task sets (no --limit) say so
    for f in tmp_path.glob("*.json"):
        run = json.loads(f.read_text())
        run["config"]["limit"] = None
        f.write_text(json.dumps(run))
    assert main(["prune", "report", "--results", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    assert "; all items of each." in capsys.readouterr().out


# --- scoring after a (pruned) prefill: `turbolm eval --after-prefill` ---------------------------------


def test_after_prefill_windows_score_every_token_once():
    from turbolm.evaluation.harness import rolling_windows

    tokens = list(range(100, 147))
    for length, stride in [(16, 4), (8, 3), (8, 1)]:
        windows = rolling_windows(tokens, 7, length, stride, first=stride)
        assert [t for _, cont in windows for t in cont] == tokens
        assert windows[0][0] == [7] and all(len(c) == stride for _, c in windows[:-1])
        assert all(len(ctx) + len(cont) - 1 <= length for ctx, cont in windows)
        assert len(windows[-2][0]) == length - stride + 1  # later windows: a full context before their tokens


def test_dense_scores_after_a_prefill_equal_one_forward(tiny):
    """Without a pruner, prefilling the context and running the continuation over the cache scores
    what one forward over both scores."""
    from turbolm.evaluation.harness import Scorer, hf_logits_fn, hf_prefill_fn

    model, tok = tiny
    gen = torch.Generator().manual_seed(0)
    requests = [(torch.randint(5, 300, (n,), generator=gen).tolist(), torch.randint(5, 300, (k,), generator=gen).tolist())
                for n, k in [(1, 6), (9, 1), (20, 12), (3, 3)]]
    plain = Scorer(hf_logits_fn(model), tok, max_length=24, progress=False).loglikelihood_tokens(requests)
    scorer = Scorer(hf_logits_fn(model), tok, max_length=24, progress=False, prefill_fn=hf_prefill_fn(model))
    after = scorer.loglikelihood_tokens(requests)
    assert scorer.calls == len(requests) and scorer.truncated == 1  # 20 + 12 > 24 + 1: cut from the left
    for (a, ga), (b, gb) in zip(plain, after):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb


def test_pruned_prefill_then_dense_continuation_is_what_decoding_sees(tiny):
    """With a prefill-only token pruner the continuation's scores are exactly those of decoding it
    token by token after the pruned prefill (serving's path), and differ from the dense model's."""
    from turbolm.core.generation import forward, new_cache
    from turbolm.evaluation.harness import hf_prefill_fn
    from turbolm.pruning.factory import PrunerSpec, build_pruned

    model, tok = tiny
    ids = torch.randint(5, 300, (1, 40), generator=torch.Generator().manual_seed(1))
    context, rest = ids[:, :32], ids[:, 32:]
    dense = hf_prefill_fn(model)(context, rest)
    pruned = build_pruned(model, tok, PrunerSpec(method="static", sparsity=0.5, prefill_only=True))
    pruned.attach()
    try:
        ours = hf_prefill_fn(model)(context, rest)
        with torch.inference_mode():
            cache = new_cache(model)
            steps = [forward(model, context, cache, logits_to_keep=1).logits]
            for t in range(rest.shape[1]):
                steps.append(forward(model, rest[:, t : t + 1], cache).logits)
        stepwise = torch.cat(steps, dim=1)
    finally:
        pruned.detach()
    assert ours.shape == (1, 9, model.config.vocab_size)
    assert torch.allclose(ours, stepwise, atol=1e-4)
    assert not torch.allclose(ours, dense, atol=1e-2)


def test_eval_after_prefill_end_to_end(tmp_path, tiny_dir, alpaca, monkeypatch, capsys):
    monkeypatch.setenv("TURBOLM_CACHE", str(tmp_path / "cache"))
    data = make_data_dir(tmp_path / "data")
    common = ["--model", str(tiny_dir), "--tasks", "wikitext", "--data-dir", str(data), "--limit", "3",
              "--context-length", "32", "--json"]
    runs = {}
    for name, extra in [("dense", []), ("dense_after", ["--after-prefill"]),
                        ("static", ["--baseline", "static", "--sparsity", "0.5", "--stride", "8"]),
                        ("static_after", ["--baseline", "static", "--sparsity", "0.5", "--after-prefill"])]:
        extra = extra + (["--calibration-data", str(alpaca)] if "--baseline" in extra else [])
        assert cmd_eval(eval_args(common + extra)) == 0
        runs[name] = json.loads(capsys.readouterr().out)
    after = runs["static_after"]
    assert after["config"]["after_prefill"] and after["config"]["stride"] == 8  # a quarter of the context
    assert not runs["static"]["config"]["after_prefill"]
    ppl = {k: r["results"]["wikitext"]["ppl"] for k, r in runs.items()}
    assert ppl["dense_after"] == pytest.approx(ppl["dense"], rel=0.01)  # (other windows: stride 8 vs 32)
    # the pruned prompt changes what follows it, and differently from skipping in every scored position
    # (which way is the real model's question: a random one is near uniform either way)
    assert abs(ppl["static_after"] / ppl["dense_after"] - 1) > 0.01
    assert abs(ppl["static_after"] / ppl["static"] - 1) > 0.01
    assert after["results"]["wikitext"]["tokens"] == runs["dense"]["results"]["wikitext"]["tokens"]
    with pytest.raises(TurboLMError, match="--after-prefill scores each window's last stride tokens .* give --stride "
                                         "below the context length"):
        cmd_eval(eval_args(common + ["--after-prefill", "--stride", "32"]))
