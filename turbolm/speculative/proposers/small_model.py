"""A small causal LM with the target's tokenizer drafts an EAGLE-2 dynamic tree.

The draft keeps its own KV cache of the committed context. Each step it catches up
on the tokens committed since the last step (one forward), then expands the tree
level by level, one batched forward per level with a tree attention mask, and
finally drops the tree nodes from its cache.
"""

from __future__ import annotations

import torch

from ...core.errors import ParameterError, TurboLMError
from ...core.generation import forward
from ..cache import new_tree_cache, truncate
from ..tree import Tree, TreeConfig, build_dynamic_tree, frontier_attention, model_attention_mask
from .base import Proposer


class ModelProposer(Proposer):
    name = "model"
    default_tree = TreeConfig(total_tokens=16, depth=4, top_k=4)

    def __init__(self, draft, tokenizer=None, tree: TreeConfig | None = None):
        super().__init__(tree)
        self.draft = draft
        self.tokenizer = tokenizer
        self.cache = None
        self.n_cached = 0
        self._last_logprobs = None

    def check_compatible(self, target, tokenizer) -> None:
        if self.tokenizer is not None and tokenizer is not None and self.tokenizer.get_vocab() != tokenizer.get_vocab():
            raise TurboLMError("the draft model's tokenizer differs from the target's; a draft must share the target's vocabulary")
        dv, tv = self.draft.config.vocab_size, target.config.vocab_size
        if dv != tv:
            raise TurboLMError(f"the draft model's vocabulary ({dv} tokens) does not match the target's ({tv} tokens)")

    def start(self, prompt_ids: list[int], features=None) -> None:
        self.cache = new_tree_cache()
        self.n_cached = 0

    def _catch_up(self, context: list[int]) -> torch.Tensor:
        """Feed the draft the committed tokens it has not seen; return its log-probs after the root."""
        device = self.draft.device
        new = context[self.n_cached :]
        out = forward(self.draft, torch.tensor([new], device=device), self.cache, logits_to_keep=1)
        self.n_cached = len(context)
        return out.logits[0, -1].float().log_softmax(-1)

    def propose(self, context: list[int], max_depth: int) -> Tree:
        root_logprobs = self._catch_up(context)
        base = len(context)  # cache slot of the first tree node fed to the draft
        slot: dict[int, int] = {}  # candidate id -> cache slot
        device, dtype = self.draft.device, self.draft.dtype

        def expand(frontier, tokens, parents, depths):
            first = base + len(slot)
            for j, f in enumerate(frontier):
                slot[f] = first + j
            allowed = frontier_attention(frontier, parents, slot, base)
            k_pos = torch.arange(first + len(frontier))
            for f, s in slot.items():
                k_pos[s] = base - 1 + depths[f]
            q_pos = torch.tensor([base - 1 + depths[f] for f in frontier])
            mask = model_attention_mask(self.draft.config, allowed, q_pos, k_pos, dtype, device)
            ids = torch.tensor([[tokens[f] for f in frontier]], device=device)
            out = forward(self.draft, ids, self.cache, attention_mask=mask, position_ids=q_pos.unsqueeze(0).to(device))
            return out.logits[0].float().log_softmax(-1)

        try:
            return build_dynamic_tree(context[-1], root_logprobs, expand, self.tree, max_depth)
        finally:
            truncate(self.cache, self.n_cached)

    def propose_per_depth(self, context: list[int], tree: TreeConfig, depths) -> dict[int, Tree]:
        """For each depth d in ``depths``: the tree :meth:`propose` returns with ``tree``'s total_tokens
        and top_k and depth d. Every level is drafted autoregressively and EAGLE-2's frontier at a
        level does not depend on how deep the tree goes, so the deepest tree with every candidate
        kept, cut at depth d and reranked, is the depth-d tree: one proposal serves all depths."""
        deepest, k = max(depths), tree.top_k
        saved = self.tree
        self.tree = TreeConfig(min(1024, k + (deepest - 1) * k * k), deepest, k)  # every candidate
        try:
            full = self.propose(context, deepest)
        finally:
            self.tree = saved
        return {d: full.limited(d).best(tree.total_tokens) for d in depths}


def truncated_draft(model, n_layers: int):
    """A draft made of the target's first ``n_layers`` decoder layers, final norm and lm_head.

    It shares every weight with ``model`` (no copy) and the tokenizer trivially, so any
    target can self-speculate without a second model (as in LayerSkip / self-speculative
    decoding). Needs the usual ``model.model.layers`` layout (Llama, Qwen2, Mistral, Gemma).
    """
    import copy

    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise TurboLMError(f"cannot build a truncated draft from {type(model).__name__}: no model.layers")
    if not 1 <= n_layers < len(layers):
        raise ParameterError(f"{{}} must be in [1, {len(layers) - 1}] for this model, got {n_layers}", "draft_layers")
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}  # share, do not copy
    draft = copy.deepcopy(model, memo)
    draft.model.layers = draft.model.layers[:n_layers]
    draft.config = copy.deepcopy(model.config)
    draft.config.num_hidden_layers = n_layers
    if getattr(draft.config, "layer_types", None):
        draft.config.layer_types = draft.config.layer_types[:n_layers]
    draft.model.config = draft.config
    return draft
