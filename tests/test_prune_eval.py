"""`turbolm eval` on pruned models: FTP pruners, static/random routers, ShortGPT, BlockPruner."""

from __future__ import annotations

import json

import pytest

from test_eval_harness import eval_args, make_data_dir


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
    from turbolm.evaluation.command import cmd_eval
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
    token_level = "token_stats" in report["pruning"]
    assert report["config"]["equal_length_batches"] == token_level
    assert token_level == (how[0] == "--pruner" or how[1] in ("static", "random"))
