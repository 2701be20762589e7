"""Hostile input and faults around results (issue 16, classes 4 and 6): a re-run never destroys
finished results, Ctrl-C / SIGTERM never loses trained steps, a refused resume names what differs.
The one-line errors run through ``turbolm.cli.main`` in one child process (tests/hostile.py); the
signals are real (sent to this process, or to a real ``python -m turbolm`` for ``draft train``)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from hostile import Case, assert_clean_error, child_env, run_cli_cases

from turbolm import TurboLMError
from turbolm.bench import SpecBenchConfig, run_spec_bench
from turbolm.core.interrupts import Interrupted, sigterm_as_interrupt, stop_at_safe_point

QUESTIONS = [
    {"question_id": 1, "category": "writing", "turns": ["Write a short poem about the sea.", "Now the sky."]},
    {"question_id": 2, "category": "qa", "turns": ["The capital of France is Paris. What is the capital of France?"]},
    {"question_id": 3, "category": "qa", "turns": ["def add(a, b):\n    return a + b\n\nExplain add(a, b)."]},
]


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    path = tmp_path_factory.mktemp("questions") / "questions.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return path


def config(questions, out, **kw) -> SpecBenchConfig:
    return SpecBenchConfig(**{"questions": str(questions), "out": str(out), "methods": ["vanilla", "prompt-lookup"],
                              "max_new_tokens": 6, "warmup": 0, "tree": "fixed", **kw})


def stop_after(n: int, seen: list):
    def on_question(question, records):
        seen.append(question.question_id)
        if len(seen) == n:
            raise KeyboardInterrupt
    return on_question


def results_of(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


# --- bench spec: re-runs -------------------------------------------------------------------------


def test_a_rerun_resumes_and_keeps_what_was_measured(tiny, questions, tmp_path):
    """Ctrl-C after one question; a plain re-run is refused; --resume measures only the others."""
    out = tmp_path / "run"
    seen: list = []
    first = run_spec_bench(config(questions, out), target=tiny, on_question=stop_after(1, seen))
    assert first["interrupted"] and first["questions_measured"] == 1
    before = (out / "results.jsonl").read_bytes()
    with pytest.raises(TurboLMError, match="already holds a Spec-Bench run .1 question.*resume.*overwrite"):
        run_spec_bench(config(questions, out), target=tiny)
    assert (out / "results.jsonl").read_bytes() == before
    seen.clear()
    report = run_spec_bench(config(questions, out, resume=True), target=tiny, on_question=stop_after(99, seen))
    assert seen == [2, 3]  # question 1 is not measured again
    assert not report["interrupted"] and report["questions_measured"] == 3 and report["questions"]["resumed"] == 1
    assert [(r["question_id"], r["method"]) for r in results_of(out)][:2] == [(1, "vanilla"), (1, "prompt-lookup")]
    assert len(results_of(out)) == 6
    assert report["lossless"]["ok"] is True  # the resumed question is compared with vanilla too
    assert json.loads((out / "report.json").read_text())["questions_measured"] == 3


def test_a_resume_with_other_settings_names_them(tiny, questions, tmp_path):
    run_spec_bench(config(questions, tmp_path, limit=1), target=tiny)
    with pytest.raises(TurboLMError, match=r"other settings \(max_new_tokens: 6 -> 5, temperature: 0.0 -> 0.5\)"):
        run_spec_bench(config(questions, tmp_path, max_new_tokens=5, temperature=0.5, resume=True), target=tiny)
    with pytest.raises(TurboLMError, match="methods"):
        run_spec_bench(config(questions, tmp_path, methods=["vanilla"], resume=True), target=tiny)
    with pytest.raises(TurboLMError, match="not both"):
        run_spec_bench(config(questions, tmp_path, resume=True, overwrite=True), target=tiny)


def test_overwrite_never_replaces_results_with_fewer(tiny, questions, tmp_path):
    run_spec_bench(config(questions, tmp_path), target=tiny)
    files = {f: (tmp_path / f).read_bytes() for f in ("results.jsonl", "report.json", "report.md", "run.json")}
    seen: list = []
    report = run_spec_bench(config(questions, tmp_path, overwrite=True, max_new_tokens=4), target=tiny,
                            on_question=stop_after(1, seen))
    assert report["interrupted"] and report["kept_previous"]["questions"] == 3
    assert {f: (tmp_path / f).read_bytes() for f in files} == files  # the complete run is untouched
    assert len([json.loads(x) for x in (tmp_path / "results.new.jsonl").read_text().splitlines()]) == 2
    # A complete new run replaces it, even with fewer questions (they were asked for).
    report = run_spec_bench(config(questions, tmp_path, overwrite=True, max_new_tokens=4, limit=1), target=tiny)
    assert "kept_previous" not in report and report["questions_measured"] == 1
    assert len(results_of(tmp_path)) == 2 and not (tmp_path / "results.new.jsonl").exists()
    assert json.loads((tmp_path / "run.json").read_text())["settings"]["max_new_tokens"] == 4


def test_resume_after_a_kill_mid_line(tiny, questions, tmp_path):
    """A run killed while writing (a cut last line, a question half measured): resume measures
    the unfinished question again and keeps the finished ones."""
    run_spec_bench(config(questions, tmp_path, limit=2), target=tiny)
    lines = (tmp_path / "results.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "results.jsonl").write_text("".join(lines[:3]) + lines[3][:40])
    seen: list = []
    report = run_spec_bench(config(questions, tmp_path, resume=True), target=tiny, on_question=stop_after(99, seen))
    assert seen == [2, 3] and report["questions_measured"] == 3 and len(results_of(tmp_path)) == 6


def test_sigterm_is_ctrl_c_for_the_benchmark(tiny, questions, tmp_path):
    previous = signal.getsignal(signal.SIGTERM)

    def terminate(question, records):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # the handler runs at once; never reached

    with sigterm_as_interrupt():
        report = run_spec_bench(config(questions, tmp_path), target=tiny, on_question=terminate)
    assert report["interrupted"] and report["questions_measured"] == 1
    assert json.loads((tmp_path / "report.json").read_text())["interrupted"] is True
    assert signal.getsignal(signal.SIGTERM) is previous


def test_stop_at_safe_point():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with stop_at_safe_point() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert stop.requested  # the first signal only asks
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # the second one stops at once
            time.sleep(1)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


# --- training: Ctrl-C / SIGTERM saves the state --------------------------------------------------


class _SignallingReference:
    """A held-out reference whose KL is a function of the router, sending ``signum`` to this
    process at its ``at``-th use (inside a training step, as a user's Ctrl-C would arrive)."""

    def __init__(self, at: int | None = None, signum=signal.SIGTERM):
        self.at, self.signum, self.calls = at, signum, 0

    def kl(self, pruner):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), self.signum)
        return float(sum(p.detach().abs().sum() for p in pruner.router.parameters()))


def test_router_training_saves_on_sigterm_and_resumes_exactly(three_layer_llama, tmp_path):
    from turbolm.pruning.train import RouterTrainConfig, train_router

    model, _ = three_layer_llama
    chunks = torch.randint(3, 300, (12, 16), generator=torch.Generator().manual_seed(0))
    cfg = RouterTrainConfig(steps=5, batch_size=2, save_every=100, eval_every=1)
    full, _ = train_router(model, chunks, [0.3] * 3, tmp_path / "a", cfg, reference=_SignallingReference(),
                           progress=False, log=lambda *_: None)
    with pytest.raises(Interrupted, match="step 2; the training state is saved in .* continue with --resume"):
        train_router(model, chunks, [0.3] * 3, tmp_path / "b", cfg, reference=_SignallingReference(at=3),
                     progress=False, log=lambda *_: None)  # the signal comes inside step 2, which finishes
    assert json.loads((tmp_path / "b" / "train" / "latest.json").read_text())["step"] == 2
    resumed, summary = train_router(model, chunks, [0.3] * 3, tmp_path / "b", cfg, reference=_SignallingReference(),
                                    resume=True, progress=False, log=lambda *_: None)
    assert summary["steps"] == 5
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b)
    with pytest.raises(TurboLMError, match=r"other settings \(lr: 0.001 -> 0.002\)"):
        cfg.lr = 2e-3
        train_router(model, chunks, [0.3] * 3, tmp_path / "b", cfg, resume=True, progress=False, log=lambda *_: None)


@pytest.mark.slow  # a real process (~6 s): runs with `make test`, as CI does
def test_ctrl_c_during_draft_training_saves_the_state(prepared, tiny_dir, tmp_path):
    """A real ``turbolm draft train`` process, Ctrl-C once it has logged: the steps trained
    are saved (atomically), one message says so, and --resume continues from there."""
    from turbolm.cli import main

    out = tmp_path / "draft"
    argv = ["draft", "train", "--data", str(prepared), "--out", str(out), "--target", str(tiny_dir), "--epochs", "500",
            "--batch-size", "4", "--eval-samples", "4", "--eval-depth", "2", "--save-every", "100000"]
    p = subprocess.Popen([sys.executable, "-m", "turbolm", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=child_env())
    try:
        deadline = time.time() + 120
        while not (out / "train_log.jsonl").is_file() and p.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert p.poll() is None, p.stderr.read().decode()
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    err = err.decode()
    assert p.returncode == 130 and "Traceback" not in err, err
    step = json.loads((out / "latest.json").read_text())["step"]
    assert step > 0 and f"interrupted at step {step}; the training state is saved in {out}" in err
    logged = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert max(logged) <= step  # nothing trained after the saved step
    assert main([*argv, "--resume", "--max-steps", "3"]) == 0
    assert json.loads((out / "latest.json").read_text())["step"] == step + 3


# --- one-line errors through the command line ----------------------------------------------------


def test_command_line_errors(tiny_dir, prepared, questions, tmp_path):
    m = ["--model", str(tiny_dir)]
    bench = ["bench", "spec", "--questions", str(questions), *m, "--methods", "vanilla,prompt-lookup",
             "--max-new-tokens", "4", "--limit", "1", "--warmup", "0", "--tree", "fixed", "--out", str(tmp_path / "b")]
    text = tmp_path / "text.txt"
    text.write_text("The capital of France is Paris. " * 40)
    pbench = ["prune", "bench", *m, "--router", "static", "--sparsity", "0.3", "--text-file", str(text)]
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps([{"instruction": f"Question {i}?", "input": "", "output": f"It is {i}. " * 3}
                                for i in range(40)]))
    common = ["--data", str(data), *m, "--seq-len", "32", "--calibration", "3", "--population", "4"]
    search = ["prune", "search", "--sparsity", "0.3", "--out", str(tmp_path / "search.json"), "--generations", "1",
              *common]
    ptrain = ["prune", "train", "--sparsity", "0.3", "--out", str(tmp_path / "pruner"), "--steps", "2",
              "--finetune-generations", "0", *common]
    draft = ["draft", "train", "--data", str(prepared), "--out", str(tmp_path / "draft"), "--target", str(tiny_dir),
             "--batch-size", "4", "--eval-samples", "4", "--eval-depth", "2", "--max-steps", "2"]
    damaged = _damaged_draft_state(prepared, tiny_dir, tmp_path / "damaged")
    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps({"query": "Paris is in", "choices": ["France", "Italy"], "gold": 0}) + "\n")
    (tmp_path / "evalout").mkdir()
    cases = {  # name: (argv, fragments of the one-line error; None: must succeed)
        "bench run": (bench, None),
        "bench re-run": (bench, ["already holds a Spec-Bench run", "--resume", "--overwrite"]),
        "bench resume other settings": ([*bench[:-2], "--max-new-tokens", "3", "--resume", "--out", bench[-1]],
                                        ["other settings", "max_new_tokens: 4 -> 3", "--overwrite"]),
        "prune bench length 0": ([*pbench, "--prompt-length", "0"], ["--prompt-length", ">= 1"]),
        "prune bench length -5": ([*pbench, "--prompt-length", "-5"], ["--prompt-length", "-5"]),
        "prune bench length 100000": ([*pbench, "--prompt-length", "100000"], ["--prompt-length 100000", "context",
                                                                                "512"]),
        "prune bench repeat 0": ([*pbench, "--prompt-length", "8", "--repeat", "0"], ["--repeat", ">= 1"]),
        "prune search": (search, None),
        "prune search re-run": (search, ["already holds a schedule search", "--resume", "--out"]),
        "prune search resume other settings": ([*search, "--resume", "--seed", "3"], ["other settings", "seed: 0 -> 3"]),
        "prune train": (ptrain, None),
        "prune train resume other settings": ([*ptrain, "--resume", "--lr", "0.01"],
                                              ["other settings", "lr: 0.001 -> 0.01", "--out"]),
        "draft train": (draft, None),
        "draft train resume other settings": ([*draft, "--resume", "--lr", "0.001"],
                                              ["other settings", "lr: 9e-05 -> 0.001"]),
        "draft train resume damaged state": ([*draft[:5], str(damaged), *draft[6:-2], "--resume"],
                                             ["cannot resume", "optimizer.safetensors"]),
        "eval out is a directory": (["eval", *m, "--task-file", str(task), "--out", str(tmp_path / "evalout")],
                                    ["cannot write", "evalout", "directory"]),
    }
    results = run_cli_cases([Case(argv) for argv, _ in cases.values()], tmp_path)
    for (name, (_, fragments)), result in zip(cases.items(), results):
        if fragments is None:
            assert result.returncode == 0, f"{name}: {result.stderr}"
        else:  # a resume's settings are known once the data is read, after its "data: ..." line
            result.stderr = "".join(line for line in result.stderr.splitlines(keepends=True)
                                    if not line.startswith("data: "))
            assert_clean_error(result, *fragments)



def _damaged_draft_state(prepared, tiny_dir, out):
    """A draft training state whose optimizer.safetensors is cut in half (a disk that filled up)."""
    from turbolm.speculative.draft.train import TrainConfig, train

    train(TrainConfig(data=str(prepared), out=str(out), target=str(tiny_dir), batch_size=4, eval_samples=4,
                      eval_depth=2, max_steps=2), progress=False)
    state = out / json.loads((out / "latest.json").read_text())["state"]
    data = (state / "optimizer.safetensors").read_bytes()
    (state / "optimizer.safetensors").write_bytes(data[: len(data) // 2])
    return out
