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

from dataclasses import fields

import torch

from ...core.errors import TurboLMError
from ..draft.model import DraftModel, DraftOutput, KVCache
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
        from ...core.kernels import fast_cpu_mode, optimize_like

        if fast_cpu_mode(target) != "off":  # the draft's own layers and its lm_head rows run on few rows too
            optimize_like(draft, target, extra_weights=[draft.head_weight(self.lm_head)])
        self.cache = KVCache()
        self.pending: list[torch.Tensor] = []
        self.root_output: DraftOutput | None = None  # the root entry's output at the last catch-up

    def check_compatible(self, target, tokenizer) -> None:
        from ...core.models import identity_mismatch

        diff = identity_mismatch(self.draft.config.target, target)
        if diff:
            raise TurboLMError(f"this draft was trained for a different target model ({diff})")

    def start(self, prompt_ids, features=None) -> None:
        self.cache = KVCache()
        self.pending = [features]
        self.root_output = None

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

    def _catch_up(self, context: list[int]) -> int:
        """Feed the draft one entry ``(x_{j+1}, f_j)`` for every committed position without one yet
        and keep the root entry's output (tree level 1, and its contrastive output); return the
        cache length, one entry per committed position but the root's successor. Without new
        entries (a second proposal at the same context) nothing runs."""
        new = [f for f in self.pending if f is not None]
        self.pending = []
        if new:
            feats = torch.cat(new).to(self.lm_head.dtype)  # [n, H]
            start, n = len(self.cache), feats.shape[0]
            out = self._run(context[start + 1 : start + 1 + n], feats, list(range(start, start + n)))
            rows = {f.name: getattr(out, f.name) for f in fields(out)}  # the root entry's row of each output
            self.root_output = DraftOutput(**{k: None if t is None else t[:, n - 1 : n] for k, t in rows.items()})
        if self.root_output is None:
            raise TurboLMError("the draft proposer was asked for a tree before start()")
        return len(self.cache)

    def propose(self, context: list[int], max_depth: int) -> Tree:
        base = self._catch_up(context)
        try:
            return self._tree_builder(context[-1], base)(self.tree, max_depth)
        finally:
            self.cache.truncate(base)

    def propose_per_depth(self, context: list[int], tree: TreeConfig, depths) -> dict[int, Tree]:
        """For each depth d in ``depths``: exactly the tree :meth:`propose` returns with ``tree``'s
        total_tokens and top_k and depth d (a hybrid tree's last level comes from the contrastive
        branch), all at the current draft state. Levels the trees share are drafted once: a depth-D
        tree costs D-1 forwards (hybrid), and every shallower one comes with it (for --tree auto's
        acceptance statistics)."""
        base = self._catch_up(context)
        build = self._tree_builder(context[-1], base)
        try:
            return {d: build(TreeConfig(tree.total_tokens, d, tree.top_k), d) for d in sorted(depths)}
        finally:
            self.cache.truncate(base)

    def _tree_builder(self, root: int, base: int):
        """``build(config, max_depth) -> Tree`` after the root entry at cache length ``base``.

        Builds with the same top_k share their expansions: EAGLE-2's frontier at a level does not
        depend on how deep the tree will go, so a level drafted for one depth is the same level in
        any deeper tree (only a hybrid tree's last level differs: it comes from the contrastive
        output of the previous forward)."""
        out = self.root_output
        # Node bookkeeping by candidate id: the feature each node is fed, and (Jakiro) the
        # contrastive feature its grandchildren's distribution comes from.
        feature = {}
        two_ahead = {0: out.contrastive[0, -1]} if self.hybrid else {}  # contrastive features
        child_feature = {}  # candidate id -> feature-for-child function
        root_lp = []  # the root's log-probs, computed by the first build that needs them
        row_of = {0: 0}
        slot: dict[int, int] = {}
        done: dict[tuple[int, bool], tuple[list[int], torch.Tensor]] = {}  # (level, last) -> (frontier, log-probs)
        depth = 0

        def expand(frontier, tokens, parents, depths):
            level = depths[frontier[0]] + 1
            last = self.hybrid and level == depth
            if (level, last) in done:
                seen, lp = done[(level, last)]
                assert seen == frontier, "builds sharing expansions must have the same frontiers"
                return lp
            if last:  # the last level: contrastive output of the grandparent
                lp = self._logprobs(torch.stack([two_ahead[parents[f]] for f in frontier]))
                done[(level, last)] = (list(frontier), lp)
                return lp
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
            done[(level, last)] = (list(frontier), lp)
            return lp

        def build(config: TreeConfig, max_depth: int) -> Tree:
            nonlocal depth
            depth = min(config.depth, max_depth)
            if depth < 1:
                return Tree.root_only(root)
            if not root_lp:
                lp, child_feature[0] = self._candidates(out, slice(0, 1))
                root_lp.append(lp[0])
            return build_dynamic_tree(root, root_lp[0], expand, config, max_depth)

        return build
