"""Draft training: it learns, it resumes exactly, its checkpoint serves the Jakiro proposer."""

import json
import math

import pytest
import torch

from turbolm import TurboLMError, encode_prompt, generate, load_target
from turbolm.speculative import SpeculativeGenerator, TreeConfig
from turbolm.speculative.draft.model import load_draft
from turbolm.speculative.draft.train import TrainConfig, chain_agreement, draft_loss, train
from turbolm.speculative.proposers.jakiro import JakiroProposer


def config(prepared, out, tiny_dir, **kw):
    base = dict(data=str(prepared), out=str(out), target=str(tiny_dir), epochs=3, batch_size=4, lr=3e-3,
                warmup_steps=2, eval_samples=4, eval_depth=3, save_every=5, seed=0)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("arch, mode, vocab", [("jakiro", "mixture", 0), ("jakiro", "decoupled", 64), ("eagle2", "mixture", 0)])
def test_training_learns_and_serves_the_proposer(prepared, tmp_path, tiny_dir, arch, mode, vocab):
    out = tmp_path / "ckpt"
    res = train(config(prepared, out, tiny_dir, arch=arch, candidate_mode=mode, draft_vocab_size=vocab), progress=False)
    assert res["finished"]
    log = [json.loads(l) for l in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < losses[0]
    evals = [r["eval"] for r in log if "eval" in r]
    assert len(evals) == 3 and set(evals[-1]["agree"]) == {"1", "2", "3"}
    assert (out / "loss.png").is_file()
    target, tok = load_target(tiny_dir)
    draft = load_draft(out, target)
    assert draft.config.arch == arch and draft.config.candidate_mode == mode and draft.draft_vocab.numel() == vocab
    gen = SpeculativeGenerator(target, tok, JakiroProposer(draft, target, TreeConfig(total_tokens=8, depth=4, top_k=2)))
    ids = encode_prompt(tok, "Say the colours number 3.")
    res = gen.generate(ids, max_new_tokens=32)
    assert res.token_ids == generate(target, tok, ids, max_new_tokens=32).token_ids


def test_resume_after_kill_reproduces_the_uninterrupted_run(prepared, tmp_path, tiny_dir):
    full = tmp_path / "full"
    train(config(prepared, full, tiny_dir, epochs=2), progress=False)
    part = tmp_path / "part"
    r = train(config(prepared, part, tiny_dir, epochs=2, max_steps=7), progress=False)  # "killed" after step 7
    assert not r["finished"] and r["step"] == 7
    with pytest.raises(TurboLMError, match="pass resume to continue it"):
        train(config(prepared, part, tiny_dir, epochs=2), progress=False)
    with pytest.raises(TurboLMError, match="other settings"):
        train(config(prepared, part, tiny_dir, epochs=2, lr=1e-3), resume=True, progress=False)
    assert train(config(prepared, part, tiny_dir, epochs=2), resume=True, progress=False)["finished"]
    a = load_draft(full).state_dict()
    b = load_draft(part).state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_chain_agreement_step1_matches_training_accuracy(prepared, tiny_dir):
    from turbolm.speculative.draft.data import FeatureDataset
    from turbolm.speculative.draft.model import DraftConfig, DraftModel
    from turbolm.speculative.draft.train import collate

    target, _ = load_target(tiny_dir)
    torch.manual_seed(0)
    draft = DraftModel(DraftConfig.for_target(target)).eval()
    sample = FeatureDataset(prepared)[0]
    embed, head = target.get_input_embeddings(), target.get_output_embeddings().weight
    with torch.no_grad():
        parts = draft_loss(draft, embed, head, collate([sample]), TrainConfig(data="", out="", noise=0.0))
    hits, total = chain_agreement(draft, embed, head, sample, depth=3)["agree"][1]
    assert total > 0 and abs(hits / total - float(parts["acc"])) < 1e-6


def _pieces(tiny_dir, **overrides):
    from turbolm.speculative.draft.model import DraftConfig, DraftModel

    target, _ = load_target(tiny_dir)
    torch.manual_seed(0)
    draft = DraftModel(DraftConfig.for_target(target, **overrides)).eval()
    return target, draft, target.get_input_embeddings(), target.get_output_embeddings().weight


def test_unrolled_steps_equal_running_each_chain_alone(prepared, tiny_dir):
    """Training-time test: step k of chain j is the draft run on true entries 0..j, then on its
    own predicted features one entry at a time - exactly what a tree does."""
    from turbolm.speculative.draft.data import FeatureDataset
    from turbolm.speculative.draft.model import KVCache
    from turbolm.speculative.draft.train import unrolled

    _, draft, embed, _ = _pieces(tiny_dir)
    s = FeatureDataset(prepared)[0]
    ids, f = s["input_ids"], s["features"]
    with torch.no_grad():
        steps = {k: out.hidden[0] for k, out in unrolled(draft, embed, ids[None], f[None, :-1], 3)}
        for j in (0, 4, 9):
            cache = KVCache()
            out = draft(embed(ids[None, 1 : j + 2]), f[None, : j + 1], torch.arange(j + 1)[None], cache)
            hidden = out.hidden[:, -1:]
            assert torch.allclose(hidden[0, 0], steps[1][j], atol=1e-5)
            for k in (2, 3):
                out = draft(embed(ids[None, j + k : j + k + 1]), hidden, torch.tensor([[j + k - 1]]), cache)
                hidden = out.hidden
                assert torch.allclose(hidden[0, 0], steps[k][j], atol=1e-5), (j, k)


def test_training_time_test_loss_is_the_mean_over_steps(prepared, tiny_dir):
    from turbolm.speculative.draft.data import FeatureDataset
    from turbolm.speculative.draft.train import collate

    _, draft, embed, head = _pieces(tiny_dir)
    batch = collate([FeatureDataset(prepared)[i] for i in range(3)])
    with torch.no_grad():
        one = draft_loss(draft, embed, head, batch, TrainConfig(data="", out="", noise=0.0))
        two = draft_loss(draft, embed, head, batch, TrainConfig(data="", out="", noise=0.0, ttt_steps=2))
    assert "acc_2" in two and "acc_2" not in one
    assert float(two["acc"]) == float(one["acc"])
    # loss(2 steps) = (loss of step 1 + loss of step 2) / 2, and step 2 is not step 1 again
    step2 = 2 * float(two["loss"]) - float(one["loss"])
    assert step2 > 0 and abs(step2 - float(one["loss"])) > 1e-4


def test_training_time_test_trains_and_records_later_steps(prepared, tmp_path, tiny_dir):
    out = tmp_path / "ttt"
    train(config(prepared, out, tiny_dir, epochs=1, ttt_steps=3, clip_mode="value", weight_decay=1e-3, init="target"),
          progress=False)
    rows = [json.loads(l) for l in (out / "train_log.jsonl").read_text().splitlines()]
    assert any("acc_3" in r for r in rows)
    assert "experts" in rows[-1]["eval"] and -1 <= rows[-1]["eval"]["experts"]["cosine"] <= 1
    assert load_draft(out).config.contrastive_pairing == "expert"
    # init from a checkpoint: its weights and vocabulary are the start (lr 0 keeps them)
    again = tmp_path / "again"
    train(config(prepared, again, tiny_dir, epochs=1, init=str(out), lr=0.0), progress=False)
    a, b = load_draft(out).state_dict(), load_draft(again).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(TurboLMError, match="train with the same arch"):
        train(config(prepared, tmp_path / "x", tiny_dir, init=str(out), arch="eagle2"), progress=False)


def test_expert_size_splits_the_target_ffn_and_is_kept_when_continued(prepared, tmp_path, tiny_dir):
    """--expert-size I/2: the two experts start from the two halves of the target's FFN (as many
    parameters as EAGLE-2's); a run continued from that checkpoint keeps its size; another size is refused."""
    out = tmp_path / "half"
    target, _ = load_target(tiny_dir)
    half = target.config.intermediate_size // 2
    train(config(prepared, out, tiny_dir, epochs=1, init="target", expert_size=half, lr=0.0), progress=False)
    draft = load_draft(out, target)
    assert draft.config.expert_intermediate_size == half
    mlp = target.get_decoder().layers[-1].mlp
    for e, expert in enumerate(draft.experts):
        assert torch.equal(expert.up_proj.weight, mlp.up_proj.weight[e * half:(e + 1) * half])
    again = tmp_path / "again"
    train(config(prepared, again, tiny_dir, epochs=1, init=str(out)), progress=False)
    assert load_draft(again, target).config.expert_intermediate_size == half
    with pytest.raises(TurboLMError, match="expert_size"):
        train(config(prepared, tmp_path / "x", tiny_dir, init=str(out), expert_size=half + 1), progress=False)
    with pytest.raises(TurboLMError, match="expert_size"):
        train(config(prepared, tmp_path / "y", tiny_dir, arch="eagle2", expert_size=half), progress=False)


@pytest.mark.parametrize("field, value", [("ttt_steps", 0), ("clip_mode", "max"), ("init", "no/such/dir"),
                                          ("contrastive_pairing", "other"), ("expert_size", -1)])
def test_bad_training_settings_name_the_parameter(prepared, tmp_path, tiny_dir, field, value):
    with pytest.raises(TurboLMError, match=field):
        train(config(prepared, tmp_path / "x", tiny_dir, **{field: value}), progress=False)


def test_contrastive_pairing_follows_the_reference(tiny_dir):
    """expert: value slot E+e belongs to expert e, whatever the mixture ranks first."""
    _, draft, embed, _ = _pieces(tiny_dir, contrastive_pairing="expert")
    H = draft.config.hidden_size
    torch.manual_seed(3)
    x, feats = torch.randn(1, 12, H), torch.randn(1, 12, H)
    with torch.no_grad():
        out = draft(x, feats, torch.arange(12)[None])
        logits = draft.router(draft.post_attention_norm(out.residual))
        v = logits[..., 2:].softmax(-1)
        a = v.argmax(-1, keepdim=True)
        e_a = torch.where(a == 0, out.experts[..., 0, :], out.experts[..., 1, :])
        e_b = torch.where(a == 0, out.experts[..., 1, :], out.experts[..., 0, :])
        expected = out.residual + v.max(-1, keepdim=True).values * e_a - v.min(-1, keepdim=True).values * e_b
        assert torch.allclose(out.contrastive, expected, atol=1e-5)
        # ranked (the first shipped drafts): slot e is the mixture's e-th expert, so the two agree
        # exactly where the mixture ranks expert 0 first
        draft.config.contrastive_pairing = "ranked"
        ranked = draft(x, feats, torch.arange(12)[None])
        same = (logits[..., 0] >= logits[..., 1])[0]
        assert 0 < int(same.sum()) < 12
        diff = (ranked.contrastive - out.contrastive).abs().amax(-1)[0]
        assert (diff[same] < 1e-6).all() and (diff[~same] > 1e-6).all()


def test_init_from_target_copies_the_last_layer(tiny_dir):
    from turbolm.speculative.draft.model import init_from_target

    for arch in ("eagle2", "jakiro"):
        target, draft, _, _ = _pieces(tiny_dir, arch=arch)
        done = init_from_target(draft, target)
        layer = target.get_decoder().layers[-1]
        for p in ("q_proj", "k_proj", "v_proj"):
            assert p in done and torch.equal(getattr(draft, p).weight, getattr(layer.self_attn, p).weight)
        H = draft.config.hidden_size
        assert torch.equal(draft.fc.weight[:, H:], torch.eye(H)) and not draft.o_proj.weight.any()
        # the start is the identity on the feature: the output is the input feature
        feats = torch.randn(1, 5, H)
        with torch.no_grad():
            out = draft(torch.zeros(1, 5, H), feats, torch.arange(5)[None])
        assert torch.allclose(out.hidden, feats, atol=1e-6)
        if arch == "eagle2":
            assert torch.equal(draft.mlp.up_proj.weight, layer.mlp.up_proj.weight) and not draft.mlp.down_proj.weight.any()
        else:
            I = draft.config.expert_intermediate_size
            copied = [n for n in done if n.startswith("experts.")]
            assert copied, done
            assert torch.equal(draft.experts[0].gate_proj.weight, layer.mlp.gate_proj.weight[:I])


def test_expert_similarity_sees_identical_experts(prepared, tiny_dir):
    from turbolm.speculative.draft.data import FeatureDataset
    from turbolm.speculative.draft.train import expert_similarity

    _, draft, embed, head = _pieces(tiny_dir)
    sample = FeatureDataset(prepared)[0]
    with torch.no_grad():
        apart = expert_similarity(draft, embed, head, sample)
        draft.experts[1].load_state_dict(draft.experts[0].state_dict())
        alike = expert_similarity(draft, embed, head, sample)
    assert apart["n"] == alike["n"] > 0
    assert abs(alike["cosine"] / alike["n"] - 1) < 1e-5 and alike["top1_agree"] == alike["n"]
    assert apart["cosine"] / apart["n"] < 0.9


def test_training_from_a_token_file_computes_the_features(prepared, tmp_path, tiny_dir):
    """A token file trains like its prepared directory: the same samples, the target's features
    computed in memory (equal to the stored float16 ones up to that rounding); bf16 autocast and a
    bf16 target run; the draft serves losslessly."""
    from turbolm.speculative.draft.data import FeatureDataset, TokenFeatures, export_tokens

    tokens = tmp_path / "tokens.safetensors"
    export_tokens(prepared, tokens)
    target, tok = load_target(tiny_dir)
    stored, computed = FeatureDataset(prepared), TokenFeatures(tokens, target)
    assert len(computed) == len(stored) and computed.lengths() == stored.lengths()
    for i in (0, len(stored) - 1):
        a, b = stored[i], computed[i]
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["loss_mask"], b["loss_mask"])
        torch.testing.assert_close(b["features"], a["features"], rtol=2e-3, atol=2e-3)
    assert len(TokenFeatures(tokens, target, samples=5)) == 5
    from turbolm.speculative.draft.data import merge_tokens, read_tokens

    twice = tmp_path / "twice.safetensors"
    assert merge_tokens([tokens, tokens], twice) == 2 * len(stored)
    (one, source), (two, source2) = read_tokens(tokens), read_tokens(twice)
    assert two == one + one and source2 == source
    out = tmp_path / "ckpt"
    res = train(config(tokens, out, tiny_dir, draft_vocab_size=64, mixed_precision="bf16", target_dtype="bfloat16"),
                progress=False)
    assert res["finished"]
    losses = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0]
    draft = load_draft(out, target)
    gen = SpeculativeGenerator(target, tok, JakiroProposer(draft, target, TreeConfig(total_tokens=8, depth=4, top_k=2)))
    ids = encode_prompt(tok, "Say the colours number 3.")
    assert gen.generate(ids, max_new_tokens=24).token_ids == generate(target, tok, ids, max_new_tokens=24).token_ids
    with pytest.raises(TurboLMError, match="mixed_precision"):
        train(config(tokens, tmp_path / "x", tiny_dir, mixed_precision="fp8"), progress=False)


def test_training_reads_several_prepared_directories_as_one(prepared, tmp_path, tiny_dir):
    """``data`` with several prepared directories: one dataset in the order given (lengths, token
    statistics, items), the held-out samples the last directory's last; the CLI takes them after one
    ``--data`` and records one source as before; a token file among them, or directories of other
    widths, are refused with one line naming the cause."""
    from conftest import DRAFT_ROWS, make_model_dir
    from turbolm.cli import build_parser
    from turbolm.commands.draft import cmd_train
    from turbolm.core.errors import DataError, ParameterError
    from turbolm.speculative.draft.data import FeatureDataset, FeatureDatasets, export_tokens, prepare_features
    from turbolm.speculative.draft.train import draft_vocabulary

    one = FeatureDataset(prepared)
    both = FeatureDatasets([prepared, prepared])
    assert len(both) == 2 * len(one) and both.lengths() == one.lengths() * 2 and both.vocab_size == one.vocab_size
    last = len(both) - 1
    assert torch.equal(both[last]["input_ids"], one[len(one) - 1]["input_ids"])
    assert torch.equal(both[len(one)]["features"], one[0]["features"])
    counted = lambda ds, n: sum(int(m.sum()) for _, m in ds.iter_tokens(n))  # noqa: E731
    assert counted(both, None) == 2 * counted(one, None)
    assert counted(both, len(one) + 3) == counted(one, None) + counted(one, 3)
    histogram = lambda ds, *ns: sum(torch.bincount(ids[m], minlength=one.vocab_size)  # noqa: E731
                                    for n in ns for ids, m in ds.iter_tokens(n))
    counts = histogram(one, None, 3)  # all of the first directory, 3 samples of the second
    assert torch.equal(histogram(both, len(one) + 3), counts) and not torch.equal(histogram(both, None), counts)
    assert torch.equal(draft_vocabulary(both, 32, len(one) + 3), torch.sort(torch.topk(counts, 32).indices).values)

    out = tmp_path / "ckpt"
    cfg = config(prepared, out, tiny_dir, data=[str(prepared), str(prepared)], epochs=1, draft_vocab_size=32, max_steps=2)
    assert not train(cfg, progress=False)["finished"]
    res = train(config(prepared, out, tiny_dir, data=[str(prepared), str(prepared)], epochs=1, draft_vocab_size=32), resume=True, progress=False)
    assert res["finished"] and res["step"] == -(-(2 * len(one) - 4) // 4)  # both directories, less the 4 held out
    with pytest.raises(TurboLMError, match="other settings"):  # a resume must read the same directories
        train(config(prepared, out, tiny_dir, epochs=1, draft_vocab_size=32), resume=True, progress=False)

    parse = build_parser().parse_args
    argv = ["draft", "train", "--out", str(tmp_path / "x"), "--target", str(tiny_dir), "--data"]
    assert parse(argv + ["a", "b"]).data == ["a", "b"]
    assert cmd_train(parse(argv + [str(prepared), "--epochs", "1", "--max-steps", "1", "--eval-samples", "4"])) == 0
    state = tmp_path / "x" / json.loads((tmp_path / "x" / "latest.json").read_text())["state"] / "state.json"
    assert json.loads(state.read_text())["config"]["data"] == str(prepared)  # one source: recorded as before

    tokens = tmp_path / "tokens.safetensors"
    export_tokens(prepared, tokens)
    with pytest.raises(ParameterError, match="merge token files first") as e:
        train(config(prepared, tmp_path / "y", tiny_dir, data=[str(prepared), str(tokens)]), progress=False)
    assert e.value.params == ("data",)
    with pytest.raises(ParameterError, match="no training data"):
        train(config(prepared, tmp_path / "z", tiny_dir, data=[]), progress=False)
    narrow = make_model_dir(tmp_path / "narrow", "llama", hidden_size=32)
    (tmp_path / "rows.json").write_text(json.dumps(DRAFT_ROWS[:4]))
    prepare_features(narrow, tmp_path / "rows.json", tmp_path / "narrow-features", max_length=64, progress=False)
    with pytest.raises(DataError, match="32-wide features"):
        FeatureDatasets([prepared, tmp_path / "narrow-features"])
    with pytest.raises(TurboLMError, match="different target"):
        train(config(prepared, tmp_path / "w", tiny_dir, data=[str(prepared), str(tmp_path / "narrow-features")]), progress=False)
