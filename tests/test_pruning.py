"""FTP token skipping, factors, routers, losses and checkpoints on tiny random models."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_model_dir, random_ids
from turbolm import TurboLMError, load_target
from turbolm.core.generation import forward, generate, new_cache
from turbolm.pruning import LearnedRouter, RandomRouter, StaticRouter, TokenPruner
from turbolm.pruning.factors import build_factors, rank_of, received_attention
from turbolm.pruning.train import distillation_loss, guide_loss, sparsity_loss, static_keep


class FixedRouter:
    """Keeps exactly the tokens whose positions are in ``keep`` (scores 1 vs 0)."""

    kind = "fixed"

    def __init__(self, keep):
        self.keep = set(keep)

    def scores(self, factors, block=None):
        T = factors.shape[1]
        return torch.tensor([[1.0 if i in self.keep else 0.0 for i in range(T)]]).expand(factors.shape[0], T)

    def keep_decode(self, factors, block=None):
        return torch.ones(factors.shape[:-2], dtype=torch.bool)


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory):
    return load_target(make_model_dir(tmp_path_factory.mktemp("one"), "llama", num_hidden_layers=1))


@pytest.fixture()
def three_layers(three_layer_llama):
    return three_layer_llama


_ids = random_ids


def _one_block(model, ids, positions):
    """A one-layer model's logits computed by hand: the layer over ``ids`` only, causal among
    them, with rotary embeddings at ``positions``. (A model forward with such position ids
    would read the gaps as packed-sequence boundaries.)"""
    h = model.model.embed_tokens(ids)
    cos, sin = model.model.rotary_emb(h, positions)
    h = model.model.layers[0](h, attention_mask=None, position_ids=positions, position_embeddings=(cos, sin))
    return model.lm_head(model.model.norm(h))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_zero_sparsity_is_identical(tiny_dirs, arch):
    model, _ = load_target(tiny_dirs[arch])
    ids = _ids(B=2)
    with torch.no_grad():
        dense = model(ids).logits
        with TokenPruner(model, StaticRouter(), [0.0] * model.config.num_hidden_layers):
            pruned = model(ids).logits
    assert torch.equal(dense, pruned)


def test_kept_tokens_computed_at_their_original_positions(one_layer):
    """One block: kept tokens' logits equal a dense forward over just those tokens with their
    original position ids; skipped tokens pass the embedding through unchanged."""
    model, _ = one_layer
    ids = _ids(T=12)
    keep = [0, 2, 3, 7, 10, 11]
    with torch.no_grad():
        with TokenPruner(model, FixedRouter(keep), [0.5]) as p:
            pruned = model(ids, use_cache=False).logits
        assert p.stats.prefill_skipped == 6
        ref = _one_block(model, ids[:, keep], torch.tensor([keep]))
        renumbered = _one_block(model, ids[:, keep], torch.arange(len(keep))[None])
        skipped = [i for i in range(12) if i not in keep]
        emb = model.model.embed_tokens(ids[:, skipped])
        passthrough = model.lm_head(model.model.norm(emb))
    torch.testing.assert_close(pruned[:, keep], ref, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(pruned[:, keep], renumbered, atol=1e-3)  # positions matter
    torch.testing.assert_close(pruned[:, skipped], passthrough, rtol=1e-4, atol=1e-5)


def test_first_token_always_kept(one_layer):
    model, _ = one_layer
    ids = _ids(T=10)
    with torch.no_grad(), TokenPruner(model, FixedRouter(range(1, 10)), [0.5]):
        pruned = model(ids, use_cache=False).logits
        ref = _one_block(model, ids[:, [0, 5, 6, 7, 8, 9]], torch.tensor([[0, 5, 6, 7, 8, 9]]))
    torch.testing.assert_close(pruned[:, 0], ref[:, 0], rtol=1e-4, atol=1e-5)


def test_training_mode_matches_gathered_inference(three_layers):
    model, _ = three_layers
    ids = _ids(T=30, B=2)
    for router in (StaticRouter(), LearnedRouter()):
        with torch.no_grad(), TokenPruner(model, router, [0.3, 0.5, 0.2]) as p:
            gathered = model(ids, use_cache=False).logits
            p.training_mode = True
            masked = model(ids, use_cache=False).logits
        torch.testing.assert_close(gathered, masked, rtol=1e-4, atol=1e-4)


def test_dense_kv_ablation(one_layer):
    """Kept tokens attend to every token's keys: with one block their logits are the dense ones."""
    model, _ = one_layer
    ids = _ids(T=16)
    keep = [0, 4, 9, 15]
    with torch.no_grad():
        dense = model(ids, use_cache=False).logits
        with TokenPruner(model, FixedRouter(keep), [0.75], dense_kv=True):
            pruned = model(ids, use_cache=False).logits
    torch.testing.assert_close(pruned[:, keep], dense[:, keep], rtol=1e-4, atol=1e-5)


def test_cache_holds_only_computed_tokens(three_layers):
    model, _ = three_layers
    ids = _ids(T=20)
    schedule = [0.25, 0.5, 0.0]
    with torch.no_grad(), TokenPruner(model, StaticRouter(), schedule) as p:
        cache = new_cache(model)
        forward(model, ids, cache)
        assert [cache.layers[i].keys.shape[2] for i in range(3)] == [15, 10, 20]
        p.router = FixedRouter([])  # keep_decode True for every block
        forward(model, torch.tensor([[5]]), cache)
        assert [cache.layers[i].keys.shape[2] for i in range(3)] == [16, 11, 21]

        class Skip(FixedRouter):
            def keep_decode(self, factors, block=None):
                return torch.zeros(factors.shape[:-2], dtype=torch.bool)
        p.router = Skip([])
        forward(model, torch.tensor([[6]]), cache)
        # blocks with sparsity > 0 were skipped by the new token; the dense block was not
        assert [cache.layers[i].keys.shape[2] for i in range(3)] == [16, 11, 22]
        assert p.stats.decode_skipped == 2


def test_decode_positions_are_tracked_by_the_pruner(three_layers):
    """After a sparse prefill, a decoded token must sit at the true next position even though the
    first block's cache is shorter: compare with prefilling everything with the same kept sets."""
    model, _ = three_layers
    ids = _ids(T=12)
    keep = [0, 1, 4, 5, 8, 11]
    with torch.no_grad():
        with TokenPruner(model, FixedRouter(keep), [0.5, 0.5, 0.5]):
            cache = new_cache(model)
            forward(model, ids, cache)
            step = forward(model, torch.tensor([[7]]), cache).logits[0, -1]
        # the same kept sets in one 13-token prefill: `keep` and the new token, 6 of 13 skipped
        with TokenPruner(model, FixedRouter(keep + [12]), [6 / 13] * 3):
            full = model(torch.cat([ids, torch.tensor([[7]])], 1), use_cache=False).logits[0, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)


def test_sparsity_zero_generation_is_token_identical(three_layers):
    model, tok = three_layers
    prompt = tok("The capital of France is")["input_ids"]
    dense = generate(model, tok, prompt, max_new_tokens=12)
    with TokenPruner(model, LearnedRouter(), [0.0, 0.0, 0.0]):
        pruned = generate(model, tok, prompt, max_new_tokens=12)
    assert pruned.token_ids == dense.token_ids


def test_pruned_generation_runs_and_skips(three_layers):
    model, tok = three_layers
    prompt = tok("The capital of France is Paris. The capital of Italy is")["input_ids"]
    with TokenPruner(model, RandomRouter(0), [0.3, 0.3, 0.3]) as p:
        res = generate(model, tok, prompt, max_new_tokens=8)
    assert len(res.token_ids) == 8
    assert 0.2 < p.stats.prefill_sparsity < 0.4
    assert p.stats.decode_pairs == 3 * 7


def test_factors():
    att = torch.tensor([[0.5, 2.0, 1.0, 2.0]])
    torch.testing.assert_close(rank_of(att), torch.tensor([[0.0, 2 / 3, 1 / 3, 1.0]]))  # ties broken by position
    f = build_factors(torch.tensor([[0, 3]]), 4, att, 0.3)
    assert f.shape == (1, 2, 4)
    torch.testing.assert_close(f[0, 1], torch.tensor([1.0, 2.0, 1.0, 0.3]))
    q = torch.randn(1, 4, 2, 8)
    k = torch.randn(1, 2, 5, 8)
    probs = received_attention(q, torch.tensor([[3, 4]]), k, torch.arange(5)[None], 8 ** -0.5)
    assert probs.shape == (1, 5)
    torch.testing.assert_close(probs.sum(), torch.tensor(1.0))  # mean of distributions
    assert float(received_attention(q, torch.tensor([[1, 1]]), k, torch.arange(5)[None], 1.0)[0, 2:].sum()) == 0.0


def test_static_router_prefers_recent_tokens():
    f = build_factors(torch.arange(6)[None], 6, torch.zeros(1, 6), 0.5)
    assert StaticRouter().scores(f).argsort(dim=1).tolist() == [[0, 1, 2, 3, 4, 5]]
    assert static_keep(torch.arange(6)[None], 3).tolist() == [[True, False, False, False, True, True]]


def test_losses_sign_and_gradient():
    dense = torch.randn(2, 5, 11)
    assert float(distillation_loss(dense, dense)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_loss(dense, dense + torch.randn(2, 5, 11))) > 0
    # sparsity: zero when over-pruning (soft sparsity 0.8 > target 0.3) ...
    gates = torch.full((10,), 0.2, requires_grad=True)
    loss = sparsity_loss([gates], [0.3])
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert float(gates.grad.abs().sum()) == 0.0
    # ... positive when keeping too much, and its gradient lowers the gates
    gates = torch.full((10,), 0.9, requires_grad=True)
    loss = sparsity_loss([gates], [0.3])
    assert float(loss.detach()) == pytest.approx(0.2, abs=1e-6)
    loss.backward()
    assert bool((gates.grad > 0).all())
    logits = torch.zeros(1, 4, requires_grad=True)
    guide_loss([logits], [torch.tensor([[True, False, False, True]])]).backward()
    assert logits.grad.tolist()[0][0] < 0 < logits.grad.tolist()[0][1]


def test_straight_through_gradient_reaches_router(three_layers):
    model, _ = three_layers
    router = LearnedRouter()
    with TokenPruner(model, router, [0.3, 0.3, 0.3], train_records=True) as p:
        p.training_mode = True
        model.requires_grad_(False)
        out = model(_ids(T=16), use_cache=False).logits
        out.float().pow(2).mean().backward()
    assert router.net[0].weight.grad is not None and float(router.net[0].weight.grad.abs().sum()) > 0
    assert len(p.records) == 3


def test_checkpoint_round_trip_and_wrong_model(three_layers, tmp_path, tiny_dir):
    from turbolm.pruning.checkpoint import load_pruner, pruner_config, save_pruner

    model, _ = three_layers
    router = LearnedRouter()
    schedule = [0.1, 0.4, 0.4]
    save_pruner(tmp_path / "p", pruner_config(model, router, schedule, target_sparsity=0.3), router)
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    assert cfg["schedule"] == schedule and set(cfg["factors"]) == {"position", "attention", "rank", "sparsity"}
    loaded = load_pruner(tmp_path / "p", model)
    f = torch.rand(1, 7, 4)
    torch.testing.assert_close(loaded.router.scores(f), router.scores(f))
    assert loaded.schedule == schedule
    other, _ = load_target(tiny_dir)
    with pytest.raises(TurboLMError, match="made for another model"):
        load_pruner(tmp_path / "p", other)
    with pytest.raises(TurboLMError, match="no pruner checkpoint"):
        load_pruner(tmp_path / "missing", model)


def test_bad_schedules_are_refused(three_layers):
    model, _ = three_layers
    with pytest.raises(TurboLMError, match="3 layers"):
        TokenPruner(model, StaticRouter(), [0.3, 0.3])
    with pytest.raises(TurboLMError, match=r"\[0, 1\)"):
        TokenPruner(model, StaticRouter(), [0.3, 1.0, 0.3])


def test_prune_cli_end_to_end(tiny_dir, tmp_path, capsys):
    """search -> train (with schedule fine-tune) -> generate -> bench, resumable, on a tiny model."""
    from turbolm.cli import main

    rows = [{"instruction": f"Question {i}: what is {i} plus {i}?", "input": "", "output": f"It is {2 * i}. " * 3}
            for i in range(40)]
    rows.insert(5, {"instruction": 7})  # malformed: counted and skipped
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(rows))
    common = ["--data", str(data), "--model", str(tiny_dir), "--seq-len", "32", "--calibration", "3", "--population", "4"]
    search = tmp_path / "search.json"
    assert main(["prune", "search", "--sparsity", "0.3", "--out", str(search), "--generations", "2", *common]) == 0
    saved = json.loads(search.read_text())
    assert len(saved["search"]["history"]) == 2
    assert abs(sum(saved["search"]["best"]) / 2 - 0.3) < 1e-6
    out = tmp_path / "pruner"
    train = ["prune", "train", "--sparsity", "0.3", "--schedule", str(search), "--out", str(out), "--steps", "4",
             "--save-every", "2", "--finetune-generations", "2", *common]
    assert main(train) == 0
    assert main(train) == 2  # an existing run is not overwritten without --resume
    assert main(train + ["--resume"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["router"] == "learned" and len(cfg["schedule"]) == 2 and (out / "router.safetensors").is_file()
    assert cfg["training"]["steps"] == 4
    blockwise = ["prune", "train", "--sparsity", "0.3", "--schedule", str(search), "--steps", "2", "--block-inputs",
                 "--knots", "4", "--finetune-generations", "0", *common]
    assert main(blockwise + ["--out", str(tmp_path / "blockwise")]) == 0
    cfg = json.loads((tmp_path / "blockwise" / "config.json").read_text())
    assert (cfg["router_blocks"], cfg["router_knots"], cfg["training"]["config"]["block_inputs"]) == (2, 4, True)
    capsys.readouterr()
    assert main(blockwise + ["--out", str(tmp_path / "mod"), "--router", "mod"]) == 2
    assert "--block-inputs is an option of the learned router" in capsys.readouterr().err
    capsys.readouterr()
    assert main(["prune", "generate", "--pruner", str(out), "--model", str(tiny_dir), "--prompt", "Hello",
                 "--max-new-tokens", "5", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["new_tokens"] == 5 and 0.0 < res["prefill_sparsity"] < 0.5
    text = tmp_path / "text.txt"
    text.write_text("The capital of France is Paris. " * 40)
    assert main(["prune", "bench", "--pruner", str(out), "--model", str(tiny_dir), "--prompt-length", "64",
                 "--text-file", str(text), "--repeat", "1", "--json"]) == 0
    bench = json.loads(capsys.readouterr().out)
    assert {"dense_seconds", "pruned_seconds", "speedup", "token_sparsity"} <= set(bench)
    assert 0.2 < bench["token_sparsity"] < 0.4
    assert main(["prune", "bench", "--model", str(tiny_dir), "--prompt-length", "64", "--text-file", str(text)]) == 2


def test_training_resume_is_exact(three_layers, tmp_path):
    """Stopping after 2 of 4 steps and resuming gives the router an uninterrupted run gives."""
    from turbolm.pruning.train import RouterTrainConfig, train_router

    model, _ = three_layers
    chunks = torch.randint(3, 300, (12, 16), generator=torch.Generator().manual_seed(0))
    cfg = RouterTrainConfig(steps=4, batch_size=2, save_every=3)
    full, _ = train_router(model, chunks, [0.3, 0.3, 0.3], tmp_path / "a", cfg, progress=False, log=lambda *_: None)
    cfg.save_every = 3
    train_router(model, chunks, [0.3, 0.3, 0.3], tmp_path / "b", cfg, progress=False, stop_at=2)
    resumed, _ = train_router(model, chunks, [0.3, 0.3, 0.3], tmp_path / "b", cfg, resume=True, progress=False,
                              log=lambda *_: None)
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_default_model_pruning(default_model, tmp_path):
    """The real model: sparsity 0 generation is token-identical; the shipped pruners load and run."""
    from turbolm.pruning.checkpoint import SHIPPED, load_pruner

    model, tok = default_model
    from turbolm import encode_prompt

    prompt = encode_prompt(tok, "What is the capital of France?")
    dense = generate(model, tok, prompt, max_new_tokens=16)
    with TokenPruner(model, LearnedRouter(), [0.0] * model.config.num_hidden_layers):
        assert generate(model, tok, prompt, max_new_tokens=16).token_ids == dense.token_ids
    shipped = sorted(SHIPPED.glob("ftp-*"))
    assert shipped, "no shipped pruner checkpoints"
    for path in shipped:
        pruner = load_pruner(path, model)
        with pruner:
            res = generate(model, tok, list(prompt) * 4, max_new_tokens=8)
        assert len(res.token_ids) > 0
        assert abs(pruner.stats.prefill_sparsity - json.loads((path / "config.json").read_text())["target_sparsity"]) < 0.05


def test_hidden_state_router_trains_and_round_trips(three_layers, tmp_path):
    """The MoD-style ablation: scores from hidden states, trained by the same loop, saved and loaded."""
    from turbolm.pruning.checkpoint import load_pruner, pruner_config, save_pruner
    from turbolm.pruning.router import HiddenStateRouter
    from turbolm.pruning.train import RouterTrainConfig, train_router

    model, tok = three_layers
    chunks = torch.randint(3, 300, (8, 16), generator=torch.Generator().manual_seed(0))
    router, summary = train_router(model, chunks, [0.3, 0.3, 0.3], tmp_path / "mod", RouterTrainConfig(steps=2, batch_size=2),
                                   router=HiddenStateRouter(model.config.hidden_size, 3), progress=False)
    assert summary["steps"] == 2 and router.proj.weight.grad is not None
    save_pruner(tmp_path / "mod", pruner_config(model, router, [0.3, 0.3, 0.3], target_sparsity=0.3), router)
    pruner = load_pruner(tmp_path / "mod", model)
    with torch.no_grad(), pruner:
        pruner.training_mode = False
        a = model(chunks[:2], use_cache=False).logits
        pruner.training_mode = True
        b = model(chunks[:2], use_cache=False).logits
        pruner.training_mode = False
        generate(model, tok, chunks[0].tolist(), max_new_tokens=3)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert 0.25 < pruner.stats.prefill_sparsity < 0.35


@pytest.mark.parametrize("saturated,blocks", [(False, 0), (True, 0), (False, 3)])
def test_learned_router_starts_as_the_static_one(three_layers, saturated, blocks):
    router = LearnedRouter(blocks=blocks).init_static(saturated=saturated)
    f = build_factors(torch.arange(200)[None], 200, torch.rand(1, 200) * 3, 0.3)
    for block in range(max(1, blocks)):
        assert torch.equal(router.scores(f, block).argsort(dim=1), StaticRouter().scores(f).argsort(dim=1))
        assert bool(router.keep_decode(f[:, -1:], block).all())
    model, _ = three_layers
    ids = _ids(T=40, B=2)
    with torch.no_grad():
        with TokenPruner(model, StaticRouter(), [0.3, 0.5, 0.2]):
            static = model(ids, use_cache=False).logits
        with TokenPruner(model, router, [0.3, 0.5, 0.2]):
            learned = model(ids, use_cache=False).logits
    torch.testing.assert_close(static, learned)


def test_block_inputs_tell_blocks_of_equal_sparsity_apart():
    """With ``blocks``, a router's score depends on the block (hidden bias, position offset); the
    offset is the piecewise-linear function through its knots; a block it does not score is refused."""
    router = LearnedRouter(blocks=3, knots=5).init_static()
    f = build_factors(torch.arange(9)[None], 9, torch.rand(1, 9), 0.3)  # positions 0, 1/8, ..., 1
    with torch.no_grad():
        router.position_offset[1] = torch.tensor([0.0, 1.0, -2.0, 0.5, 4.0])
    delta = router.scores(f, 1) - router.scores(f, 0)
    torch.testing.assert_close(delta[0], torch.tensor([0.0, 0.5, 1.0, -0.5, -2.0, -0.75, 0.5, 2.25, 4.0]))
    assert torch.equal(router.scores(f, 2), router.scores(f, 0))
    with torch.no_grad():
        router.block_bias[2, 2:].fill_(1.0)
        router.net[2].weight[0, 2:].fill_(0.5)
    assert not torch.allclose(router.scores(f, 2), router.scores(f, 0))
    with pytest.raises(ValueError, match="pass block in"):
        router.scores(f)
    with pytest.raises(ValueError, match="pass block in"):
        router.scores(f, 3)
    with pytest.raises(ValueError, match="knots"):
        LearnedRouter(blocks=3, knots=1)


def test_block_router_trains_its_block_parameters_and_round_trips(three_layers, tmp_path):
    """Training moves the per-block parameters (at their own learning rate) off zero; the checkpoint
    stores and restores them; a checkpoint whose router scores another number of blocks is refused."""
    from turbolm.core.errors import DataError
    from turbolm.pruning.checkpoint import load_pruner, pruner_config, save_pruner
    from turbolm.pruning.train import RouterTrainConfig, train_router

    model, tok = three_layers
    schedule = [0.3, 0.3, 0.3]
    chunks = torch.randint(3, 300, (8, 24), generator=torch.Generator().manual_seed(0))
    cfg = RouterTrainConfig(steps=3, batch_size=2, lr=1e-3, block_inputs=True, knots=4, block_lr_scale=30.0)
    router, _ = train_router(model, chunks, schedule, tmp_path / "b", cfg, progress=False)
    assert router.blocks == 3 and router.position_offset.shape == (3, 4)
    moved = router.position_offset.detach().abs()
    assert float(moved.max()) > 1e-3  # 30 x 1e-3 per Adam step: the offsets left zero
    train_dir = tmp_path / "b" / "train"
    state = json.loads((train_dir / json.loads((train_dir / "latest.json").read_text())["state"] / "state.json").read_text())
    assert sorted(g["scale"] for g in state["param_groups"]) == [1.0, 30.0]
    save_pruner(tmp_path / "b", pruner_config(model, router, schedule, target_sparsity=0.3), router)
    cfg_file = tmp_path / "b" / "config.json"
    assert json.loads(cfg_file.read_text())["router_blocks"] == 3
    loaded = load_pruner(tmp_path / "b", model)
    f = build_factors(torch.arange(24)[None], 24, torch.rand(1, 24), 0.3)
    for block in range(3):
        torch.testing.assert_close(loaded.router.scores(f, block), router.scores(f, block))
    with torch.no_grad(), loaded:
        generate(model, tok, chunks[0].tolist(), max_new_tokens=3)
    bad = json.loads(cfg_file.read_text())
    bad["router_blocks"] = 5
    cfg_file.write_text(json.dumps(bad))
    with pytest.raises(DataError, match="scores 5 blocks but the model has 3 layers"):
        load_pruner(tmp_path / "b", model)


def _free_unit_gradient(model, router, ids, schedule):
    """The norm of the loss gradient on the output weights of the units beyond the two that
    encode the static rule, after one straight-through training forward."""
    with TokenPruner(model, router, schedule) as p:
        with torch.no_grad(), p.disabled():
            dense = model(ids, use_cache=False).logits
        p.training_mode = True
        pruned = model(ids, use_cache=False).logits
    router.zero_grad()
    distillation_loss(dense, pruned).backward()
    return float(router.net[2].weight.grad[0, 2:].norm())


def test_the_static_start_can_leave_the_static_rule(three_layers):
    """The default start gives the free units a real gradient; the saturated first start (where
    the shipped routers stayed) gives them almost none."""
    model, _ = three_layers
    model.requires_grad_(False)
    ids, schedule = _ids(T=40, B=2), [0.3, 0.5, 0.2]
    torch.manual_seed(0)
    free = _free_unit_gradient(model, LearnedRouter().init_static(), ids, schedule)
    torch.manual_seed(0)
    stuck = _free_unit_gradient(model, LearnedRouter().init_static(saturated=True), ids, schedule)
    assert free > 0 and free > 100 * stuck


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_other_architectures_skip_and_generate(tiny_dirs, arch):
    """Qwen2 (biased q/k projections) and Mistral: the gathered path equals the training path, and
    pruned generation with a KV cache runs."""
    model, tok = load_target(tiny_dirs[arch])
    n = model.config.num_hidden_layers
    ids = _ids(T=30, B=2)
    with torch.no_grad(), TokenPruner(model, LearnedRouter(), [0.4] * n) as p:
        gathered = model(ids, use_cache=False).logits
        p.training_mode = True
        masked = model(ids, use_cache=False).logits
        p.training_mode = False
        res = generate(model, tok, ids[0].tolist(), max_new_tokens=5)
    torch.testing.assert_close(gathered, masked, rtol=1e-4, atol=1e-4)
    assert len(res.token_ids) == 5 and p.stats.prefill_skipped > 0


def test_pack_rows_mixes_plain_text_and_chat_rows(three_layers, tmp_path):
    """Plain-text rows are tokenized as they are (no chat template), closed with EOS; two sources
    share the held-out chunks evenly and alternate in the training chunks."""
    from turbolm.core.chat import encode_chat
    from turbolm.pruning.data import pack_rows

    _, tok = three_layers
    text = tmp_path / "wiki.jsonl"
    text.write_text("".join(json.dumps({"id": i, "title": f"T{i}", "text": f"Article {i} says the sea is deep. " * 12})
                            + "\n" for i in range(30)))
    chat = tmp_path / "alpaca.json"
    chat.write_text(json.dumps([{"instruction": f"Say {i}", "input": "", "output": f"Answer {i}. " * 10}
                                for i in range(60)]))
    alone = pack_rows(tok, text, 32, 2)
    words = tok("Article 0 says", add_special_tokens=False)["input_ids"]
    assert alone.calibration[0, :len(words)].tolist() == words  # no template around plain text
    assert tok.eos_token_id in alone.train.flatten().tolist()
    both = pack_rows(tok, [text, chat], 32, 3, max_train=4)
    chat_alone = pack_rows(tok, chat, 32, 1, max_train=2)
    assert torch.equal(both.calibration[:2], alone.calibration[:2])  # 2 + 1 held-out chunks
    assert torch.equal(both.calibration[2], chat_alone.calibration[0])
    assert torch.equal(both.train[1], chat_alone.train[0]) and torch.equal(both.train[3], chat_alone.train[1])
    assert len(both.train) == 4
    rendered = encode_chat(tok, [{"role": "user", "content": "Say 0"}, {"role": "assistant", "content": "Answer 0. " * 10}],
                           add_generation_prompt=False)
    assert chat_alone.calibration[0].tolist() == rendered[:32]
