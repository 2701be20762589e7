"""Prompt lookup with a trained draft (``--speculative hybrid``): the merged tree is a trie union that
accepts the longer of its two sources, both strategies stay lossless and use both sources, and the
draft stays in sync on steps it does not draft. Greedy output on every architecture and the
sampling distribution: tests/test_speculative.py (with the other proposers)."""

import random

import pytest
import torch

from turbolm import encode_prompt, generate
from turbolm.core.generation import FeatureCapture
from turbolm.speculative import PromptLookupProposer, SpeculativeGenerator, TreeConfig
from turbolm.speculative.proposers.hybrid import HybridProposer
from turbolm.speculative.proposers.jakiro import JakiroProposer
from turbolm.speculative.tree import Tree, merge_trees, tree_from_sequences
from turbolm.speculative.verify import accept_greedy

PROMPTS = ["Write a short poem about the sea.", "The capital of France is", "def add(a, b):",
           "Hello world! Numbers: 0 1 2 3"]


def random_tree(rng: random.Random, root: int, n: int, vocab: int = 6) -> Tree:
    """A random trie of ``n`` nodes over a small vocabulary (many shared tokens with another one)."""
    seqs = [[rng.randrange(vocab) for _ in range(rng.randint(1, 5))] for _ in range(n)]
    return tree_from_sequences(root, seqs, [rng.random() for _ in seqs])


def token_paths(tree: Tree) -> set[tuple[int, ...]]:
    return {tuple(tree.tokens[i] for i in tree.path_to(node)) for node in range(1, len(tree))}


def test_merge_trees_is_a_trie_union():
    rng = random.Random(0)
    for _ in range(200):
        a, b = random_tree(rng, 7, rng.randint(0, 6)), random_tree(rng, 7, rng.randint(0, 6))
        merged, added = merge_trees(a, b)
        assert token_paths(merged) == token_paths(a) | token_paths(b)
        assert len(merged) - 1 == len(token_paths(merged)) and added == len(merged) - len(a)
        assert merged.tokens[: len(a)] == a.tokens and merged.parents[: len(a)] == a.parents
        for kids in merged.children:  # distinct siblings: what lossless sampling needs
            assert len({merged.tokens[c] for c in kids}) == len(kids)
        # Greedy verification accepts the longer of the two trees' own paths.
        continuation = [rng.randrange(6) for _ in range(6)]

        def target_argmax(tree):  # the target's next token after each node (-1: off its own path)
            out = []
            for node in range(len(tree)):
                prefix = [tree.tokens[i] for i in tree.path_to(node)]
                on_path = prefix == continuation[: len(prefix)] and len(prefix) < len(continuation)
                out.append(continuation[len(prefix)] if on_path else -1)
            return out

        accepted = [len(accept_greedy(t, target_argmax(t))[0]) for t in (a, b, merged)]
        assert accepted[2] == max(accepted[:2])
    with pytest.raises(ValueError):
        merge_trees(Tree([1], [-1]), Tree([2], [-1]))


def taus(target, tok, proposer, n=40):
    gen = SpeculativeGenerator(target, tok, proposer)
    out = []
    for prompt in PROMPTS:
        ids = encode_prompt(tok, prompt)
        res = gen.generate(ids, max_new_tokens=n)
        assert res.token_ids == generate(target, tok, ids, max_new_tokens=n).token_ids
        out.append(res)
    return sum(r.tau for r in out) / len(out), out


def test_both_sources_are_used(near_bigram):
    """On a target whose answers fall into loops (n-gram lookup's case) with a draft that often agrees
    with it (the draft's case), merge beats each source alone and choose uses both."""
    target, tok, draft = near_bigram
    tree = TreeConfig(6, 3, 2)
    alone_ngram, _ = taus(target, tok, PromptLookupProposer())
    alone_draft, _ = taus(target, tok, JakiroProposer(draft, target, tree))
    merge, results = taus(target, tok, HybridProposer(JakiroProposer(draft, target, tree), mode="merge"))
    assert merge > max(alone_ngram, alone_draft) > 1.2, (merge, alone_ngram, alone_draft)
    assert all(r.stats["hybrid"]["mean_ngram_nodes_added"] > 0 for r in results)
    choose, results = taus(target, tok, HybridProposer(JakiroProposer(draft, target, tree), mode="choose"))
    steps = [r.stats["hybrid"] for r in results]
    assert sum(s["ngram_steps"] for s in steps) > 0 and sum(s["draft_steps"] for s in steps) > 0
    assert choose > 1.2


def test_choose_keeps_the_draft_in_sync(near_bigram):
    """After steps verified with the n-gram tree (the draft did not run), the draft's tree equals the
    tree of a fresh draft proposer that catches up on the whole context at once: the features of
    every committed position reached it."""
    target, tok, draft = near_bigram
    hybrid = HybridProposer(JakiroProposer(draft, target, TreeConfig(6, 3, 2)), mode="choose")
    checked = []
    drafter_propose = hybrid.drafter.propose

    def watched(context, max_depth):
        tree = drafter_propose(context, max_depth)
        if hybrid.steps["ngram"]:
            checked.append((list(context), max_depth, tree))
        return tree

    hybrid.drafter.propose = watched
    ids = encode_prompt(tok, PROMPTS[0])
    res = SpeculativeGenerator(target, tok, hybrid).generate(ids, max_new_tokens=40)
    assert res.stats["hybrid"]["ngram_steps"] > 0 and len(checked) >= 3
    fresh = JakiroProposer(draft, target, TreeConfig(6, 3, 2))
    for context, max_depth, tree in checked:
        capture = FeatureCapture(target)
        with capture, torch.inference_mode():
            target(torch.tensor([context[:-1]]))
        fresh.start(context[:-1], capture.features[0])
        with torch.inference_mode():
            again = fresh.propose(context, max_depth)
        assert again.tokens == tree.tokens and again.parents == tree.parents
        assert again.scores == pytest.approx(tree.scores, abs=1e-4)
