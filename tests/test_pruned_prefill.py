"""dense_kv token skipping at the kept tokens' cost, and a pruned prefill followed by any decoding
method (``TokenPruner(prefill_only=True)``): exact against references on tiny random models."""

from __future__ import annotations

import pytest
import torch
from test_pruning import FixedRouter

from conftest import random_ids
from turbolm import load_target
from turbolm.core.generation import forward, generate, new_cache
from turbolm.pruning import LearnedRouter, StaticRouter, TokenPruner
from turbolm.speculative import PromptLookupProposer, SpeculativeGenerator, TreeConfig
from turbolm.speculative.cache import keep_only, truncate
from turbolm.speculative.draft.model import DraftConfig, DraftModel
from turbolm.speculative.proposers.hybrid import HybridProposer
from turbolm.speculative.proposers.jakiro import JakiroProposer

SCHEDULE = [0.3, 0.5, 0.25]


def _reference(model, router, schedule, ids):
    """dense_kv by definition: every block runs on every token (causal over all keys) and the
    skipped tokens are reset to their input - the pruner's training mode with hard gates."""
    with TokenPruner(model, router, schedule, dense_kv=True) as p:
        p.training_mode = True
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("with_cache", [False, True])
def test_dense_kv_computes_only_kept_tokens_and_matches_the_definition(tiny_dirs, arch, with_cache):
    model, _ = load_target(tiny_dirs[arch])
    n = model.config.num_hidden_layers
    schedule = (SCHEDULE * n)[:n]
    ids = random_ids(T=30, B=1 if with_cache else 2)
    with torch.no_grad():
        for router in (StaticRouter(), LearnedRouter()):
            ref = _reference(model, router, schedule, ids)
            with TokenPruner(model, router, schedule, dense_kv=True) as p:
                if with_cache:
                    cache = new_cache(model)
                    got = forward(model, ids, cache).logits
                    # every block's cache holds every token, in position order
                    assert [cache.layers[i].keys.shape[2] for i in range(n)] == [30] * n
                else:
                    got = model(ids, use_cache=False).logits
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
            assert p.stats.prefill_sparsity > 0.2
            if isinstance(router, LearnedRouter):
                continue  # its untrained start skips the newest tokens: both K/V semantics agree
            # the static router skips early tokens: not the default semantics (no keys there)
            with TokenPruner(model, router, schedule):
                assert not torch.allclose(model(ids, use_cache=False).logits, ref, atol=1e-3)


def _default_reference(model, router, schedule, ids):
    """The default semantics (skipped tokens leave no keys/values) in one forward without a cache."""
    with TokenPruner(model, router, schedule):
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize("dense_kv,form", [(False, "compacted"), (False, "placeholders"), (True, "entries")])
def test_prefill_only_then_one_dense_token(three_layer_llama, dense_kv, form):
    """A pruned prefill fills every block's cache - with the default semantics only the kept
    tokens' entries (compacted), or an entry per position with masked placeholders (the form a
    batch of prompts needs); with dense_kv an entry per position. The next token runs dense and
    equals that token computed in one longer pruned forward that keeps it in every block (the
    prompt's kept sets unchanged) - with the same K/V semantics."""
    model, _ = three_layer_llama
    ids = random_ids(T=12)
    keep = [0, 1, 4, 5, 8, 11]
    reference = _reference if dense_kv else _default_reference
    held = 6 if form == "compacted" else 12
    with torch.no_grad():
        with TokenPruner(model, FixedRouter(keep), [0.5] * 3, prefill_only=True, dense_kv=dense_kv) as p:
            cache = new_cache(model)
            prompt = forward(model, ids, cache).logits[0]
            if form == "placeholders":
                for layer in cache.layers:
                    layer.expand()
            assert [cache.layers[i].keys.shape[2] for i in range(3)] == [held] * 3
            assert cache.get_seq_length() == 12
            step = forward(model, torch.tensor([[7]]), cache).logits[0, -1]
            assert p.stats.decode_pairs == 0  # the new token ran dense, outside the pruner
            assert [cache.layers[i].keys.shape[2] for i in range(3)] == [held + 1] * 3
            block = forward(model, torch.tensor([[3, 9, 4]]), cache).logits[0]  # three at once (causal)
            # the same when a layer gets no mask (sdpa's causal kernel): the pruner spells it out around
            # the placeholders, or over the entries a compacted layer holds
            truncate(cache, 13)
            assert cache.get_seq_length() == 13 and cache.layers[0].keys.shape[2] == held + 1

            def no_mask(module, args, kwargs):
                return args, {**kwargs, "attention_mask": None}
            hooks = [layer.register_forward_pre_hook(no_mask, with_kwargs=True) for layer in model.model.layers]
            try:
                unmasked = forward(model, torch.tensor([[3, 9, 4]]), cache).logits[0]
            finally:
                for h in hooks:
                    h.remove()
        torch.testing.assert_close(prompt, reference(model, FixedRouter(keep), [0.5] * 3, ids)[0], rtol=1e-4, atol=1e-4)
        ref = reference(model, FixedRouter(keep + [12, 13, 14, 15]), [6 / 16] * 3,
                        torch.cat([ids, torch.tensor([[7, 3, 9, 4]])], 1))
    torch.testing.assert_close(step, ref[0, 12], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(block, ref[0, 13:], rtol=1e-4, atol=1e-4)
    if not dense_kv:  # (with dense_kv the layers run as they are, and get the mask transformers gives)
        torch.testing.assert_close(unmasked, ref[0, 13:], rtol=1e-4, atol=1e-4)


def test_compacted_prompt_positions_truncation_and_expansion(three_layer_llama):
    """A compacted cache layer counts every position, crops by position (into the prompt too),
    keeps a tree's accepted nodes behind the prompt, and expands to the placeholder form."""
    model, _ = three_layer_llama
    with torch.no_grad(), TokenPruner(model, FixedRouter([0, 2, 3, 6]), [0.5] * 3, prefill_only=True):
        cache = new_cache(model)
        forward(model, random_ids(T=8), cache)
        forward(model, random_ids(T=4), cache)  # four more positions, dense
    layer = cache.layers[1]
    assert (layer.front, layer.dropped, layer.keys.shape[2], cache.get_seq_length()) == (8, 4, 8, 12)
    assert layer.columns(14).tolist() == [0, 2, 3, 6, 8, 9, 10, 11, 12, 13]
    keys = layer.keys.clone()
    keep_only(cache, 8, [1, 3])  # positions 9 and 11 move behind the prompt
    assert cache.get_seq_length() == 10 and torch.equal(layer.keys, torch.cat([keys[:, :, :4], keys[:, :, [5, 7]]], 2))
    with pytest.raises(ValueError, match="inside the compacted prompt"):
        keep_only(cache, 5, [1])
    layer.expand()
    assert layer.kept is None and layer.visible[0, 0, 0].tolist() == [1, 0, 1, 1, 0, 0, 1, 0]
    assert torch.equal(layer.keys[:, :, [0, 2, 3, 6, 8, 9]], torch.cat([keys[:, :, :4], keys[:, :, [5, 7]]], 2))
    assert not layer.keys[:, :, [1, 4, 5, 7]].any()
    other = cache.layers[2]
    truncate(cache, 4)  # into the prompt: positions 0, 2, 3 keep their entries
    assert (other.front, other.kept.tolist(), other.keys.shape[2], other.get_seq_length()) == (4, [0, 2, 3], 3, 4)


def test_prefill_only_decodes_as_the_pruners_own_decoding(three_layer_llama):
    """When the router lets every new token run every block, the pruner's own decoding (default
    semantics) and a prefill_only prefill followed by dense decoding write the same tokens."""
    model, tok = three_layer_llama
    prompt = tok("The capital of France is Paris. The capital of Italy is Rome. The capital of")["input_ids"]
    keep = range(0, len(prompt), 2)
    schedule = [(len(prompt) - len(keep)) / len(prompt)] * 3
    with TokenPruner(model, FixedRouter(keep), schedule) as p:
        own = generate(model, tok, prompt, max_new_tokens=16).token_ids
        assert p.stats.decode_skipped == 0 and p.stats.prefill_sparsity > 0.4
    with TokenPruner(model, FixedRouter(keep), schedule, prefill_only=True):
        assert generate(model, tok, prompt, max_new_tokens=16).token_ids == own


def test_prefill_only_with_dense_schedule_is_the_dense_model(three_layer_llama):
    model, tok = three_layer_llama
    prompt = tok("The capital of France is")["input_ids"]
    dense = generate(model, tok, prompt, max_new_tokens=10)
    with TokenPruner(model, StaticRouter(), [0.0] * 3, prefill_only=True):
        pruned = generate(model, tok, prompt, max_new_tokens=10)
    assert pruned.token_ids == dense.token_ids


def _proposers(target):
    torch.manual_seed(0)
    tree = TreeConfig(total_tokens=8, depth=3, top_k=3)
    jakiro = JakiroProposer(DraftModel(DraftConfig.for_target(target, arch="jakiro")).eval(), target, tree)
    return {"prompt-lookup": PromptLookupProposer(), "jakiro": jakiro,
            "hybrid": HybridProposer(JakiroProposer(DraftModel(DraftConfig.for_target(target, arch="jakiro")).eval(),
                                                    target, tree))}


@pytest.mark.parametrize("arch,dense_kv", [("llama", False), ("qwen2", False), ("llama", True)])
def test_pruned_prefill_then_speculative_is_lossless(tiny_dirs, arch, dense_kv):
    """Greedy speculative decoding after a pruned prefill writes exactly what vanilla decoding
    after the same pruned prefill writes, and the pruning changed the output (it did run)."""
    model, tok = load_target(tiny_dirs[arch])
    n = model.config.num_hidden_layers
    prompts = ["The capital of France is Paris. The capital of Italy is Rome. The capital of",
               "Question: repeat after me: sea sky stars sea sky stars sea sky stars sea",
               "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return"]
    pruner = TokenPruner(model, StaticRouter(), [0.7] * n, prefill_only=True, dense_kv=dense_kv)
    changed = 0
    for text in prompts:
        ids = tok(text)["input_ids"]
        dense = generate(model, tok, ids, max_new_tokens=24).token_ids
        with pruner:
            pruner.reset_stats()
            vanilla = generate(model, tok, ids, max_new_tokens=24).token_ids
            assert pruner.stats.prefill_sparsity > 0.2 and pruner.stats.decode_pairs == 0
            for name, proposer in _proposers(model).items():
                out = SpeculativeGenerator(model, tok, proposer).generate(ids, max_new_tokens=24).token_ids
                assert out == vanilla, (name, text)
        changed += vanilla != dense
    assert changed  # a pruned prefill that changed nothing would test nothing


def test_generate_cli_with_a_pruner(tiny, tiny_dir, tmp_path, capsys):
    """`turbolm generate --pruner P --speculative M`: the same answer as vanilla after the same
    pruned prefill, the prompt's token sparsity reported; refusals name the parameter."""
    import json

    from turbolm.cli import main
    from turbolm.pruning.checkpoint import pruner_config, save_pruner

    model, _ = tiny
    router = StaticRouter()
    save_pruner(tmp_path / "p", pruner_config(model, router, [0.5, 0.5], target_sparsity=0.5), router)
    answers = {}
    for method in ("none", "prompt-lookup"):
        argv = ["generate", "--model", str(tiny_dir), "--prompt", "sea sky stars sea sky stars sea sky stars sea",
                "--raw", "--max-new-tokens", "12", "--json", "--pruner", str(tmp_path / "p"), "--speculative", method]
        assert main(argv) == 0
        d = json.loads(capsys.readouterr().out)
        assert d["prefill_sparsity"] > 0.3 and d["pruner"] == str(tmp_path / "p")
        answers[method] = d["token_ids"]
    assert answers["none"] == answers["prompt-lookup"]
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "hi", "--pruner", str(tmp_path / "missing")]) != 0
    assert "missing" in capsys.readouterr().err
