"""One GPU run that regenerates the draft-training answers and trains both drafts on them, inside
a time budget (issue 15: "regenerates answers and trains 10+ epochs within ~8 minutes with the
target computing features on the fly, bf16 autocast and large batches").

  python benchmarks/draft_gpu_run.py --target MODEL.gguf --data runs/recipe/mix.jsonl --out OUT --budget 540

1. `turbolm draft prepare --regenerate` on the device in bfloat16 (large batches, one shard per
   batch), stopped with SIGTERM when its share of the budget is spent: the whole shards stay;
   their token ids are exported to a token file (the regenerated data; it comes back in OUT,
   reusable on a CPU with `turbolm draft prepare --from-tokens` or `draft train --data`).
2. A short probe measures a training step; the epochs that fit the rest of the budget follow.
3. Jakiro and EAGLE-2 train at once (two processes on the one device) from the token file (this
   run's answers, then any --extra-tokens from earlier runs; the held-out samples are the last
   file's last), from noise or continued from a trained draft (--init-jakiro / --init-eagle2):
   the target computes the features in memory at the start, bf16 autocast, training-time test.
   A SIGTERM at the deadline saves their state (then the draft is the last saved step's).
4. OUT gets jakiro.tar / eagle2.tar (checkpoint, logs, curve) and this run's token file, xz-compressed,
   each in parts of 15 MiB (`cat jakiro.tar.* > jakiro.tar`; `cat regenerated.safetensors.xz.* | xz -d
   > regenerated.safetensors`), summary.json and run.log.

Dry run on a CPU with a tiny model (the test suite's): add --device cpu and small sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

T0 = time.monotonic()


def now() -> float:
    return time.monotonic() - T0


def say(msg: str) -> None:
    print(f"[{now():6.1f}s] {msg}", flush=True)


def turbolm(*args: str) -> list[str]:
    return [sys.executable, "-m", "turbolm", *args]


def shards_done(prep: Path) -> int:
    try:
        return len(json.loads((prep / "meta.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


def run_until(cmd: list[str], deadline: float, log: Path) -> int:
    """Run ``cmd`` (output to ``log``); SIGTERM it at ``deadline`` (seconds since start), then wait."""
    with open(log, "a") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        return wait_until([p], deadline)[0]


def wait_until(procs: list[subprocess.Popen], deadline: float, grace: float = 45) -> list[int]:
    """Wait for every process; at ``deadline`` send SIGTERM to those still running (they save and
    stop at a safe point), SIGKILL after ``grace`` more seconds."""
    while any(p.poll() is None for p in procs) and now() < deadline:
        time.sleep(0.5)
    for p in procs:
        if p.poll() is None:
            say(f"deadline: SIGTERM to pid {p.pid}")
            p.send_signal(signal.SIGTERM)
    end = now() + grace
    while any(p.poll() is None for p in procs) and now() < end:
        time.sleep(0.5)
    for p in procs:
        if p.poll() is None:
            p.kill()
    return [p.wait() for p in procs]


def train_args(a, name: str, arch: str, data: Path, work: Path, init: str | None = None) -> list[str]:
    return ["draft", "train", *(["--init", init] if init else []), "--data", str(data), "--out", str(work / name), "--arch", arch,
            "--target", a.target, "--target-dtype", a.target_dtype, "--mixed-precision", a.mixed_precision,
            "--draft-vocab-size", str(a.vocab), "--batch-size", str(a.batch), "--lr", str(a.lr),
            "--warmup-steps", str(a.warmup), "--ttt-steps", str(a.ttt), "--eval-samples", str(a.eval_samples),
            "--save-every", "100000",
            *(["--expert-size", str(a.jakiro_expert_size)] if arch == "jakiro" and a.jakiro_expert_size else [])]


def ship(src: Path, out: Path, max_parts: int) -> int:
    """``src`` into OUT as parts of at most 15 MiB (NAME.00, NAME.01, ...; `cat` joins them)."""
    data, size = src.read_bytes(), 15 * 2**20
    parts = [data[i : i + size] for i in range(0, len(data), size)]
    for i, chunk in enumerate(parts[:max_parts]):
        (out / f"{src.name}.{i:02d}").write_bytes(chunk)
    return len(parts)


def saved_state(d: Path) -> dict:
    """The training state.json that ``d/latest.json`` names."""
    return json.loads((d / json.loads((d / "latest.json").read_text())["state"] / "state.json").read_text())


def pack(src: Path, dst: Path) -> None:
    """src's files into the tar ``dst`` with the last saved training state (state.json: the run's
    settings and time, which `benchmarks/ship_draft.py` reads), and that step's draft weights
    when the run did not finish (no model.safetensors; `draft train --resume` goes on from it)."""
    keep = [p for p in sorted(src.iterdir()) if p.is_file()]
    if (src / "latest.json").is_file():
        state_dir = src / json.loads((src / "latest.json").read_text())["state"]
        keep += [p for p in [state_dir / "state.json"] if p.is_file()]
        if not (src / "model.safetensors").is_file():
            keep.append(state_dir / "draft.safetensors")
    with tarfile.open(dst, "w") as t:
        for p in keep:
            t.add(p, arcname=f"{src.name}/{p.relative_to(src)}")  # the layout latest.json names


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True, help="model source (a .gguf file or a model directory)")
    ap.add_argument("--data", required=True, help="chat rows (the recipe's mix.jsonl)")
    ap.add_argument("--out", required=True, help="where the results go ($OUT)")
    ap.add_argument("--work", default="/tmp/draft-gpu-run", help="scratch directory")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--budget", type=float, default=540, help="seconds for everything (default 540)")
    ap.add_argument("--regen-share", type=float, default=0.33, help="share of the budget for regeneration")
    ap.add_argument("--regen-batch", type=int, default=2048)
    ap.add_argument("--regen-max-new", type=int, default=256)
    ap.add_argument("--regen-temperature", type=float, default=0.0,
                    help="sample the answers at this temperature (default 0: greedy; see draft prepare --regen-temperature)")
    ap.add_argument("--max-length", type=int, default=768)
    ap.add_argument("--max-samples", type=int, default=None)
    ap.add_argument("--extra-tokens", nargs="*", default=[],
                    help="token files regenerated earlier, trained on too (after this run's; the held-out samples "
                         "are the last file's last)")
    ap.add_argument("--init-jakiro", default=None, help="continue this Jakiro draft (default: train from noise)")
    ap.add_argument("--jakiro-expert-size", type=int, default=0,
                    help="Jakiro's expert intermediate size (0: the hidden size; with --init-jakiro: that draft's)")
    ap.add_argument("--init-eagle2", default=None, help="continue this EAGLE-2 draft (default: train from noise)")
    ap.add_argument("--target-dtype", default="bfloat16")
    ap.add_argument("--mixed-precision", default="bf16")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--ttt", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--eval-samples", type=int, default=128)
    ap.add_argument("--probe-steps", type=int, default=20)
    ap.add_argument("--max-epochs", type=int, default=30)
    ap.add_argument("--parallel-slowdown", type=float, default=1.8,
                    help="a step's time with two trainings on the device / alone (a guess; the probe runs alone)")
    a = ap.parse_args()
    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log = out / "run.log"
    summary: dict = {"argv": sys.argv[1:], "stages": {}}

    import torch

    summary["device"] = torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu"
    say(f"device {summary['device']}, torch {torch.__version__}")

    # 1. regenerate (bounded), export the token ids
    prep = work / "prep"
    cmd = turbolm("draft", "prepare", "--target", a.target, "--data", a.data, "--out", str(prep), "--regenerate",
                  "--device", a.device, "--dtype", a.target_dtype, "--batch-size", str(a.regen_batch),
                  "--shard-size", str(a.regen_batch), "--regen-max-new-tokens", str(a.regen_max_new),
                  "--max-length", str(a.max_length), "--regen-temperature", str(a.regen_temperature),
                  *(["--max-samples", str(a.max_samples)] if a.max_samples else []))
    t = now()
    with open(log, "a") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        # its share of the budget, longer only until a first shard is whole (at most 0.6 of the budget)
        while p.poll() is None and (now() < a.budget * a.regen_share or not shards_done(prep)):
            if now() > a.budget * 0.6:
                break
            time.sleep(0.5)
        rc = wait_until([p], now())[0]
    from turbolm.speculative.draft.data import export_tokens, merge_tokens, read_meta

    tokens, new_tokens = work / "tokens.safetensors", work / "regenerated.safetensors"
    stage: dict = {"seconds": round(now() - t, 1), "exit": rc, "samples": 0}
    if shards_done(prep):
        meta = read_meta(prep)
        stage.update(samples=export_tokens(prep, new_tokens), rows_done=meta["rows_done"], tokens=meta["tokens"],
                     answer_tokens=meta["loss_tokens"], skipped=meta["skipped"])
        for f in prep.glob("shard-*.safetensors"):
            f.unlink()  # the stored features are not needed: training computes them in memory
    summary["stages"]["regenerate"] = stage
    say(f"regenerated: {stage}")
    sources = ([new_tokens] if stage["samples"] else []) + list(map(Path, a.extra_tokens))
    if not sources:
        say("nothing regenerated and no --extra-tokens: nothing to train on")
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        return 1
    n = merge_tokens(sources, tokens)  # this run's samples first, then the earlier ones
    stage["samples_with_extra"] = n
    say(f"training data: {len(sources)} token file(s), {n} samples")
    # this run's token ids, xz-compressed beside the training (they come back in parts of 15 MiB)
    packed = work / "regenerated.safetensors.xz"
    zipper = subprocess.Popen([sys.executable, "-c", "import lzma, shutil, sys\n"
                               "with open(sys.argv[1], 'rb') as s, lzma.open(sys.argv[2], 'wb', preset=6) as d:\n"
                               "    shutil.copyfileobj(s, d)", str(new_tokens), str(packed)]) if stage["samples"] else None

    # 2. probe one training step's time (alone)
    t = now()
    probe_n = a.probe_steps * a.batch + a.eval_samples + 1
    rc = run_until(turbolm(*train_args(a, "probe", "jakiro", tokens, work), "--max-samples", str(min(n, probe_n)),
                           "--epochs", "1", "--max-steps", str(a.probe_steps)), now() + 120, log)
    steps_per_epoch = -(-(n - a.eval_samples) // a.batch)
    try:
        state = saved_state(work / "probe")
        step_s = state["seconds"] / max(1, state["step"])
        left = a.budget - now() - 45 - 40  # the deadline margin, and each training's start (target, features)
        epochs = max(1, min(a.max_epochs, int(left / (steps_per_epoch * step_s * a.parallel_slowdown * 1.1))))
    except (OSError, ValueError, KeyError) as e:  # no probe state: train 10 epochs, the deadline still holds
        say(f"probe failed ({e!r}); see run.log")
        step_s, epochs = None, 10
    summary["stages"]["probe"] = {"seconds": round(now() - t, 1), "exit": rc, "step_seconds": step_s and round(step_s, 4),
                                  "steps_per_epoch": steps_per_epoch, "epochs": epochs}
    say(f"probe: {summary['stages']['probe']}")

    # 3. both drafts at once
    t = now()
    procs = []
    for name, arch, init in (("jakiro", "jakiro", a.init_jakiro), ("eagle2", "eagle2", a.init_eagle2)):
        (work / name).mkdir()
        f = open(work / name / "console.log", "w")
        procs.append(subprocess.Popen(turbolm(*train_args(a, name, arch, tokens, work, init), "--epochs", str(epochs)),
                                      stdout=f, stderr=subprocess.STDOUT))
    codes = wait_until(procs, a.budget - 45, grace=25)
    summary["stages"]["train"] = {"seconds": round(now() - t, 1), "exit": codes}
    for name in ("jakiro", "eagle2"):
        d = work / name
        rows = [json.loads(line) for line in (d / "train_log.jsonl").read_text().splitlines()] if (d / "train_log.jsonl").is_file() else []
        evals = [r for r in rows if "eval" in r]
        summary[name] = {"finished": (d / "model.safetensors").is_file(), "steps": max((r["step"] for r in rows), default=0),
                         "last_eval": evals[-1] if evals else None}
        if d.is_dir():
            pack(d, work / f"{name}.tar")
            summary[name]["tar_parts"] = ship(work / f"{name}.tar", out, 2)
    say(f"trained: {summary['stages']['train']}; jakiro {summary['jakiro']}; eagle2 {summary['eagle2']}")

    # 4. this run's compressed token file in parts (cat them, then xz -d), and the summary
    if zipper is not None:
        zipper.wait(timeout=max(5, a.budget - now()))
        parts = ship(packed, out, 2)
        summary["tokens_file"] = {"bytes": new_tokens.stat().st_size, "xz_bytes": packed.stat().st_size,
                                  "parts": parts, "complete": parts <= 2}
    summary["seconds"] = round(now(), 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    say(f"done in {now():.0f} s")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
