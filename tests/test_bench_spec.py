"""`turbolm bench spec`: every method on the same questions, multi-turn chats, the report and its
files, Ctrl-C, clear errors. Tiny random models; never checks speed."""

import json

import pytest
import torch

from turbolm import TurboLMError, encode_chat
from turbolm.bench import METHODS, SpecBenchConfig, run_spec_bench
from turbolm.bench import specbench as bench_spec
from turbolm.cli import main
from turbolm.speculative.draft.model import DraftConfig, DraftModel
from turbolm.speculative.sizing import SizingGrid

QUESTIONS = [
    {"question_id": 1, "category": "writing", "turns": ["Write a short poem about the sea.", "Now make it about the sky."]},
    {"question_id": 2, "category": "qa", "turns": ["The capital of France is Paris. What is the capital of France?"]},
    {"question_id": 3, "category": "qa"},  # malformed: no turns
    {"question_id": 2, "category": "qa", "turns": ["A duplicate id."]},  # malformed: skipped
    {"question_id": 4, "category": "qa", "turns": ["def add(a, b):\n    return a + b\n\nExplain add(a, b)."]},
]


@pytest.fixture
def questions(tmp_path):
    path = tmp_path / "question.jsonl"
    path.write_text("\n".join([json.dumps(q) for q in QUESTIONS] + ["{not json"]) + "\n")
    return path


@pytest.fixture(scope="module")
def drafts(tiny, tmp_path_factory):
    """Random EAGLE-2 and Jakiro drafts for the tiny Llama target, saved as checkpoints."""
    target, _ = tiny
    out = {}
    for arch in ("eagle2", "jakiro"):
        torch.manual_seed(0)
        out[arch] = str(tmp_path_factory.mktemp(arch))
        DraftModel(DraftConfig.for_target(target, arch=arch)).save(out[arch])
    return out


SMALL_GRID = SizingGrid(total_tokens=(1, 2, 4, 8), depths=(1, 2, 3), top_ks=(1, 2), verify_sizes=(1, 3, 5, 9),
                        prompts=("Hello world",), max_new_tokens=8)


def config(questions, out, **kw) -> SpecBenchConfig:
    return SpecBenchConfig(**{"questions": str(questions), "out": str(out), "max_new_tokens": 8, "warmup": 0, **kw})


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_all_methods_report_and_files(tiny, drafts, questions, tmp_path):
    model, tok = tiny
    out = tmp_path / "run"
    report = run_spec_bench(config(questions, out, drafts=drafts, max_new_tokens=6, total_tokens=6, depth=3, top_k=2),
                            target=tiny)

    assert list(report["methods"]) == list(METHODS)
    assert report["questions"]["skipped_rows"] == {"turns is not a list of non-empty strings": 1, "duplicate question_id": 1,
                                                   "invalid JSON": 1}
    assert report["questions_measured"] == 3 and not report["interrupted"]
    assert report["categories"] == ["writing", "qa"]
    for name, m in report["methods"].items():
        assert set(m["categories"]) == {"writing", "qa"}
        assert m["overall"]["questions"] == 3 and m["categories"]["qa"]["questions"] == 2
        assert m["overall"]["tau"] >= 1.0 and m["overall"]["speedup"] > 0
        assert m["overall"]["differ"] == 0 or not m["ours"], name  # greedy: ours reproduce vanilla
    assert report["methods"]["vanilla"]["overall"]["speedup"] == 1.0
    assert report["lossless"] == {"checked": True, "ours_differing": 0, "ok": True}
    small = {"total_tokens": 6, "depth": 3, "top_k": 2}
    assert report["trees"] == {"prompt-lookup": small, "eagle2": small, "jakiro": small, "hybrid": small}
    assert report["machine"]["torch_threads"] >= 1 and report["machine"]["dtype"] == "float32"

    rows = read_jsonl(out / "results.jsonl")
    assert len(rows) == 3 * len(METHODS)
    turns = {q["question_id"]: q.get("turns") for q in QUESTIONS}
    for r in rows:
        hist = {int(k): c for k, c in r["accepted_length_histogram"].items()}
        # The histogram counts every step after each turn's prefill, for HF's methods too.
        assert sum(k * c for k, c in hist.items()) + r["turns"] == r["new_tokens"], r["method"]
        assert sum(hist.values()) + r["turns"] == r["target_forwards"], r["method"]
        assert r["new_tokens"] == sum(map(len, r["token_ids"])) and r["seconds"] > 0
        if r["turns"] == 2:  # the second prompt holds the method's own first answer
            q = turns[r["question_id"]]
            conv = [{"role": "user", "content": q[0]}, {"role": "assistant", "content": r["text"][0]},
                    {"role": "user", "content": q[1]}]
            assert r["prompt_tokens"][1] == len(encode_chat(tok, conv))

    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["methods"]["jakiro"]["overall"]["differ"] == 0
    md = (out / "report.md").read_text()
    assert "torch threads" in md and "## Speedup vs vanilla per category" in md and "| jakiro |" in md
    assert "skipped 3 malformed" in md
    for png in ("speedup.png", "accepted_length.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_differing_output_is_listed(tiny, questions, tmp_path, monkeypatch):
    """If a method's output ever differs from vanilla's, the report says which question and where."""
    build = bench_spec.build_methods

    def broken(*a, **kw):
        methods = build(*a, **kw)
        for m in methods:
            if m.name == "prompt-lookup":
                decode = m.decode

                def wrong(ids, n, sampling, decode=decode):
                    r = decode(ids, n, sampling)
                    r.token_ids = r.token_ids[:-1] + [(r.token_ids[-1] + 1) % 100]
                    return r

                m.decode = wrong
        return methods

    monkeypatch.setattr(bench_spec, "build_methods", broken)
    report = run_spec_bench(config(questions, tmp_path, methods=["vanilla", "prompt-lookup"]), target=tiny)
    o = report["methods"]["prompt-lookup"]["overall"]
    assert o["differ"] == 3 and [d["question_id"] for d in o["differing"]] == [1, 2, 4]
    first = o["differing"][0]
    assert {k: first[k] for k in ("question_id", "turn", "position")} == {"question_id": 1, "turn": 0, "position": 7}
    # how near a tie it was: vanilla's token is the argmax, the altered one is not (float32: no second model)
    assert first["logit_gap"] > 0 and "logit_gap_float32" not in first
    assert report["lossless"]["ok"] is False
    text = (tmp_path / "report.md").read_text()
    assert "losslessness failure" in text and "rounds differently" not in text  # float32: no excuse
    assert "logit(vanilla's) - logit(its token): +" in text
    from turbolm.bench.report import markdown

    report["machine"]["dtype"] = "bfloat16"
    assert "rounds differently" in markdown(report, [])


def test_logit_gap_at_a_difference_in_a_later_turn(tiny):
    """The gap is measured in the context the method saw: earlier turns' answers, then the common prefix."""
    import copy

    from turbolm.core.generation import generate

    model, tokenizer = tiny
    q = bench_spec.Question(1, "writing", tuple(QUESTIONS[0]["turns"]))
    greedy = bench_spec.SamplingParams()
    vanilla = {"question_id": 1, "method": "vanilla",
               **bench_spec.measure(lambda ids, n, s: generate(model, tokenizer, ids, n, s), model, tokenizer, q, 8, greedy)}
    theirs = vanilla["token_ids"][1]
    context = bench_spec.context_at(tokenizer, q, vanilla["text"], 1, theirs[:3])
    assert len(context) == vanilla["prompt_tokens"][1] + 3
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([context])).logits[0, -1]
    assert int(logits.argmax()) == theirs[3]  # the context vanilla saw: its own next token wins
    other = int(logits.argsort()[-2])  # the runner-up
    method = copy.deepcopy(vanilla) | {"method": "x", "first_difference": {"turn": 1, "position": 3}}
    method["token_ids"][1][3] = other
    assert bench_spec.logit_gaps([vanilla, method], {1: q}, model, tokenizer, reference=model) == 1
    d = method["first_difference"]
    assert d["vanilla_token"] == theirs[3] and d["method_token"] == other
    assert d["logit_gap"] == d["logit_gap_float32"] == pytest.approx(float(logits[theirs[3]] - logits[other]), abs=1e-3)
    assert d["logit_gap"] > 0
    ended = copy.deepcopy(method) | {"first_difference": {"turn": 1, "position": len(theirs)}}  # one output ended
    assert bench_spec.logit_gaps([vanilla, ended], {1: q}, model, tokenizer) == 0


def test_interrupt_still_writes_the_report(tiny, questions, tmp_path):
    def stop_after_first(question, records):
        assert set(records) == {"vanilla", "prompt-lookup"}
        raise KeyboardInterrupt

    report = run_spec_bench(config(questions, tmp_path, methods=["prompt-lookup"]), target=tiny, on_question=stop_after_first)
    assert report["interrupted"] and report["questions_measured"] == 1
    assert report["methods"]["prompt-lookup"]["overall"]["questions"] == 1
    assert len(read_jsonl(tmp_path / "results.jsonl")) == 2
    assert "**Interrupted**" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "report.json").read_text())["interrupted"] is True


def test_interrupt_during_warm_up(tiny, questions, tmp_path, monkeypatch):
    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_spec, "_warm_up", interrupted)
    report = run_spec_bench(config(questions, tmp_path, methods=["prompt-lookup"]), target=tiny)
    assert report["interrupted"] and report["questions_measured"] == 0
    assert report["methods"]["prompt-lookup"]["overall"]["speedup"] is None
    json.loads((tmp_path / "report.json").read_text(), parse_constant=pytest.fail)  # strict JSON: no NaN
    assert "No question was measured" in (tmp_path / "report.md").read_text()


def test_busy_machine_warning():
    from turbolm.bench.report import busy_machine

    quiet = {"torch_threads": 2, "load_average_start": [0.1, 0, 0], "load_average_end": [2.2, 0, 0]}
    assert busy_machine(quiet) < 0.5
    assert busy_machine({**quiet, "load_average_end": [3.5, 0, 0]}) == 1.5
    assert busy_machine({**quiet, "load_average_start": None}) is None
    # the /proc/stat measurement wins over the load average where the report has it
    assert busy_machine({**quiet, "load_average_end": [3.5, 0, 0], "other_cpus_busy": 0.1}) == 0.1


def test_other_cpus_busy_counts_other_processes_not_this_one():
    import subprocess
    import sys
    import time

    from turbolm.core.machine import cpu_snapshot, other_cpus_busy

    # arithmetic: 10 s of wall time, 25 CPU-seconds used in all, 5 of them by this process -> 2 CPUs
    assert other_cpus_busy((0.0, 100.0, 1.0), (10.0, 125.0, 6.0)) == 2.0
    assert other_cpus_busy((0.0, 100.0, 1.0), (10.0, 104.0, 6.0)) == 0.0  # clock ticks are coarse: never < 0
    assert other_cpus_busy(None, (1.0, 1.0, 1.0)) is None
    start = cpu_snapshot()
    if start is None:
        pytest.skip("no /proc/stat on this OS")
    # another process spinning for ~1.5 s while this one sleeps reads as about one busy CPU
    subprocess.run([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 1.5: pass"], check=True)
    assert other_cpus_busy(start, cpu_snapshot()) > 0.5
    start = cpu_snapshot()
    t = time.process_time()
    while time.process_time() - t < 0.5:  # this process's own work is left out
        pass
    end = cpu_snapshot()
    assert end[2] - start[2] >= 0.5


def test_interrupt_inside_a_question_keeps_only_finished_questions(tiny, questions, tmp_path, monkeypatch):
    build, calls = bench_spec.build_methods, []

    def interrupting(*a, **kw):
        methods = build(*a, **kw)
        vanilla = methods[0]
        decode = vanilla.decode

        def maybe_stop(ids, n, sampling):
            calls.append(1)
            if len(calls) == 3:  # question 1 has two turns; question 2 runs hf-generate first, then this
                raise KeyboardInterrupt
            return decode(ids, n, sampling)

        vanilla.decode = maybe_stop
        return methods

    monkeypatch.setattr(bench_spec, "build_methods", interrupting)
    report = run_spec_bench(config(questions, tmp_path, methods=["vanilla", "hf-generate"]), target=tiny)
    assert report["interrupted"] and report["questions_measured"] == 1
    rows = read_jsonl(tmp_path / "results.jsonl")
    # What was measured stays in the raw file; the method order rotates per question.
    assert [(r["question_id"], r["method"], r["order"]) for r in rows] == [
        (1, "vanilla", 0), (1, "hf-generate", 1), (2, "hf-generate", 0)]


def test_sampling_runs_without_the_identity_check(tiny, questions, tmp_path):
    report = run_spec_bench(config(questions, tmp_path, methods=["hf-generate", "hf-prompt-lookup", "prompt-lookup"],
                                   temperature=0.8, categories=["qa"], limit=1), target=tiny)
    assert report["questions_measured"] == 1 and report["categories"] == ["qa"]
    assert report["lossless"]["checked"] is False and report["methods"]["prompt-lookup"]["overall"]["differ"] is None
    assert "Not checked" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"questions": "/nonexistent/question.jsonl"}, "questions file not found"),
        ({"methods": ["vanilla", "medusa"]}, "unknown method medusa"),
        ({"categories": ["qa", "poetry"]}, "unknown category poetry; the questions file has: writing, qa"),
        ({"methods": ["vanilla"], "drafts": {"jakiro": "/x"}}, "jakiro is not in methods"),
        ({"methods": ["prompt-lookup"], "drafts": {"medusa": "/x"}}, "drafts are for eagle2 / jakiro / hybrid only"),
        ({"methods": ["eagle2"]}, "trained for a different target"),  # the shipped draft is for SmolLM2
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ],
)
def test_errors_are_clear(tiny, questions, tmp_path, kw, message):
    kw = {"questions": questions, **kw}
    with pytest.raises(TurboLMError, match=message) as e:
        run_spec_bench(config(out=tmp_path, **kw), target=tiny)
    assert "\n" not in str(e.value)


def test_draft_for_another_target(tiny, tiny_dirs, questions, tmp_path):
    from turbolm import load_target

    other, _ = load_target(tiny_dirs["qwen2"])
    DraftModel(DraftConfig.for_target(other, arch="jakiro")).save(tmp_path / "qwen_draft")
    with pytest.raises(TurboLMError, match="jakiro: the draft in .* was trained for a different target .*drafts jakiro=DIR"):
        run_spec_bench(config(questions, tmp_path, methods=["jakiro"], drafts={"jakiro": str(tmp_path / "qwen_draft")}),
                       target=tiny)


def test_only_malformed_rows(tiny, tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question_id": 1}\n[1, 2]\n')
    with pytest.raises(TurboLMError, match="no valid question.*skipped 2 malformed row"):
        run_spec_bench(config(path, tmp_path), target=tiny)


def test_cli(capsys, tiny_dir, questions, tmp_path):
    out = tmp_path / "cli"
    rc = main(["bench", "spec", "--questions", str(questions), "--model", str(tiny_dir), "--methods", "vanilla,prompt-lookup",
               "--max-new-tokens", "6", "--limit", "2", "--depth", "3", "--out", str(out)])  # warm-up 1 by default
    stdout, stderr = capsys.readouterr()
    assert rc == 0 and "## Speedup vs vanilla per category" in stdout
    report = json.loads((out / "report.json").read_text())
    assert report["questions_measured"] == 2 and report["trees"]["prompt-lookup"]["depth"] == 3
    assert (out / "speedup.png").is_file() and len(read_jsonl(out / "results.jsonl")) == 4

    rc = main(["bench", "spec", "--questions", str(questions), "--model", str(tiny_dir), "--methods", "vanilla,medusa"])
    _, stderr = capsys.readouterr()
    assert rc == 2 and stderr.startswith("turbolm: error: unknown method medusa") and stderr.count("\n") == 1
    rc = main(["bench", "spec", "--questions", str(questions), "--draft", "jakiro"])
    _, stderr = capsys.readouterr()
    assert rc == 2 and "expected NAME=DIR" in stderr


def test_per_category_and_auto_tree(tiny, drafts, questions, tmp_path, monkeypatch):
    from turbolm.bench.specbench import load_questions, select_questions

    qs, _ = load_questions(questions)
    picked = select_questions(qs, None, None, per_category=1)
    assert [q.category for q in picked] == list(dict.fromkeys(q.category for q in qs))
    monkeypatch.setenv("TURBOLM_CACHE", str(tmp_path / "cache"))
    report = run_spec_bench(config(questions, tmp_path / "auto", methods=["vanilla", "jakiro", "hybrid"],
                                   drafts={"jakiro": drafts["jakiro"]}, hybrid_mode="choose", per_category=1, tree="auto",
                                   grid=SMALL_GRID), target=tiny)
    assert report["questions_measured"] == len(picked)
    assert report["lossless"]["ok"] is True and report["config"]["hybrid_mode"] == "choose"
    assert report["trees"]["hybrid"]["depth"] <= 3  # sized on the small grid, with jakiro's draft
    with pytest.raises(TurboLMError, match="give one or the other"):
        run_spec_bench(config(questions, tmp_path / "bad", methods=["vanilla", "jakiro"], drafts={"jakiro": drafts["jakiro"]},
                              tree="auto", depth=2), target=tiny)


def test_cli_per_category_and_tree_flags(capsys, tiny_dir, questions, tmp_path, monkeypatch):
    monkeypatch.setenv("TURBOLM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "cli2"
    rc = main(["bench", "spec", "--questions", str(questions), "--model", str(tiny_dir), "--methods", "vanilla,prompt-lookup",
               "--max-new-tokens", "4", "--per-category", "1", "--warmup", "0", "--fast-cpu", "off", "--out", str(out)])
    capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    assert rc == 0 and report["config"]["per_category"] == 1 and report["config"]["tree"] == "auto"
    assert report["config"]["fast_cpu"] == "off" and report["machine"]["fast_cpu"] is False


def test_report_numbers_from_a_fake_results_file():
    """Speedup = mean of per-question ratios (not ratio of totals), tau from the accepted-length
    histogram (bonus token included), grouping by category, differing outputs counted."""
    from turbolm.bench.report import summarise

    def rec(qid, cat, method, tokens, seconds, hist=None, diff=None):
        return {"question_id": qid, "category": cat, "method": method, "new_tokens": tokens, "seconds": seconds,
                "tokens_per_second": tokens / seconds, "tau": 1.0, "target_forwards": 0,
                "accepted_length_histogram": hist, "first_difference": diff}

    records = [
        rec(1, "qa", "vanilla", 10, 1.0, {"1": 9}), rec(1, "qa", "jakiro", 10, 0.5, {"3": 3}),
        rec(2, "qa", "vanilla", 20, 4.0, {"1": 19}), rec(2, "qa", "jakiro", 20, 1.0, {"1": 1, "2": 9}),
        rec(3, "math", "vanilla", 30, 3.0, {"1": 29}),
        rec(3, "math", "jakiro", 30, 3.0, {"2": 10, "4": 2}, diff={"turn": 0, "position": 5}),
    ]
    rep = summarise(records, ["vanilla", "jakiro"], greedy=True, ours=("vanilla", "jakiro"))
    j = rep["methods"]["jakiro"]
    assert j["categories"]["qa"]["speedup"] == pytest.approx((2.0 + 4.0) / 2)  # mean of per-question ratios
    assert j["categories"]["qa"]["speedup_of_totals"] == pytest.approx((30 / 1.5) / (30 / 5.0))
    assert j["categories"]["qa"]["tau"] == pytest.approx((3 * 3 + 1 + 2 * 9) / (3 + 1 + 9))
    assert j["categories"]["math"]["tau"] == pytest.approx((2 * 10 + 4 * 2) / 12)
    assert j["overall"]["speedup"] == pytest.approx((2.0 + 4.0 + 1.0) / 3)
    assert j["overall"]["tau"] == pytest.approx((9 + 1 + 18 + 20 + 8) / (3 + 10 + 12))
    assert rep["categories"] == ["qa", "math"] and j["overall"]["differ"] == 1 and j["categories"]["qa"]["differ"] == 0
    assert rep["lossless"] == {"checked": True, "ours_differing": 1, "ok": False}
