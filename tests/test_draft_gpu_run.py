"""benchmarks/draft_gpu_run.py, the script a lent GPU runs once (a broken one wastes the lease): the
whole chain on the CPU with the tiny model - regenerate, join earlier token files, probe, train
Jakiro (continued from a trained draft) and EAGLE-2 (from noise) at once, bring back both drafts
with their training state and this run's token ids."""

from __future__ import annotations

import json
import lzma
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_run_script_end_to_end_on_the_cpu(tmp_path, tiny_dir, tiny):
    from conftest import DRAFT_ROWS
    from turbolm.speculative.draft.data import export_tokens, prepare_features, read_tokens
    from turbolm.speculative.draft.model import load_draft
    from turbolm.speculative.draft.train import TrainConfig, train

    new_rows, old_rows = tmp_path / "new.json", tmp_path / "old.json"
    new_rows.write_text(json.dumps(DRAFT_ROWS[:12]))
    old_rows.write_text(json.dumps(DRAFT_ROWS[12:24]))
    prepare_features(tiny_dir, old_rows, tmp_path / "old", regenerate=True, regen_max_new_tokens=8, max_length=64,
                     progress=False)
    earlier = tmp_path / "earlier.safetensors"
    n_earlier = export_tokens(tmp_path / "old", earlier)
    init = tmp_path / "init-jakiro"
    assert train(TrainConfig(data=str(tmp_path / "old"), out=str(init), arch="jakiro", draft_vocab_size=32, epochs=1,
                             batch_size=4, eval_samples=4, target=str(tiny_dir)), progress=False)["finished"]

    out, work = tmp_path / "out", tmp_path / "work"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "draft_gpu_run.py"), "--device", "cpu", "--target", str(tiny_dir),
           "--data", str(new_rows), "--out", str(out), "--work", str(work), "--budget", "900", "--regen-share", "0.5",
           "--regen-batch", "4", "--regen-max-new", "8", "--max-length", "64", "--extra-tokens", str(earlier),
           "--init-jakiro", str(init), "--jakiro-expert-size", "64", "--batch", "4", "--eval-samples", "4", "--vocab", "32", "--lr", "1e-3",
           "--warmup", "1", "--probe-steps", "2", "--max-epochs", "1", "--target-dtype", "float32",
           "--mixed-precision", "no"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:] + (out / "run.log").read_text()[-2000:]

    summary = json.loads((out / "summary.json").read_text())
    regen = summary["stages"]["regenerate"]
    assert regen["samples"] > 0 and regen["samples_with_extra"] == regen["samples"] + n_earlier
    merged, _ = read_tokens(work / "tokens.safetensors")
    old, _ = read_tokens(earlier)
    assert [s.input_ids for s in merged[-n_earlier:]] == [s.input_ids for s in old]  # held out: the earlier file's last
    with open(out / "regenerated.safetensors.xz.00", "rb") as f:  # this run's answers come back, compressed
        (tmp_path / "regenerated.safetensors").write_bytes(lzma.decompress(f.read()))
    assert len(read_tokens(tmp_path / "regenerated.safetensors")[0]) == regen["samples"]

    for name, start in (("jakiro", str(init)), ("eagle2", "random")):
        assert summary[name]["finished"] and summary[name]["tar_parts"] == 1
        with tarfile.open(out / f"{name}.tar.00") as t:
            t.extractall(tmp_path / "back", filter="data")
        run_dir = tmp_path / "back" / name
        state = run_dir / json.loads((run_dir / "latest.json").read_text())["state"] / "state.json"
        config = json.loads(state.read_text())["config"]  # what ship_draft.py reads
        assert config["init"] == start and config["arch"] == name and config["data"] == str(work / "tokens.safetensors")
        assert config["expert_size"] == (64 if name == "jakiro" else 0)  # the tiny model's hidden size: the init's
        assert load_draft(run_dir, tiny[0]).config.draft_vocab_size == 32
