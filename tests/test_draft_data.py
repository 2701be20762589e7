"""Feature preparation for draft training: formats, loss masks, features, shards, resume, reader, CLI."""

import json
import pickle

import pytest
import torch
from safetensors import safe_open

from conftest import make_model_dir
from turbolm import TurboLMError, encode_chat, generate
from turbolm.cli import main
from turbolm.core.generation import FeatureCapture
from turbolm.speculative.draft import data
from turbolm.speculative.draft.data import FeatureDataset, prepare_features, read_meta

END = "<|im_end|>"

ALPACA = [
    {"instruction": "Write a short poem about the sea.", "input": "", "output": "The sea and the sky and the stars."},
    {"instruction": "What is the capital of France?", "input": "Answer in one word.", "output": "Paris."},
    {"instruction": "def add(a, b):", "output": "return a + b"},  # no "input" key at all
]
SHAREGPT = [
    {"conversations": [
        {"from": "system", "value": "Speculative decoding drafts tokens."},
        {"from": "human", "value": "Hello world!"},
        {"from": "gpt", "value": "The capital of Italy is Rome."},
        {"from": "user", "value": "And France?"},
        {"from": "assistant", "value": "Paris, the capital of France."},
        {"from": "human", "value": "Thanks"},  # trailing user turn: nothing to learn, dropped
    ]},
    {"conversations": [{"from": "human", "value": "Numbers: 0 1 2 3"}, {"from": "gpt", "value": "4 5 6 7 8 9"}]},
]


def write_json(path, rows):
    path.write_text(json.dumps(rows))
    return path


def prepare(target, data_file, out, **kw):
    kw.setdefault("max_length", 256)
    return prepare_features(str(target), data_file, out, progress=False, **kw)


def shard_tensors(out, meta):
    """Every sample of a prepared directory as (input_ids, loss_mask, features) read straight from the shards."""
    samples = []
    for shard in meta["shards"]:
        with safe_open(str(out / shard["file"]), framework="pt") as f:
            t = {k: f.get_tensor(k) for k in f.keys()}
        off = t["offsets"].tolist()
        assert off[0] == 0 and off[-1] == len(t["input_ids"]) == len(t["loss_mask"]) == len(t["features"])
        samples += [(t["input_ids"][a:b], t["loss_mask"][a:b], t["features"][a:b]) for a, b in zip(off, off[1:])]
    return samples


def masked_runs(tokenizer, ids, mask):
    """The text of each contiguous run of masked tokens, special tokens included."""
    runs, current = [], []
    for tok, m in zip(ids.tolist(), mask.tolist()):
        if m:
            current.append(tok)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(r) for r in runs]


def test_loss_mask_marks_exactly_the_answers(tmp_path, tiny_dir, tiny):
    _, tokenizer = tiny
    meta = prepare(tiny_dir, write_json(tmp_path / "d.json", ALPACA + SHAREGPT), tmp_path / "out")
    samples = shard_tensors(tmp_path / "out", meta)
    assert meta["complete"] and meta["samples"] == len(samples) == 5 and meta["skipped"] == {}
    expected = [[r["output"] + END] for r in ALPACA] + [
        ["The capital of Italy is Rome." + END, "Paris, the capital of France." + END],
        ["4 5 6 7 8 9" + END],
    ]
    for (ids, mask, _), answers in zip(samples, expected):
        assert ids.dtype == torch.int32 and mask.dtype == torch.uint8
        assert masked_runs(tokenizer, ids, mask) == answers
    # The whole sequence is the chat template's rendering (the trailing user turn dropped).
    conv = [{"role": "system", "content": "Speculative decoding drafts tokens."}, {"role": "user", "content": "Hello world!"},
            {"role": "assistant", "content": "The capital of Italy is Rome."}, {"role": "user", "content": "And France?"},
            {"role": "assistant", "content": "Paris, the capital of France."}]
    assert samples[3][0].tolist() == encode_chat(tokenizer, conv, add_generation_prompt=False)
    alpaca_user = encode_chat(tokenizer, [{"role": "user", "content": "What is the capital of France?\n\nAnswer in one word."}])
    assert samples[1][0].tolist()[: len(alpaca_user)] == alpaca_user
    assert meta["tokens"] == sum(len(s[0]) for s in samples)
    assert meta["loss_tokens"] == sum(int(s[1].sum()) for s in samples)


def test_features_equal_a_direct_forward(tmp_path, tiny_dir, tiny):
    model, _ = tiny
    # batch_size 3 over samples of different lengths: right padding must not leak into the features.
    meta = prepare(tiny_dir, write_json(tmp_path / "d.json", ALPACA + SHAREGPT), tmp_path / "out", batch_size=3)
    assert meta["features_dtype"] == "float16" and meta["hidden_size"] == 64
    for ids, _, features in shard_tensors(tmp_path / "out", meta):
        assert features.dtype == torch.float16 and features.shape == (len(ids), 64)
        with torch.no_grad(), FeatureCapture(model) as capture:
            model(torch.tensor([ids.tolist()]))
        torch.testing.assert_close(features.float(), capture.features[0], atol=1e-3, rtol=1e-3)


def test_malformed_rows_are_skipped_and_counted(tmp_path, tiny_dir):
    bad = [
        "not an object",
        {"question": "no known keys"},
        {"instruction": "no output"},
        {"instruction": ["wrong"], "input": "", "output": "type"},
        {"conversations": []},
        {"conversations": "not a list"},
        {"conversations": [{"from": "human", "value": "only a question"}]},
        {"conversations": [{"from": "gpt", "value": "answer first"}, {"from": "human", "value": "then a question"}]},
        {"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}, {"from": "gpt", "value": "c"}]},
        {"conversations": [{"from": "robot", "value": "a"}]},
        {"conversations": [{"from": "human"}]},
        {"instruction": "word " * 300, "output": "too long for max_length"},
        # BPE merges the template's newline with the answer's indent: the prompt is no token prefix.
        {"instruction": "def add(a, b):", "output": "    return a + b"},
    ]
    lines = [json.dumps(ALPACA[0]), "{this line is not json", *(json.dumps(r) for r in bad), json.dumps(SHAREGPT[1])]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n\n")
    meta = prepare(tiny_dir, path, tmp_path / "out", max_length=128)
    assert meta["samples"] == 2 and meta["rows_total"] == meta["rows_done"] == 16
    assert meta["skipped"] == {
        "invalid_json": 1, "not_an_object": 1, "missing_keys": 3, "wrong_types": 2, "empty_conversation": 1,
        "no_assistant_turn": 1, "roles_out_of_order": 2, "unknown_role": 1, "no_answer_within_max_length": 1,
        "template_mismatch": 1,
    }


@pytest.mark.parametrize("content, message", [
    (None, "data file not found"),
    ("this is not json\nnor this", "is not JSON"),
    ('{"instruction": "a", "output": "b"}', "not a list of rows"),
    ("[]", "holds no rows"),
])
def test_unusable_data_file_is_a_clear_error(tmp_path, tiny_dir, content, message):
    path = tmp_path / "d.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(TurboLMError, match=message):
        prepare(tiny_dir, path, tmp_path / "out")


def test_max_samples_uses_the_first_rows(tmp_path, tiny_dir):
    meta = prepare(tiny_dir, write_json(tmp_path / "d.json", ALPACA + SHAREGPT), tmp_path / "out", max_samples=2)
    assert meta["rows_total"] == 2 and meta["samples"] == 2 and meta["shards"][0]["rows"] == [0, 2]


def test_resume_after_a_kill_gives_identical_shards(tmp_path, tiny_dir, monkeypatch):
    rows = write_json(tmp_path / "d.json", ALPACA + SHAREGPT + [{"conversations": []}] + ALPACA)
    reference = prepare(tiny_dir, rows, tmp_path / "ref", shard_size=2, batch_size=2)
    assert len(reference["shards"]) == 4 and reference["shards"][2]["rows"] == [4, 7]

    real_write, calls = data._write_shard, []

    def killed_after_second_shard_file(path, samples, features):
        calls.append(path.name)
        real_write(path, samples, features)
        if len(calls) == 2:  # the shard file is in place but meta does not list it yet
            raise KeyboardInterrupt

    monkeypatch.setattr(data, "_write_shard", killed_after_second_shard_file)
    with pytest.raises(KeyboardInterrupt):
        prepare(tiny_dir, rows, tmp_path / "out", shard_size=2, batch_size=2)
    partial = read_meta(tmp_path / "out")
    assert not partial["complete"] and partial["rows_done"] == 2 and len(partial["shards"]) == 1
    (tmp_path / "out" / ".shard-00001.safetensors.tmp").write_bytes(b"half a shard")
    with pytest.raises(TurboLMError, match="rerun `turbolm draft prepare`"):
        FeatureDataset(tmp_path / "out")

    monkeypatch.setattr(data, "_write_shard", real_write)
    resumed = prepare(tiny_dir, rows, tmp_path / "out", shard_size=2, batch_size=2)
    assert resumed == reference
    names = sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "out").iterdir())
    for name in names:
        assert (tmp_path / "ref" / name).read_bytes() == (tmp_path / "out" / name).read_bytes(), name


def test_out_dir_of_another_preparation_is_an_error(tmp_path, tiny_dir):
    rows = write_json(tmp_path / "d.json", ALPACA)
    out = tmp_path / "out"
    meta = prepare(tiny_dir, rows, out)
    other = make_model_dir(tmp_path / "other", seed=1)
    with pytest.raises(TurboLMError, match="belongs to another preparation .*target.*use another out"):
        prepare(other, rows, out)
    with pytest.raises(TurboLMError, match="max_length differs"):
        prepare(tiny_dir, rows, out, max_length=100)
    # The same settings again: already complete, nothing rewritten.
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert prepare(tiny_dir, rows, out) == meta
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(TurboLMError, match="holds other files"):
        prepare(tiny_dir, rows, tmp_path / "busy")


def test_regenerate_uses_the_targets_greedy_answers(tmp_path, tiny_dir, tiny):
    model, tokenizer = tiny
    rows = ALPACA[:2] + SHAREGPT
    meta = prepare(tiny_dir, write_json(tmp_path / "d.json", rows), tmp_path / "out", regenerate=True,
                   regen_max_new_tokens=12, batch_size=2)
    assert meta["regenerate"] and meta["regen_max_new_tokens"] == 12
    samples = shard_tensors(tmp_path / "out", meta)
    assert len(samples) == 4
    prompts = [[{"role": "user", "content": ALPACA[0]["instruction"]}],
               [{"role": "user", "content": "What is the capital of France?\n\nAnswer in one word."}],
               [{"role": "system", "content": "Speculative decoding drafts tokens."}, {"role": "user", "content": "Hello world!"}],
               [{"role": "user", "content": "Numbers: 0 1 2 3"}]]
    for (ids, mask, _), prompt in zip(samples, prompts):
        prompt_ids = encode_chat(tokenizer, prompt)
        expected = generate(model, tokenizer, prompt_ids, max_new_tokens=12).text
        answer = ids[mask.bool()].tolist()
        assert ids.tolist()[: len(prompt_ids)] == prompt_ids and mask.tolist().index(1) == len(prompt_ids)
        assert tokenizer.decode(answer[-1:]) == END
        assert tokenizer.decode(answer, skip_special_tokens=True) == expected


def test_feature_dataset_round_trip(tmp_path, tiny_dir):
    meta = prepare(tiny_dir, write_json(tmp_path / "d.json", ALPACA + SHAREGPT), tmp_path / "out", shard_size=2)
    expected = shard_tensors(tmp_path / "out", meta)
    ds = FeatureDataset(tmp_path / "out")
    assert len(ds) == len(expected) == 5 and len(meta["shards"]) == 3
    for i in [0, 3, 1, 4, 2, -1]:
        item, (ids, mask, features) = ds[i], expected[i]
        assert item["input_ids"].dtype == torch.long and item["loss_mask"].dtype == torch.bool
        assert item["features"].dtype == torch.float32 and item["features"].shape == (len(ids), 64)
        assert torch.equal(item["input_ids"], ids.long()) and torch.equal(item["loss_mask"], mask.bool())
        assert torch.equal(item["features"], features.float())
    assert torch.equal(pickle.loads(pickle.dumps(ds))[2]["features"], ds[2]["features"])
    with pytest.raises(IndexError):
        ds[5]


def test_feature_dataset_errors(tmp_path):
    with pytest.raises(TurboLMError, match="not found"):
        FeatureDataset(tmp_path / "nowhere")
    with pytest.raises(TurboLMError, match="not a prepared feature directory"):
        FeatureDataset(tmp_path)


def test_cli_prepare(tmp_path, tiny_dir, capsys):
    rows = write_json(tmp_path / "d.json", ALPACA + [{"conversations": []}])
    rc = main(["draft", "prepare", "--target", str(tiny_dir), "--data", str(rows), "--out", str(tmp_path / "out"),
               "--max-length", "128", "--batch-size", "2"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert "estimated disk:" in err and "for 4 rows" in err
    assert "3 samples" in out and "1 empty_conversation" in out
    assert FeatureDataset(tmp_path / "out").meta["max_length"] == 128


def test_cli_missing_data_file_is_one_line(tmp_path, capsys):
    rc = main(["draft", "prepare", "--data", str(tmp_path / "missing.json"), "--out", str(tmp_path / "out")])
    _, err = capsys.readouterr()
    assert rc == 2
    assert err.startswith("turbolm: error: data file not found") and err.count("\n") == 1


def test_features_from_exported_tokens(tiny_dir, tmp_path):
    """Regenerate on one machine, export the tokens, compute the features on another: the same
    samples and features as preparing in one go; another target's tokens are refused."""
    from turbolm.speculative.draft.data import export_tokens, prepare_from_tokens

    rows = write_json(tmp_path / "rows.json", ALPACA * 3)
    whole = prepare(tiny_dir, rows, tmp_path / "whole", regenerate=True, regen_max_new_tokens=12, shard_size=4)
    assert export_tokens(tmp_path / "whole", tmp_path / "tokens.safetensors") == whole["samples"]
    split = prepare_from_tokens(str(tiny_dir), tmp_path / "tokens.safetensors", tmp_path / "split", shard_size=3,
                                progress=False)
    assert split["complete"] and split["regenerate"] is True and split["samples"] == whole["samples"]
    for (i1, m1, f1), (i2, m2, f2) in zip(shard_tensors(tmp_path / "whole", whole), shard_tensors(tmp_path / "split", split)):
        assert torch.equal(i1, i2) and torch.equal(m1, m2)
        torch.testing.assert_close(f1.float(), f2.float(), atol=2e-3, rtol=1e-3)  # batched differently
    assert len(FeatureDataset(tmp_path / "split")) == whole["samples"]
    # A prepared directory works as the token source too; another target is refused.
    assert prepare_from_tokens(str(tiny_dir), tmp_path / "whole", tmp_path / "again", progress=False)["samples"] == whole["samples"]
    other = make_model_dir(tmp_path / "other", "llama", seed=3)
    with pytest.raises(TurboLMError, match="another target"):
        prepare_from_tokens(str(other), tmp_path / "tokens.safetensors", tmp_path / "bad", progress=False)
    with pytest.raises(TurboLMError, match="token file not found"):
        prepare_from_tokens(str(tiny_dir), tmp_path / "missing.safetensors", tmp_path / "bad2", progress=False)
    rc = main(["draft", "prepare", "--target", str(tiny_dir), "--from-tokens", str(tmp_path / "tokens.safetensors"),
               "--out", str(tmp_path / "cli"), "--regenerate"])
    assert rc == 2


def test_regen_dtype_writes_answers_with_another_precision_copy(tmp_path, tiny_dir):
    """--regen-dtype: the answers come from a bfloat16 copy (recorded in meta, part of what a
    resume must agree on); the features are still the float32 target's."""
    rows = write_json(tmp_path / "d.json", ALPACA[:2] + SHAREGPT)
    meta = prepare(tiny_dir, rows, tmp_path / "bf16", regenerate=True, regen_max_new_tokens=8, regen_dtype="bfloat16")
    assert meta["regen_dtype"] == "bfloat16" and meta["features_dtype"] == "float16"
    with pytest.raises(TurboLMError, match="regen_dtype differs"):
        prepare(tiny_dir, rows, tmp_path / "bf16", regenerate=True, regen_max_new_tokens=8)
    plain = prepare(tiny_dir, rows, tmp_path / "fp32", regenerate=True, regen_max_new_tokens=8)
    assert plain["regen_dtype"] == "float32"


def test_prompt_only_rows_are_regenerated(tmp_path, tiny_dir):
    """ShareGPT first turns without an answer: usable with --regenerate, skipped without."""
    rows = [{"conversations": [{"from": "human", "value": f"Tell me about number {i}."}]} for i in range(3)]
    path = write_json(tmp_path / "d.json", rows)
    meta = prepare(tiny_dir, path, tmp_path / "regen", regenerate=True, regen_max_new_tokens=6)
    assert meta["samples"] == 3
    meta = prepare(tiny_dir, path, tmp_path / "plain", shard_size=2)
    assert meta["samples"] == 0 and meta["skipped"] == {"no_assistant_turn": 3}


def test_sampled_answers_follow_the_targets_distribution(tiny):
    """--regen-temperature T: each answer's first token is drawn from the target's softmax(logits /
    T) (chi-square over 600 draws; greedy, or another temperature, fails it); the same seed gives
    the same answers, another seed others, and the global generator is left as it was."""
    from turbolm.speculative.draft.data import generate_answers

    model, tokenizer = tiny
    prompt = encode_chat(tokenizer, [{"role": "user", "content": "Hello world!"}])
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1].float()

    def first_tokens(temperature, seed=0, n=600):
        answers = generate_answers(model, tokenizer, [prompt] * n, max_new_tokens=1, batch_size=200, max_length=256,
                                   temperature=temperature, seed=seed)
        return [tokenizer.encode(a, add_special_tokens=False)[:1] for a in answers]

    def chi_square(tokens, temperature):
        probs = (logits / temperature).softmax(-1)
        counts = torch.zeros_like(probs)
        for t in tokens:
            counts[t[0] if t else tokenizer.eos_token_id] += 1  # an empty answer: the first token ended it
        expected = probs * len(tokens)
        big = expected >= 5  # cells with enough expected draws; the rest pooled
        stat = ((counts[big] - expected[big]) ** 2 / expected[big]).sum()
        rest_obs, rest_exp = counts[~big].sum(), expected[~big].sum()
        if rest_exp > 0:
            stat += (rest_obs - rest_exp) ** 2 / rest_exp
        return float(stat), int(big.sum())

    state = torch.random.get_rng_state()
    tokens = first_tokens(1.5)
    assert torch.equal(torch.random.get_rng_state(), state)
    stat, cells = chi_square(tokens, 1.5)
    assert stat < cells + 5 * (2 * cells) ** 0.5, (stat, cells)  # ~5 standard deviations of chi-square(cells)
    wrong, _ = chi_square(tokens, 0.5)
    assert wrong > stat + 10 * (2 * cells) ** 0.5
    assert first_tokens(1.5) == tokens and first_tokens(1.5, seed=1) != tokens
    greedy = generate_answers(model, tokenizer, [prompt] * 3, max_new_tokens=1, batch_size=3, max_length=256)
    assert len(set(greedy)) == 1


def test_sampled_regeneration_resumes_to_the_same_shards(tmp_path, tiny_dir, monkeypatch):
    """A preparation with --regen-temperature killed after its first shard and resumed writes the
    shards one uninterrupted run writes; the temperature is part of what a resume must agree on."""
    rows = write_json(tmp_path / "d.json", ALPACA * 3)
    whole = prepare(tiny_dir, rows, tmp_path / "whole", regenerate=True, regen_max_new_tokens=10, shard_size=3,
                    regen_temperature=1.0)
    assert whole["regen_temperature"] == 1.0 and len(whole["shards"]) == 3
    real_write = data._write_shard

    def killed_at_second_shard(path, samples, features):
        if path.name != "shard-00000.safetensors":
            raise KeyboardInterrupt
        real_write(path, samples, features)

    monkeypatch.setattr(data, "_write_shard", killed_at_second_shard)
    with pytest.raises(KeyboardInterrupt):
        prepare(tiny_dir, rows, tmp_path / "split", regenerate=True, regen_max_new_tokens=10, shard_size=3,
                regen_temperature=1.0)
    monkeypatch.setattr(data, "_write_shard", real_write)
    assert len(read_meta(tmp_path / "split")["shards"]) == 1
    with pytest.raises(TurboLMError, match="regen_temperature differs"):
        prepare(tiny_dir, rows, tmp_path / "split", regenerate=True, regen_max_new_tokens=10, shard_size=3)
    split = prepare(tiny_dir, rows, tmp_path / "split", regenerate=True, regen_max_new_tokens=10, shard_size=3,
                    regen_temperature=1.0)
    a, b = shard_tensors(tmp_path / "whole", whole), shard_tensors(tmp_path / "split", split)
    assert len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    greedy = prepare(tiny_dir, rows, tmp_path / "greedy", regenerate=True, regen_max_new_tokens=10, shard_size=3)
    assert greedy["regen_temperature"] is None
    assert any(not torch.equal(x[0], y[0]) for x, y in zip(a, shard_tensors(tmp_path / "greedy", greedy)))
    with pytest.raises(TurboLMError, match="regen_temperature"):
        prepare(tiny_dir, rows, tmp_path / "bad", regenerate=True, regen_temperature=-1.0)


def test_cli_regen_temperature_needs_regenerate(tmp_path, tiny_dir, capsys):
    rows = write_json(tmp_path / "d.json", ALPACA)
    rc = main(["draft", "prepare", "--target", str(tiny_dir), "--data", str(rows), "--out", str(tmp_path / "out"),
               "--regen-temperature", "1"])
    assert rc == 2 and "--regen-temperature needs --regenerate" in capsys.readouterr().err
