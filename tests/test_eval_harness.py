"""`turbolm eval`: lm-eval-style scoring on tiny models and hand-made task files (fast), and the
built-in tasks on the shared data (skipped where the data is missing)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch

from turbolm.core.errors import TurboLMError
from turbolm.evaluation.harness import Scorer, evaluate_task, hf_logits_fn, rolling_windows
from turbolm.evaluation.tasks import (
    TASKS,
    ChoiceItem,
    Document,
    Task,
    hellaswag_preprocess,
    load_hellaswag,
    load_lambada,
    load_mmlu,
    load_task,
    load_task_file,
    load_wikitext,
    load_winogrande,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def full_forward_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """Independent reference: one plain forward over context + continuation, summing the log-probs of
    the tokens after the context's tokens."""
    ctx = tokenizer(context)["input_ids"]
    whole = tokenizer(context + continuation)["input_ids"]
    assert whole[:len(ctx)] == ctx
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)
    return sum(float(lp[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))


def zeros_fn(vocab: int):
    def logits_fn(ids):
        return torch.zeros(*ids.shape, vocab)
    return logits_fn


def mc_task(name, questions) -> Task:
    items = [ChoiceItem(contexts=[q] * len(ch), continuations=[" " + c for c in ch], gold=g,
                        norm_lengths=[len(c) for c in ch]) for q, ch, g in questions]
    return Task(name, "choice", "test", items)


# --- scoring -----------------------------------------------------------------------------------------


def test_two_question_mc_matches_a_plain_forward(tiny):
    model, tok = tiny
    questions = [("The capital of France is", ["Paris.", "Rome.", "the sea"], 0),
                 ("Write a short poem about the", ["sea", "stars and the sky"], 1)]
    scorer = Scorer(hf_logits_fn(model), tok, max_length=512, batch_size=3, progress=False)
    result = evaluate_task(mc_task("hand", questions), scorer, keep_lls=True)
    acc, acc_norm = [], []
    for (q, choices, gold), got in zip(questions, result["lls"]):
        want = [full_forward_logprob(model, tok, q, " " + c) for c in choices]
        assert got == pytest.approx(want, abs=1e-4)
        acc.append(float(max(range(len(want)), key=want.__getitem__) == gold))
        normed = [w / len(c) for w, c in zip(want, choices)]
        acc_norm.append(float(max(range(len(normed)), key=normed.__getitem__) == gold))
    assert result["n"] == 2
    assert result["acc"] == sum(acc) / 2 and result["acc_norm"] == sum(acc_norm) / 2
    assert result["truncated"] == 0


def test_acc_norm_picks_another_answer_than_acc(tiny):
    """A constant distribution: every token costs log V, so acc prefers the fewest tokens and acc_norm
    the fewest tokens per character."""
    _, tok = tiny
    vocab = len(tok)
    short, long = "x", "The capital of France is Paris."
    scorer = Scorer(zeros_fn(vocab), tok, max_length=512, progress=False)
    (_, c_short), (_, c_long) = scorer.encode_pairs([("Q:", " " + short), ("Q:", " " + long)])
    assert len(c_short) < len(c_long) and len(c_short) / len(short) > len(c_long) / len(long)
    result = evaluate_task(mc_task("norm", [("Q:", [short, long], 1)]), scorer, keep_lls=True)
    assert result["lls"][0] == pytest.approx([-len(c_short) * math.log(vocab), -len(c_long) * math.log(vocab)], rel=1e-5)
    assert result["acc"] == 0.0 and result["acc_norm"] == 1.0


def test_winogrande_scores_only_the_continuation(tmp_path, tiny):
    model, tok = tiny
    path = write_jsonl(tmp_path / "wg.jsonl", [
        {"context_options": ["The sea was calm so Paris", "The sea was calm so Rome"], "continuation": "wrote a poem.",
         "gold": 1}])
    task = load_winogrande(path)
    assert task.items[0].continuations == [" wrote a poem."] * 2 and task.items[0].norm_lengths is None
    scorer = Scorer(hf_logits_fn(model), tok, max_length=512, progress=False)
    result = evaluate_task(task, scorer, keep_lls=True)
    want = [full_forward_logprob(model, tok, ctx, " wrote a poem.") for ctx in task.items[0].contexts]
    assert result["lls"][0] == pytest.approx(want, abs=1e-4)
    # the whole sentence would cost more: the contexts' own tokens are not part of the score
    for ctx, got in zip(task.items[0].contexts, result["lls"][0]):
        ids = tok(ctx + " wrote a poem.")["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0], dim=-1)
        everything = sum(float(lp[i - 1, ids[i]]) for i in range(1, len(ids)))
        assert everything < got - 1.0
    assert result["acc"] == float(want[1] > want[0]) and result["acc_norm"] is None


def test_constant_model_perplexity_is_the_vocabulary_size(tiny):
    _, tok = tiny
    vocab = len(tok)
    text = " ".join(["The capital of France is Paris. Write a short poem about the sea."] * 6)
    task = Task("ppl", "rolling", "test", [Document(text=text, words=len(text.split()), bytes=len(text.encode()))])
    for stride in (16, 5):
        scorer = Scorer(zeros_fn(vocab), tok, max_length=64, batch_size=4, progress=False)
        r = evaluate_task(task, scorer, context_length=16, stride=stride)
        assert r["tokens"] == len(tok(text)["input_ids"]) > 16 * 3  # several windows
        assert r["ppl"] == pytest.approx(vocab, rel=1e-5)
        assert r["word_ppl"] == pytest.approx(vocab ** (r["tokens"] / len(text.split())), rel=1e-4)


def test_rolling_windows_predict_every_token_once_with_enough_context():
    tokens = list(range(100, 147))
    for length, stride in [(8, 8), (8, 3), (8, 1), (64, 64), (5, 5)]:
        windows = rolling_windows(tokens, 7, length, stride)
        predicted = [t for _, cont in windows for t in cont]
        assert predicted == tokens
        seq = [7] + tokens
        pos = 1
        for k, (ctx, cont) in enumerate(windows):
            assert len(ctx) + len(cont) - 1 <= length  # the model's input
            assert seq[pos - len(ctx):pos + len(cont)] == ctx + cont  # contiguous, right before the predictions
            if k:
                assert len(ctx) >= min(length - stride, pos) or len(ctx) + len(cont) - 1 == length
            pos += len(cont)
    # stride == context length: lm-eval's rolling windows (first: prefix + 7 tokens; later: full windows)
    w = rolling_windows(tokens[:20], 7, 8, 8)
    assert [len(c) for _, c in w] == [8, 8, 4] and w[0][0] == [7] and w[1][0] == [tokens[7]]
    assert len(w[2][0]) + len(w[2][1]) - 1 == 8


def test_rolling_loglikelihood_in_one_window_equals_a_plain_forward(tiny):
    model, tok = tiny
    text = "Speculative decoding drafts tokens and the target verifies them."
    task = Task("doc", "rolling", "test", [Document(text, 9, len(text))])
    scorer = Scorer(hf_logits_fn(model), tok, max_length=512, progress=False)
    r = evaluate_task(task, scorer, context_length=256, keep_lls=True)
    ids = [scorer.prefix_id] + tok(text)["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0], dim=-1)
    assert r["lls"][0] == pytest.approx(sum(float(lp[i - 1, ids[i]]) for i in range(1, len(ids))), abs=1e-3)


def test_equal_length_batches_never_pad_and_score_the_same(tiny):
    model, tok = tiny
    base = hf_logits_fn(model)
    questions = [("The capital of France is", ["Paris.", "Rome.", "the sea and the sky"], 0),
                 ("Hello world! Numbers:", ["0 1 2", "3", "4 5 6 7 8 9"], 2),
                 ("Write a short", ["poem", "poem about the sea", "x"], 1)]
    task = mc_task("eq", questions)
    pairs = [(c, k) for it in task.items for c, k in zip(it.contexts, it.continuations)]

    def recorder(store):
        def fn(ids):
            store.append(ids.clone())
            return base(ids)
        return fn

    results, calls = {}, {}
    for equal in (False, True):
        calls[equal] = []
        scorer = Scorer(recorder(calls[equal]), tok, max_length=512, batch_size=4, equal_length_batches=equal,
                        progress=False)
        expected_rows = {tuple((c + k)[:-1]) for c, k in scorer.encode_pairs(pairs)}
        results[equal] = evaluate_task(task, scorer, keep_lls=True)
        if equal:
            for ids in calls[equal]:  # every row is exactly one request's input: no padding anywhere
                assert all(tuple(row.tolist()) in expected_rows for row in ids)
    assert any(tuple(row.tolist()) not in expected_rows for ids in calls[False] for row in ids)  # padding was used
    for a, b in zip(results[False]["lls"], results[True]["lls"]):
        assert a == pytest.approx(b, abs=1e-4)
    assert results[False]["acc"] == results[True]["acc"] and results[False]["acc_norm"] == results[True]["acc_norm"]


def test_encode_pair_moves_trailing_space_to_the_continuation(tiny):
    _, tok = tiny
    scorer = Scorer(zeros_fn(len(tok)), tok, max_length=512, progress=False)
    [(ctx, cont)] = scorer.encode_pairs([("The capital of France is ", "Paris.")])
    assert ctx == tok("The capital of France is")["input_ids"]
    assert cont == tok("The capital of France is Paris.")["input_ids"][len(ctx):]
    [(ctx, cont)] = scorer.encode_pairs([("", "Paris")])  # empty context: the prefix token
    assert ctx == [tok.bos_token_id] and cont == tok("Paris", add_special_tokens=False)["input_ids"]


def test_long_requests_are_truncated_from_the_left(tiny):
    model, tok = tiny
    context = " ".join(["The capital of France is Paris."] * 10)
    scorer = Scorer(hf_logits_fn(model), tok, max_length=16, progress=False)
    r = evaluate_task(mc_task("long", [(context, ["Rome.", "Paris."], 1)]), scorer, keep_lls=True)
    assert r["truncated"] == 2
    whole = tok(context + " Paris.")["input_ids"]
    n_cont = len(whole) - len(tok(context)["input_ids"])
    window = whole[-17:]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([window[:-1]])).logits[0], dim=-1)
    want = sum(float(lp[i - 1, window[i]]) for i in range(17 - n_cont, 17))
    assert r["lls"][0][1] == pytest.approx(want, abs=1e-4)


# --- task files and lm-eval formats -------------------------------------------------------------------


def test_malformed_rows_name_the_file_and_line(tmp_path):
    good = {"query": "Question: q?", "choices": ["a", "b"], "gold": 0}
    cases = [
        (["{not json"], "line 1: not valid JSON"),
        ([good, {"query": "q", "gold": 0}], "line 2: missing field 'choices'"),
        ([good, "", {"query": "q", "choices": ["a", "b"], "gold": 2}], "line 3: 'gold' is 2 but there are 2 options"),
        ([{"query": "q", "choices": "ab", "gold": 0}], "line 1: field 'choices' must be a non-empty list of strings"),
        (["[1, 2]"], "line 1: expected a JSON object"),
    ]
    for rows, message in cases:
        path = write_jsonl(tmp_path / "bad.jsonl", rows)
        with pytest.raises(TurboLMError) as e:
            load_task_file(path)
        assert str(path) in str(e.value) and message in str(e.value)
    with pytest.raises(TurboLMError, match="empty.jsonl holds no items"):
        load_task_file(write_jsonl(tmp_path / "empty.jsonl", []))
    with pytest.raises(TurboLMError, match=r"data file not found: .*give data_dir DIR, or task_paths piqa=FILE"):
        load_task("piqa", data_dir=tmp_path)
    with pytest.raises(TurboLMError, match="unknown task 'nope'"):
        load_task("nope", data_dir=tmp_path)
    (tmp_path / "m" / "test").mkdir(parents=True)
    (tmp_path / "m" / "test" / "x_test.csv").write_text("question,choice0,choice1,choice2,choice3,answer\nq,a,b,c,d,7\n")
    with pytest.raises(TurboLMError, match=r"x_test.csv, line 2: answer must be 0-3"):
        load_mmlu(tmp_path / "m")


def test_lm_eval_prompt_formats(tmp_path):
    rows = [{"query": "Question: How do I boil water?\n", "choices": ["Heat it.", "Freeze it."], "gold": 0}]
    piqa = TASKS["piqa"].load(write_jsonl(tmp_path / "piqa.jsonl", rows), "piqa")
    assert piqa.items[0].contexts[0] == "Question: How do I boil water?\nAnswer:"
    assert piqa.items[0].continuations == [" Heat it.", " Freeze it."] and piqa.items[0].norm_lengths == [8, 10]
    boolq = TASKS["boolq"].load(write_jsonl(tmp_path / "boolq.jsonl", [
        {"query": "Passage: Water boils at 100 C.\nQuestion: does water boil at 100 c?", "choices": ["no", "yes"],
         "gold": 1}]), "boolq")
    assert boolq.items[0].contexts[0] == "Water boils at 100 C.\nQuestion: does water boil at 100 c?\nAnswer:"
    assert boolq.items[0].continuations == [" no", " yes"]
    custom = load_task_file(write_jsonl(tmp_path / "mine.jsonl", rows))  # a --task-file: the query as written
    assert custom.name == "mine" and custom.items[0].contexts[0] == rows[0]["query"]

    hs = load_hellaswag(write_jsonl(tmp_path / "hs.jsonl", [{
        "activity_label": "Making a cake", "ctx_a": "A woman mixes flour. [header] Bake it.", "ctx_b": "she",
        "endings": ["puts it in  the oven [title] Wait.", "eats it."], "label": 0}]))
    assert hs.items[0].contexts[0] == "Making a cake: A woman mixes flour. Bake it. She"
    assert hs.items[0].continuations == [" puts it in the oven. Wait.", " eats it."]
    assert hellaswag_preprocess(" a [title] b [step] c ") == "a. b c"

    root = tmp_path / "mmlu"
    for split in ("test", "dev"):
        (root / split).mkdir(parents=True)
        (root / split / f"high_school_physics_{split}.csv").write_text(
            "question,choice0,choice1,choice2,choice3,answer\n"
            + "".join(f'"  {split} q{i}? ",a{i},b{i},"c, {i}",d{i},{i % 4}\n' for i in range(6)))
    zero = load_mmlu(root)
    assert zero.items[0].contexts[0] == ("The following are multiple choice questions (with answers) about high school "
                                         "physics.\n\ntest q0?\nA. a0\nB. b0\nC. c, 0\nD. d0\nAnswer:")
    assert zero.items[0].continuations == [" A", " B", " C", " D"] and [it.gold for it in zero.items][:4] == [0, 1, 2, 3]
    five = load_mmlu(root, num_fewshot=5, limit=2)
    shots = "".join(f"dev q{i}?\nA. a{i}\nB. b{i}\nC. c, {i}\nD. d{i}\nAnswer: {'ABCD'[i % 4]}\n\n" for i in range(5))
    assert len(five) == 2 and five.items[1].contexts[0] == (
        "The following are multiple choice questions (with answers) about high school physics.\n\n" + shots
        + "test q1?\nA. a1\nB. b1\nC. c, 1\nD. d1\nAnswer:")

    lam = load_lambada(write_jsonl(tmp_path / "lam.jsonl", [{"context": "He said", "continuation": "hello"}]))
    assert (lam.items[0].context, lam.items[0].continuation) == ("He said", " hello")
    wiki = tmp_path / "wiki.raw"
    wiki.write_text(" = A = \n A b @-@ c , d . \n = = B = = \n e ( f ) \n = C = \n g \n")
    docs = load_wikitext(wiki).items
    assert [d.text for d in docs] == [" = A =\nA b-c, d.\n== B ==\ne (f)\n", " = C =\ng\n"]  # as lm-eval: lead kept
    # lm-eval counts words as len(re.split(r"\s+", raw)): the empty ends count too
    assert docs[1].words == 6 and docs[1].bytes == len(" = C = \n g \n")


def test_hellaswag_preprocessing_is_lm_evals(tmp_path):
    utils = pytest.importorskip("lm_eval.tasks.hellaswag.utils")
    text = "Roof shingle removal: A man is sitting on a roof. [title] He starts  pulling [step] up roofing."
    assert hellaswag_preprocess(text) == utils.preprocess(text)


# --- the command --------------------------------------------------------------------------------------


def make_data_dir(root: Path) -> Path:
    mc = root / "multiple_choice"
    write_jsonl(mc / "piqa.jsonl", [{"query": f"Question: How do I make tea number {i}?\n",
                                     "choices": ["Boil water.", "Freeze water."], "gold": i % 2} for i in range(7)])
    write_jsonl(mc / "winogrande.jsonl", [{"context_options": ["The sea was calm so Paris", "The sea was calm so Rome"],
                                           "continuation": "wrote a poem.", "gold": i % 2} for i in range(7)])
    write_jsonl(mc / "hellaswag_val1000.jsonl", [{"activity_label": "Poetry", "ctx_a": "A man writes.", "ctx_b": "he",
                                                  "endings": ["reads it.", "sleeps.", "sings [title] loud.", "stops."],
                                                  "label": i % 4} for i in range(7)])
    for split in ("test", "dev"):
        for subject in ("astronomy", "virology"):
            (mc / "mmlu" / split).mkdir(parents=True, exist_ok=True)
            (mc / "mmlu" / split / f"{subject}_{split}.csv").write_text(
                "question,choice0,choice1,choice2,choice3,answer\n"
                + "".join(f"What is {i}?,{i},{i + 1},{i + 2},{i + 3},{i % 4}\n" for i in range(7)))
    lm = root / "language_modeling"
    write_jsonl(lm / "lambada_openai.jsonl", [{"context": "The capital of France is", "continuation": "Paris"}] * 7)
    (lm / "wikitext-2-raw").mkdir(parents=True)
    (lm / "wikitext-2-raw" / "wiki.test.raw").write_text(
        "".join(f" = Title {i} = \n The capital of France is Paris . The sea and the sky . \n" for i in range(7)))
    return root


def eval_args(argv):
    from turbolm.commands.eval import register

    parser = argparse.ArgumentParser(prog="turbolm")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["eval", *argv])


def cmd_eval(args) -> int:
    """``turbolm eval`` as the command line runs it, its errors in the command line's words."""
    from turbolm.commands.common import error_message
    from turbolm.commands.eval import run

    try:
        return run(args)
    except TurboLMError as e:
        raise TurboLMError(error_message(e, args.flags)) from None


def test_eval_command_end_to_end(tmp_path, tiny_dir, capsys):
    data = make_data_dir(tmp_path / "data")
    extra = write_jsonl(tmp_path / "my_quiz.jsonl", [{"query": "Hello world! Numbers:", "choices": ["0 1 2", "x"],
                                                      "gold": 0}] * 6)
    out = tmp_path / "results" / "eval.json"
    tasks = "piqa,winogrande,hellaswag,mmlu,mmlu_5shot,lambada,wikitext"
    args = eval_args(["--model", str(tiny_dir), "--tasks", tasks, "--task-file", str(extra), "--data-dir", str(data),
                      "--limit", "5", "--batch-size", "3", "--context-length", "16", "--stride", "8", "--json",
                      "--out", str(out)])
    assert cmd_eval(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads(out.read_text())
    res = report["results"]
    assert list(res) == tasks.split(",") + ["my_quiz"]
    for name in ("piqa", "winogrande", "hellaswag", "lambada", "wikitext", "my_quiz"):
        assert res[name]["n"] == 5, name
    assert res["mmlu"]["n"] == res["mmlu_5shot"]["n"] == 10  # --limit applies per subject
    assert set(res["mmlu"]["subtasks"]) == {"astronomy", "virology"}
    for name in ("piqa", "hellaswag", "mmlu", "my_quiz"):
        assert 0 <= res[name]["acc"] <= 1 and 0 <= res[name]["acc_norm"] <= 1
    assert res["winogrande"]["acc_norm"] is None and res["wikitext"]["acc"] is None
    assert res["lambada"]["ppl"] > 1 and res["wikitext"]["ppl"] > 1 and res["wikitext"]["word_ppl"] > 1
    assert report["config"]["context_length"] == 16 and report["config"]["stride"] == 8
    assert report["config"]["max_length"] == 512 and not report["config"]["equal_length_batches"]
    assert report["model"].endswith("(dense, float32, cpu)")

    # the Markdown table, with equal-length batches
    args = eval_args(["--model", str(tiny_dir), "--tasks", "piqa", "--data-dir", str(data), "--limit", "5",
                      "--equal-length-batches"])
    assert cmd_eval(args) == 0
    table = capsys.readouterr().out
    assert table.startswith("| task | n | acc (%) | acc_norm (%) | ppl | word ppl |") and "| piqa | 5 |" in table


def test_eval_command_errors(tmp_path, tiny_dir):
    with pytest.raises(TurboLMError, match="unknown task 'nope' in --tasks"):
        cmd_eval(eval_args(["--model", str(tiny_dir), "--tasks", "piqa,nope"]))
    with pytest.raises(TurboLMError, match=r"piqa: data file not found: .*piqa.jsonl"):
        cmd_eval(eval_args(["--model", str(tiny_dir), "--tasks", "piqa", "--data-dir", str(tmp_path)]))
    with pytest.raises(TurboLMError, match="expected TASK=PATH"):
        cmd_eval(eval_args(["--task-path", "piqa"]))
    data = make_data_dir(tmp_path / "data")
    with pytest.raises(TurboLMError, match="--context-length must be between 2 and the model's context"):
        cmd_eval(eval_args(["--model", str(tiny_dir), "--tasks", "wikitext", "--data-dir", str(data),
                            "--context-length", "4096"]))


# --- the shared data and the real default model ----------------------------------------------------------

needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data not found at {DATA}")


@needs_data
def test_builtin_tasks_load_from_the_shared_data():
    counts = {"piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "winogrande": 1267, "boolq": 3270,
              "hellaswag": 1000, "mmlu": 14042, "mmlu_5shot": 14042, "lambada": 5153, "wikitext": 62}
    for name in TASKS:
        task = load_task(name, data_dir=DATA)
        assert len(task) == counts[name], name
    assert load_task("mmlu", data_dir=DATA, limit=2).items[-1].group == "world_religions"
    assert len(load_task("mmlu", data_dir=DATA, limit=2)) == 2 * 57


@pytest.mark.slow
@needs_data
def test_default_model_beats_chance_on_arc_easy(default_model):
    model, tok = default_model
    scorer = Scorer(hf_logits_fn(model), tok, max_length=8192, batch_size=8, progress=False)
    r = evaluate_task(load_task("arc_easy", data_dir=DATA, limit=40), scorer)
    assert r["n"] == 40 and r["acc"] > 0.4  # chance: 0.25; SmolLM2-135M-Instruct scores ~0.6
