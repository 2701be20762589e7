"""The feature-level draft (Jakiro or EAGLE-2) as a proposer, with Jakiro's hybrid schedule.

Draft entry j holds ``(x_{j+1}, f_j)``: committed tokens paired with the target's features,
which the engine hands over after each verification (features lag tokens by one). Each step:
1. catch up: one forward over the entries committed since the last step; the last one is the
   root's entry, whose output gives tree level 1 (and, for Jakiro, its contrastive output
   gives level 2 for every level-1 node);
2. levels 2 .. depth-1 autoregressively: one forward per level over the frontier nodes, each
   fed its parent's predicted feature, with a tree mask over the draft's own cache;
3. Jakiro: the last level comes from the contrastive output of the previous forward (each
   last-level node's children come from its *own* parent's grandparent-level forward), so the
   last two levels cost one forward. EAGLE-2 drafts every level autoregressively.
Then the tree nodes' entries are dropped from the cache; the next catch-up re-feeds the
accepted ones with the target's true features.
"""

from __future__ import annotations

import torch

from ...core.errors import TurboLMError
from ..draft.model import DraftModel, KVCache
from ..tree import Tree, TreeConfig, build_dynamic_tree, frontier_attention
from .base import Proposer


class JakiroProposer(Proposer):
    needs_features = True
    default_tree = TreeConfig(total_tokens=16, depth=4, top_k=4)

    def __init__(self, draft: DraftModel, target, tree: TreeConfig | None = None, hybrid: bool = True):
        super().__init__(tree)
        self.draft = draft
        self.name = draft.config.arch if draft.config.arch == "eagle2" else f"jakiro-{draft.config.candidate_mode}"
        self.embed = target.get_input_embeddings()
        self.lm_head = target.get_output_embeddings().weight
        self.hybrid = hybrid and draft.config.has_contrastive
        from ...core.kernels import is_optimized, optimize_for_small_batches

        if is_optimized(target):  # the draft's own layers run on few rows too
            optimize_for_small_batches(draft)
        self.cache = KVCache()
        self.pending: list[torch.Tensor] = []

    def check_compatible(self, target, tokenizer) -> None:
        from ...core.models import identity_mismatch

        diff = identity_mismatch(self.draft.config.target, target)
        if diff:
            raise TurboLMError(f"this draft was trained for a different target model ({diff})")

    def start(self, prompt_ids, features=None) -> None:
        self.cache = KVCache()
        self.pending = [features]

    def accepted(self, context, n_new, features=None) -> None:
        self.pending.append(features)

    # --- drafting -----------------------------------------------------------------------------

    def _run(self, tokens: list[int], features: torch.Tensor, positions: list[int], mask=None):
        device = self.lm_head.device
        ids = torch.tensor([tokens], device=device)
        pos = torch.tensor([positions], device=device)
        return self.draft(self.embed(ids), features.unsqueeze(0), pos, self.cache, mask)

    def _logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        """(n, V_target) log-probs: draft-vocabulary log-probs scattered into the target vocabulary."""
        lp = self.draft.logits(hidden, self.lm_head).float().log_softmax(-1)
        if not self.draft.draft_vocab.numel():
            return lp
        full = torch.full((lp.shape[0], self.lm_head.shape[0]), float("-inf"), device=lp.device)
        return full.index_copy_(1, self.draft.draft_vocab, lp)

    def _candidates(self, out, row_slice):
        """Per node: log-probs over the target vocabulary, and a function giving the feature to
        feed to a chosen child (decoupled: the feature of the expert that proposed it)."""
        hidden = out.hidden[0, row_slice]
        if out.expert_hidden is None:
            return self._logprobs(hidden), lambda r, tok: hidden[r]
        eh = out.expert_hidden[0, row_slice]  # (n, 2, H)
        ew = out.expert_weights[0, row_slice].float().log()  # (n, 2)
        per_expert = torch.stack([self._logprobs(eh[:, e]) for e in range(2)], 1) + ew.unsqueeze(-1)
        best = per_expert.max(1)  # best distinct tokens across the experts
        return best.values, lambda r, tok: eh[r, int(best.indices[r, tok])]

    def propose(self, context: list[int], max_depth: int) -> Tree:
        root = context[-1]
        depth = min(self.tree.depth, max_depth)
        # Catch up: entries (x_{j+1}, f_j) for every committed position without an entry yet.
        feats = torch.cat([f for f in self.pending if f is not None]).to(self.lm_head.dtype)
        self.pending = []
        start = len(self.cache)
        n = feats.shape[0]
        out = self._run(context[start + 1 : start + 1 + n], feats, list(range(start, start + n)))
        base = len(self.cache)  # entries for every committed position but the root's successor
        if depth < 1:
            return Tree.root_only(root)
        root_lp, root_child_feature = self._candidates(out, slice(n - 1, n))
        # Node bookkeeping by candidate id: the feature each node is fed, and (Jakiro) the
        # contrastive feature its grandchildren's distribution comes from.
        feature = {}
        two_ahead = {0: out.contrastive[0, -1]} if self.hybrid else {}  # contrastive features
        child_feature = {0: root_child_feature}  # candidate id -> feature-for-child function
        row_of = {0: 0}
        slot: dict[int, int] = {}

        def expand(frontier, tokens, parents, depths):
            level = depths[frontier[0]] + 1
            if self.hybrid and level == depth:  # the last level: contrastive output of the grandparent
                return self._logprobs(torch.stack([two_ahead[parents[f]] for f in frontier]))
            for f in frontier:
                feature[f] = child_feature[parents[f]](row_of[parents[f]], tokens[f])
            first = base + len(slot)
            for j, f in enumerate(frontier):
                slot[f] = first + j
            allowed = frontier_attention(frontier, parents, slot, base)
            o = self._run(
                [tokens[f] for f in frontier],
                torch.stack([feature[f] for f in frontier]),
                [base - 1 + depths[f] for f in frontier],
                allowed[None, None].to(self.lm_head.device),
            )
            lp, feat_fn = self._candidates(o, slice(None))
            for j, f in enumerate(frontier):
                child_feature[f], row_of[f] = feat_fn, j
                if self.hybrid:
                    two_ahead[f] = o.contrastive[0, j]
            return lp

        try:
            return build_dynamic_tree(root, root_lp[0], expand, self.tree, max_depth)
        finally:
            self.cache.truncate(base)
