import json
import subprocess
import sys

import pytest

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
        (["--prompt", "hi", "--dtype", "int4"], "unsupported dtype"),
        (["--prompt", "hi", "--device", "tpu"], "device"),
        (["--prompt", "hi", "--temperature", "-1"], "temperature"),
    ],
)
def test_errors_are_one_line(capsys, tiny_dir, args, message):
    rc, out, err = run_cli(capsys, "generate", "--model", str(tiny_dir), *args)
    assert rc == 2
    assert err.startswith("turbolm: error:") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


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
