import pytest
import torch

from turbolm import TurboLMError
from turbolm.speculative.tree import (
    Tree,
    TreeConfig,
    build_dynamic_tree,
    model_attention_mask,
    tree_attention_mask,
    tree_from_sequences,
    tree_position_ids,
)

#        0(root=100)
#       /     \
#   1(101)   2(102)
#    /   \       \
# 3(103) 4(104)  5(105)
#   |
# 6(106)
HAND = Tree([100, 101, 102, 103, 104, 105, 106], [-1, 0, 0, 1, 1, 2, 3], [0, -0.1, -0.5, -0.3, -0.2, -0.9, -0.4])


class Cfg:
    def __init__(self, sliding_window=None, layer_types=None):
        self.sliding_window = sliding_window
        self.layer_types = layer_types


def test_structure_of_hand_made_tree():
    assert HAND.depths == [0, 1, 1, 2, 2, 2, 3]
    assert HAND.children[1] == [4, 3]  # better-scored child first
    assert sorted(HAND.paths()) == [[1, 3, 6], [1, 4], [2, 5]]
    assert HAND.depth == 3


def test_attention_mask_and_positions():
    mask = tree_attention_mask(HAND, prefix_length=5, config=Cfg(), dtype=torch.float32, device="cpu")
    assert mask.shape == (1, 1, 7, 12)
    allowed = mask[0, 0] == 0
    assert allowed[:, :5].all()  # every node sees the whole prefix
    expected = {0: {0}, 1: {0, 1}, 2: {0, 2}, 3: {0, 1, 3}, 4: {0, 1, 4}, 5: {0, 2, 5}, 6: {0, 1, 3, 6}}
    for i, seen in expected.items():
        assert {j for j in range(7) if allowed[i, 5 + j]} == seen
    assert (mask[0, 0][~allowed] == torch.finfo(torch.float32).min).all()
    assert tree_position_ids(HAND, 5, "cpu").tolist() == [[5, 6, 6, 7, 7, 7, 8]]


def test_sliding_window_masks():
    # window 3: node 6 at position 8 may see positions 6..8 only.
    mask = tree_attention_mask(HAND, prefix_length=5, config=Cfg(sliding_window=3), dtype=torch.float32, device="cpu")
    allowed = mask[0, 0] == 0
    assert {j for j in range(12) if allowed[6, j]} == {5 + 1, 5 + 3, 5 + 6}  # positions 6, 7, 8
    mixed = model_attention_mask(
        Cfg(sliding_window=3, layer_types=["full_attention", "sliding_attention"]),
        torch.ones(1, 10, dtype=torch.bool), torch.tensor([9]), torch.arange(10), torch.float32, "cpu",
    )
    assert set(mixed) == {"full_attention", "sliding_attention"}
    assert (mixed["full_attention"] == 0).all() and (mixed["sliding_attention"] == 0).sum() == 3
    full_only = model_attention_mask(Cfg(sliding_window=3, layer_types=["full_attention"]),
                                     torch.ones(1, 10, dtype=torch.bool), torch.tensor([9]), torch.arange(10), torch.float32, "cpu")
    assert (full_only == 0).all()


def test_limited():
    t = HAND.limited(max_depth=2)
    assert t.tokens == [100, 101, 102, 103, 104, 105] and t.parents == [-1, 0, 0, 1, 1, 2]
    t = HAND.limited(max_depth=3, max_nodes=3)
    assert t.tokens == [100, 101, 102, 103]
    assert HAND.limited(0).tokens == [100]


def test_tree_from_sequences_merges_prefixes():
    t = tree_from_sequences(7, [[1, 2, 3], [1, 2, 4], [5]], weights=[3, 2, 1])
    assert t.tokens[0] == 7 and len(t) == 6
    assert sorted(t.tokens[i] for i in t.children[0]) == [1, 5]
    node2 = next(i for i in range(len(t)) if t.tokens[i] == 2)
    assert t.scores[node2] == 5 and [t.tokens[c] for c in t.children[node2]] == [3, 4]
    assert all(p < i for i, p in enumerate(t.parents) if i)


def test_tree_config_validation():
    for bad in ({"total_tokens": 0}, {"depth": 0}, {"top_k": -1}, {"depth": 1.5}, {"total_tokens": 5000}):
        with pytest.raises(TurboLMError, match="invalid tree setting"):
            TreeConfig(**bad)


def test_dynamic_tree_expands_best_frontier_and_reranks():
    V = 10
    # Root: tokens 0 and 1 likely. A node's children: token (t+1) % V with prob 0.9, (t+2) % V 0.1.
    root = torch.full((V,), -20.0)
    root[0], root[1] = torch.tensor(0.6).log(), torch.tensor(0.4).log()
    calls = []

    def expand(frontier, tokens, parents, depths):
        calls.append([tokens[f] for f in frontier])
        out = torch.full((len(frontier), V), -20.0)
        for r, f in enumerate(frontier):
            out[r, (tokens[f] + 1) % V] = torch.tensor(0.9).log()
            out[r, (tokens[f] + 2) % V] = torch.tensor(0.1).log()
        return out

    t = build_dynamic_tree(99, root, expand, TreeConfig(total_tokens=5, depth=3, top_k=2))
    assert calls[0] == [0, 1]  # level 1 frontier: both root children
    assert len(calls) == 2  # depth 3 needs two expansions
    assert len(t) == 6 and t.tokens[0] == 99
    # The five best candidates by cumulative log-prob: 0 (.6), 1 (.4), 0->1 (.54), 1->2 (.36), 0->1->2 (.486)
    got = {tuple(t.tokens[i] for i in p) for p in t.paths()}
    assert got == {(0, 1, 2), (1, 2)}
    assert all(t.scores[t.parents[i]] >= t.scores[i] for i in range(1, len(t)))
    # max_depth cuts the levels drafted
    t1 = build_dynamic_tree(99, root, expand, TreeConfig(total_tokens=5, depth=3, top_k=2), max_depth=1)
    assert t1.tokens == [99, 0, 1]
