import collections

import torch

from turbolm.speculative.tree import Tree
from turbolm.speculative.verify import accept_greedy, accept_sampling

# root 0 -> {1: a=10, 2: b=11}; 1 -> {3: c=12}; 3 -> {4: d=13}; 2 -> {5: e=14}
T = Tree([0, 10, 11, 12, 13, 14], [-1, 0, 0, 1, 3, 2], [0, -1, -2, -1.5, -2, -3])


def test_greedy_no_match_gives_bonus_only():
    assert accept_greedy(T, [7, 0, 0, 0, 0, 0]) == ([], 7)


def test_greedy_follows_the_matching_branch():
    argmax = [11, 0, 14, 0, 0, 5]  # root -> b, b -> e, after e -> 5
    assert accept_greedy(T, argmax) == ([2, 5], 5)


def test_greedy_full_path_and_partial():
    assert accept_greedy(T, [10, 12, 0, 13, 9, 0]) == ([1, 3, 4], 9)
    assert accept_greedy(T, [10, 12, 0, 8, 0, 0]) == ([1, 3], 8)


def sample_first_token(tree, probs, n, rule=accept_sampling, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = collections.Counter()
    for _ in range(n):
        path, bonus = rule(tree, lambda i: probs, g)
        counts[tree.tokens[path[0]] if path else bonus] += 1
    return counts


def chi2(counts, probs, n):
    return sum((counts.get(i, 0) - n * p) ** 2 / (n * p) for i, p in enumerate(probs.tolist()) if p > 0) + sum(
        float("inf") for i in counts if probs[i] == 0
    )


# Target distribution over 6 tokens; the tree proposes 2 and 4 and 5 as root children.
P = torch.tensor([0.05, 0.10, 0.30, 0.05, 0.35, 0.15])
TREE = Tree([0, 2, 4, 5], [-1, 0, 0, 0], [0, -1, -2, -3])
CRIT = 20.5  # chi-square, 5 degrees of freedom, p = 0.001


def test_sampling_keeps_the_target_distribution():
    n = 20000
    assert chi2(sample_first_token(TREE, P, n), P, n) < CRIT


def wrong_rule_no_residual(tree, target_probs, generator=None):
    """A plausible-looking bug: after rejecting a candidate, sample from p itself, not the residual."""
    p = target_probs(0)
    for c in tree.children[0]:
        if torch.rand((), generator=generator) < p[tree.tokens[c]]:
            return [c], 0
    return [], int(torch.multinomial(p, 1, generator=generator))


def test_the_statistical_test_has_teeth():
    n = 20000
    assert chi2(sample_first_token(TREE, P, n, rule=wrong_rule_no_residual), P, n) > 10 * CRIT


def test_sampling_edge_cases():
    certain = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        path, bonus = accept_sampling(TREE, lambda i: certain, g)
        assert path == [1]  # a candidate with p = 1 is always accepted
    impossible = torch.tensor([0.5, 0.5, 0.0, 0.0, 0.0, 0.0])
    for _ in range(50):
        path, bonus = accept_sampling(TREE, lambda i: impossible, g)
        assert path == [] and bonus in (0, 1)  # candidates with p = 0 are never accepted
