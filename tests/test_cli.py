import json
import subprocess
import sys

import pytest
import torch

from turbolm.cli import main


def run_cli(capsys, *args):
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_generate_json(capsys, tiny_dir):
    rc, out, err = run_cli(capsys, "generate", "--prompt", "The capital of France is", "--model", str(tiny_dir),
                           "--max-new-tokens", "6", "--json")
    assert rc == 0
    d = json.loads(out)
    assert d["new_tokens"] == len(d["token_ids"]) == 6
    assert d["target_forwards"] == 6 and d["tau"] == 1.0 and d["seconds"] > 0
    assert isinstance(d["text"], str)


def test_generate_streams_text(capsys, tiny_dir):
    rc, out, err = run_cli(capsys, "generate", "--prompt", "Hello", "--model", str(tiny_dir), "--max-new-tokens", "5",
                           "--temperature", "0.8", "--top-p", "0.9", "--seed", "3")
    assert rc == 0 and "tokens/s" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", ""], "empty prompt"),
        (["--prompt", "word " * 700], "context is 512 tokens"),
        (["--prompt", "hi", "--dtype", "int3"], "unsupported dtype"),
        (["--prompt", "hi", "--device", "tpu"], "device"),
        (["--prompt", "hi", "--temperature", "-1"], "temperature"),
    ],
)
def test_errors_are_one_line(capsys, tiny_dir, args, message):
    rc, out, err = run_cli(capsys, "generate", "--model", str(tiny_dir), *args)
    assert rc == 2
    assert err.startswith("turbolm: error:") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.slow  # a fresh interpreter (~6 s): with the slow tests, to keep make test-fast short
def test_missing_model_no_traceback(tmp_path):
    p = subprocess.run([sys.executable, "-m", "turbolm.cli", "generate", "--prompt", "hi", "--model", str(tmp_path / "x")],
                       capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip().startswith("turbolm: error: model not found") and "Traceback" not in p.stderr


def test_info_json(capsys, tiny_dir):
    rc, out, _ = run_cli(capsys, "info", "--model", str(tiny_dir), "--json")
    d = json.loads(out)
    assert rc == 0 and d["torch_threads"] >= 1 and d["model"]["architecture"] == "LlamaForCausalLM"
    assert d["model"]["context_length"] == 512 and d["model"]["dtype"] == "float32"


@pytest.mark.parametrize("method", ["prompt-lookup", "model"])
def test_generate_speculative_json(capsys, tiny_dir, method):
    base = ["generate", "--prompt", "sea sky stars sea sky stars sea", "--model", str(tiny_dir), "--max-new-tokens", "20", "--json"]
    _, out, _ = run_cli(capsys, *base)
    extra = ["--draft-model", str(tiny_dir)] if method == "model" else []
    rc, out_spec, _ = run_cli(capsys, *base, "--speculative", method, "--total-tokens", "6", "--depth", "3", "--top-k", "2", *extra)
    assert rc == 0
    ref, d = json.loads(out), json.loads(out_spec)
    assert d["token_ids"] == ref["token_ids"] and d["method"] == method
    assert d["stats"]["tree"] == {"total_tokens": 6, "depth": 3, "top_k": 2}
    for key in ("steps", "tokens_per_step_histogram", "draft_seconds", "verify_seconds", "other_seconds"):
        assert key in d["stats"]
    if method == "model":  # the target drafting for itself: every proposal is accepted
        assert d["tau"] > 2


@pytest.mark.parametrize("mode", ["merge", "choose"])
def test_generate_hybrid_json(capsys, tiny_dir, tmp_path, mode):
    from turbolm import load_target
    from turbolm.speculative.draft.model import DraftConfig, DraftModel

    target, _ = load_target(tiny_dir)
    torch.manual_seed(0)
    DraftModel(DraftConfig.for_target(target)).save(tmp_path / "d")
    base = ["generate", "--prompt", "sea sky stars sea sky stars sea", "--model", str(tiny_dir), "--max-new-tokens", "20", "--json"]
    _, out, _ = run_cli(capsys, *base)
    rc, out_spec, _ = run_cli(capsys, *base, "--speculative", "hybrid", "--hybrid", mode, "--draft", str(tmp_path / "d"),
                              "--tree", "fixed")
    d = json.loads(out_spec)
    assert rc == 0 and d["token_ids"] == json.loads(out)["token_ids"] and d["method"] == "hybrid"
    assert d["stats"]["hybrid"]["mode"] == mode and d["stats"]["tree"] == {"total_tokens": 16, "depth": 4, "top_k": 4}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--speculative", "prompt-lookup", "--depth", "0"], "--depth must be >= 1, got 0"),
        (["--speculative", "prompt-lookup", "--total-tokens", "-3"], "--total-tokens must be >= 1, got -3"),
        (["--speculative", "model"], "needs --draft-model"),
        (["--depth", "3"], "need a --speculative other than none"),
        (["--speculative", "model", "--draft", "x"], "--draft is for jakiro / eagle2 / hybrid; --speculative model takes --draft-model"),
        (["--draft-model", "x"], "only used with --speculative model"),
        (["--speculative", "model", "--draft-layers", "5"], "--draft-layers must be in"),
    ],
)
def test_speculative_errors(capsys, tiny_dir, args, message):
    rc, _, err = run_cli(capsys, "generate", "--prompt", "hi", "--model", str(tiny_dir), *args)
    assert rc == 2 and message in err and err.count("\n") == 1


@pytest.mark.slow  # ~15 s: trains a draft
def test_draft_train_and_generate_with_jakiro(capsys, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TURBOLM_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": f"Count to {i}.", "input": "", "output": "one two three " * 3} for i in range(20)]))
    assert main(["draft", "prepare", "--target", str(tiny_dir), "--data", str(data), "--out", str(tmp_path / "f"),
                 "--max-length", "96"]) == 0
    rc = main(["draft", "train", "--data", str(tmp_path / "f"), "--out", str(tmp_path / "d"), "--target", str(tiny_dir),
               "--epochs", "1", "--batch-size", "4", "--eval-samples", "4", "--eval-depth", "2", "--max-steps", "2"])
    assert rc == 0 and "continue with --resume" in capsys.readouterr().out
    assert main(["draft", "train", "--data", str(tmp_path / "f"), "--out", str(tmp_path / "d"), "--target", str(tiny_dir),
                 "--epochs", "1", "--batch-size", "4", "--eval-samples", "4", "--eval-depth", "2", "--resume"]) == 0
    capsys.readouterr()
    base = ["generate", "--prompt", "Count to 3.", "--model", str(tiny_dir), "--max-new-tokens", "12", "--json"]
    rc, out, _ = run_cli(capsys, *base)
    rc2, out2, _ = run_cli(capsys, *base, "--speculative", "jakiro", "--draft", str(tmp_path / "d"), "--candidate-mode", "decoupled",
                           "--tree", "fixed")
    assert rc == rc2 == 0 and json.loads(out)["token_ids"] == json.loads(out2)["token_ids"]
    # Acceptance stored with the checkpoint, then --tree auto (the default) sizes the tree for this machine.
    assert main(["draft", "calibrate", "--draft", str(tmp_path / "d"), "--target", str(tiny_dir), "--max-new-tokens", "12"]) == 0
    assert (tmp_path / "d" / "acceptance.json").is_file() and "acceptance.json: " in capsys.readouterr().out
    rc3, out3, err3 = run_cli(capsys, *base, "--speculative", "jakiro", "--draft", str(tmp_path / "d"))
    assert rc3 == 0 and "tree auto:" in err3 and json.loads(out3)["token_ids"] == json.loads(out)["token_ids"]
    rc4, _, err4 = run_cli(capsys, *base, "--speculative", "jakiro", "--draft", str(tmp_path / "d"), "--tree", "auto", "--depth", "2")
    assert rc4 == 2 and "give one or the other" in err4
    rc, _, err = run_cli(capsys, "generate", "--prompt", "hi", "--speculative", "jakiro", "--draft", str(tmp_path / "d"))
    assert rc == 2 and "trained for a different target" in err  # the default model is not the tiny target


@pytest.mark.slow  # ~15 s: --tree auto times the whole grid
def test_demo_compares_with_vanilla(capsys, tiny_dir, tmp_path, monkeypatch):
    """The demo streams the speculative answers and ends with a vanilla-vs-speculative table."""
    from turbolm import load_target
    from turbolm.speculative.draft.model import DraftConfig, DraftModel

    monkeypatch.setenv("TURBOLM_CACHE", str(tmp_path / "cache"))
    target, _ = load_target(tiny_dir)
    DraftModel(DraftConfig.for_target(target)).save(tmp_path / "d")
    assert main(["draft", "calibrate", "--draft", str(tmp_path / "d"), "--target", str(tiny_dir), "--max-new-tokens", "8"]) == 0
    capsys.readouterr()
    rc = main(["demo", "--model", str(tiny_dir), "--draft", str(tmp_path / "d"), "--max-new-tokens", "10"])
    out, err = capsys.readouterr()
    assert rc == 0 and out.count(">>> ") == 3 and "tree auto:" in err
    table = out[out.index("| prompt |"):].splitlines()
    assert table[0].startswith("| prompt | tokens | vanilla tok/s | hybrid tok/s | speedup | tau | identical |")
    assert len(table) == 2 + 3 + 1 and all(line.endswith("| yes |") for line in table[2:])
    rc = main(["demo", "--model", str(tiny_dir), "--speculative", "none", "--max-new-tokens", "5"])
    assert rc == 0 and "| prompt | tokens | vanilla tok/s |" in capsys.readouterr().out
