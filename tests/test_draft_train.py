"""Draft training: it learns, it resumes exactly, its checkpoint serves the Jakiro proposer."""

import json

import pytest
import torch

from turbolm import TurboLMError, encode_prompt, generate, load_target
from turbolm.speculative import SpeculativeGenerator, TreeConfig
from turbolm.speculative.draft.data import prepare_features
from turbolm.speculative.draft.model import load_draft
from turbolm.speculative.draft.train import TrainConfig, chain_agreement, draft_loss, train
from turbolm.speculative.proposers.jakiro import JakiroProposer

ROWS = [
    {"instruction": f"Say the colours number {i}.", "input": "", "output": "red green blue " * (2 + i % 3) + "and the sea."}
    for i in range(36)
]


@pytest.fixture(scope="module")
def prepared(tiny_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("prep")
    (d / "data.json").write_text(json.dumps(ROWS))
    prepare_features(tiny_dir, d / "data.json", d / "features", max_length=128, shard_size=16, progress=False)
    return d / "features"


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
