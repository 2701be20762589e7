"""`turbolm eval` on pruned models: FTP pruners, static/random routers, ShortGPT, BlockPruner."""

from __future__ import annotations

import json

import pytest
from test_eval_harness import cmd_eval, eval_args, make_data_dir


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
