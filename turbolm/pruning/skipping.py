"""Token skipping for Hugging Face decoder models, by wrapping each decoder layer's forward.

Per block ``l`` with target sparsity ``s_l``, a router scores the tokens and the block computes
only the kept ones: their hidden states are gathered into a smaller batch, run through the
unmodified layer with their original rotary positions and a causal mask among the kept tokens
(plus everything in that block's KV cache), and scattered back; skipped tokens keep their
hidden state (residual pass-through). So a block costs what its kept tokens cost.

- The first token of a sequence (the attention sink) is always kept.
- ``dense_kv=True``: skipped tokens still provide keys/values - what running the block on every
  token and resetting the skipped ones to their input gives ("kept queries attend to all
  keys"), without running the block on the skipped tokens: a skipped token's keys/values come
  from its input to the block (its norm and k/v projections only), are written to the cache
  first, and the block then runs the kept tokens, attending to every key at an earlier position
  (an explicit mask, so not sdpa's causal kernel: on a CPU this prefill costs about what the
  dense one does); the new cache entries are put back in position order.
- ``prefill_only=True``: only a forward that starts a sequence (the prompt, into an empty KV
  cache) skips tokens; every later forward - one new token, or a speculative tree - runs the
  dense model on that cache. So any decoding method (vanilla, speculative) runs unchanged after
  a pruned prefill, and its output is exactly vanilla decoding's after the same pruned prefill.
  With ``dense_kv`` a skipped token leaves its keys/values in every block's cache. By default it
  leaves none: one sequence's cache layer holds only the kept tokens' entries and knows their
  positions (``core.kvcache.GrowingLayer.kept``), so later queries read only real keys (a
  decoding step after a 900-token prompt pruned at 30% costs about what one after ~630 tokens
  does); a batch of several prompts gets an entry per position instead, a placeholder where a
  token skipped, which every later query is masked from. Either way the default semantics are
  kept exactly: the later forwards compute what the pruned model's own decoding computes when a
  new token runs every block.
- Decoding (one new token): the newest token runs block ``l`` when the router's
  ``keep_decode`` says so (learned router: sigmoid(score) >= threshold), otherwise it skips
  it and leaves no keys/values there. Each block's KV cache therefore holds only the tokens
  computed in that block, and positions are tracked by the pruner (not from cache lengths).
- Training mode (``pruner.training_mode = True``, no cache): every token runs, with the
  attention restricted to the kept tokens' keys, and the block's update is multiplied by a
  straight-through gate (hard keep decision forward, sigmoid gradient backward). For the
  kept tokens this computes exactly what the gathered inference path computes.

Supported: Llama-family layouts (``model.model.layers[i].self_attn.{q,k}_proj``, rotary
``model.model.rotary_emb``): Llama, Qwen2, Mistral (sliding windows longer than the prompt),
with the ``sdpa`` or ``eager`` attention implementation. Decoding with a cache needs batch 1.

The pruner is a :class:`~turbolm.core.patches.ModelPatch`: detaching puts back exactly the
forwards it wrapped, and it refuses to attach next to another patch of the decoder layers.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field

import torch

from ..core.attention import SDPA_LIKE
from ..core.errors import TurboLMError
from ..core.generation import cache_kwarg
from ..core.kvcache import GrowingLayer, growing_cache
from ..core.patches import ModelPatch
from .factors import UNIFORM_ATTENTION, apply_rotary, attention_value, build_factors, rank_of, received_attention

SUPPORTED_ATTENTION = (*SDPA_LIKE, "eager")


def decoder_layers(model):
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None or not len(layers) or not hasattr(layers[0], "self_attn"):
        raise TurboLMError(f"token pruning supports Llama-style decoder models; {type(model).__name__} "
                           "has no model.layers[i].self_attn")
    for name in ("q_proj", "k_proj"):
        if not hasattr(layers[0].self_attn, name):
            raise TurboLMError(f"token pruning needs separate q/k projections; {type(model).__name__} has no {name}")
    return layers


@dataclass
class SkipStats:
    """(token, block) pairs seen and skipped, for prefill (many tokens) and decode (one token)."""

    prefill_pairs: int = 0
    prefill_skipped: int = 0
    decode_pairs: int = 0
    decode_skipped: int = 0
    per_block_skipped: list[int] = field(default_factory=list)
    per_block_pairs: list[int] = field(default_factory=list)

    def add(self, block: int, pairs: int, skipped: int, decode: bool):
        while len(self.per_block_pairs) <= block:
            self.per_block_pairs.append(0)
            self.per_block_skipped.append(0)
        self.per_block_pairs[block] += pairs
        self.per_block_skipped[block] += skipped
        if decode:
            self.decode_pairs += pairs
            self.decode_skipped += skipped
        else:
            self.prefill_pairs += pairs
            self.prefill_skipped += skipped

    @property
    def prefill_sparsity(self) -> float:
        return self.prefill_skipped / self.prefill_pairs if self.prefill_pairs else 0.0

    @property
    def decode_sparsity(self) -> float:
        return self.decode_skipped / self.decode_pairs if self.decode_pairs else 0.0

    def to_json(self) -> dict:
        return {"prefill_sparsity": round(self.prefill_sparsity, 4), "decode_sparsity": round(self.decode_sparsity, 4),
                "prefill_pairs": self.prefill_pairs, "decode_pairs": self.decode_pairs,
                "per_block_sparsity": [round(s / p, 4) if p else 0.0
                                       for s, p in zip(self.per_block_skipped, self.per_block_pairs)]}


class _Sequence:
    """What the pruner remembers about one sequence across forwards (one per KV cache)."""

    def __init__(self, batch: int, num_layers: int, device):
        self.length = 0
        self.attention = torch.empty(batch, 0, device=device)
        self.key_positions: list[torch.Tensor | None] = [None] * num_layers


@dataclass
class _Forward:
    sequence: _Sequence | None  # None in a prefill_only dense forward
    positions: torch.Tensor  # (B, T) true positions of this forward's tokens
    cos: torch.Tensor | None
    sin: torch.Tensor | None
    decode: bool
    dense: bool = False  # prefill_only, after the prompt: every block runs the unmodified layer


class TokenPruner(ModelPatch):
    """Attach token skipping to ``model`` (in place; :meth:`detach` restores it exactly).

    ``router``: a router from :mod:`.router`; ``schedule``: per-block sparsity (one per layer).
    Use it as a context manager, or call attach()/detach(). ``with pruner.disabled():`` runs
    the dense model (e.g. the teacher during router training).

    A :class:`~turbolm.core.patches.ModelPatch`: it wraps every decoder layer's ``forward``
    (whatever was there, e.g. an accelerate hook, is what the wrapper calls and what detaching
    puts back) and hooks ``q_proj``/``k_proj``. So it cannot be attached together with a
    :class:`.baselines.LayerDropper` or a second pruner, and combines with the fast linear kernels.
    """

    patches = frozenset({"decoder_layers"})
    #: prefill_only, default semantics: one sequence's cache layers hold only the kept tokens'
    #: entries (False: an entry per position with masked placeholders, as batches get - the A/B
    #: switch of ``benchmarks/ftp_speculative.py --placeholders``)
    compact_prompt: bool = True

    def __init__(self, model, router, schedule, *, dense_kv: bool = False, prefill_only: bool = False,
                 attention_queries: int = 8, train_records: bool = False, track_attention: bool | None = None):
        super().__init__(model)
        self.layers = decoder_layers(model)
        if len(schedule) != len(self.layers):
            raise TurboLMError(f"the sparsity schedule has {len(schedule)} blocks but the model has "
                               f"{len(self.layers)} layers")
        if any(not 0.0 <= s < 1.0 for s in schedule):
            raise TurboLMError("every block sparsity must be in [0, 1)")
        impl = getattr(model.config, "_attn_implementation", "sdpa") or "sdpa"
        if impl not in SUPPORTED_ATTENTION:
            raise TurboLMError(f"token pruning supports attn_implementation {' or '.join(SUPPORTED_ATTENTION)}, "
                               f"not {impl!r}; load the model with attn_implementation='sdpa'")
        self.attn_impl = impl
        self.router = router
        self.schedule = [float(s) for s in schedule]
        self.prefill_only = prefill_only
        self.dense_kv = dense_kv
        self.attention_queries = attention_queries
        # The attention factor costs a little per block; routers that ignore it skip it.
        self.track_attention = (getattr(router, "kind", "learned") == "learned" if track_attention is None
                                else track_attention)
        self.enabled = True
        self.training_mode = False
        self.train_records = train_records
        self.records: list[dict] = []
        self.stats = SkipStats()
        self._sequences: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._forward: _Forward | None = None
        self._captured: dict[str, torch.Tensor] = {}

    # -- attaching ---------------------------------------------------------------------------
    def _patch(self) -> None:
        for idx, layer in enumerate(self.layers):
            self.replace(layer, "forward", self._make_forward(idx, layer.forward))
            for name in ("q_proj", "k_proj"):
                self.add_forward_hook(getattr(layer.self_attn, name), self._capture(name))
        # Kept for readers that predate the patch registry (patches.find(model, TokenPruner)).
        self.replace(self.model, "turbolm_pruner", self)

    @contextlib.contextmanager
    def disabled(self):
        prev, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = prev

    def reset_stats(self) -> None:
        self.stats = SkipStats()

    def _capture(self, name):
        def hook(module, args, output):
            if self.enabled:
                self._captured[name] = output
        return hook

    def _make_forward(self, idx, orig):
        def forward(hidden_states, *args, **kwargs):
            if not self.enabled:
                return orig(hidden_states, *args, **kwargs)
            return self._layer(idx, orig, hidden_states, args, kwargs)
        return forward

    # -- one forward -------------------------------------------------------------------------
    def _begin(self, hidden: torch.Tensor, kwargs: dict) -> _Forward:
        B, T, _ = hidden.shape
        cache = cache_of(kwargs)
        seq = self._sequences.get(cache) if cache is not None else None
        if self.prefill_only and cache is not None and (seq is not None or cache.get_seq_length() > 0):
            return _Forward(None, None, None, None, decode=False, dense=True)  # masks: on the cache layers
        if seq is None:
            if cache is not None and cache.get_seq_length() > 0:
                raise TurboLMError("this KV cache was filled without the token pruner; prefill with the pruner attached")
            seq = _Sequence(B, len(self.layers), hidden.device)
            if cache is not None:
                self._sequences[cache] = seq
        if cache is not None and B != 1 and T == 1:
            raise TurboLMError("decoding with token pruning supports batch size 1")
        positions = (torch.arange(T, device=hidden.device) + seq.length).unsqueeze(0).expand(B, T)
        given = kwargs.get("position_ids")
        pe = kwargs.get("position_embeddings")
        if pe is None or given is None or given.shape[-1] != T or not torch.equal(given.expand(B, T), positions):
            # The model derives positions from layer 0's cache length, which skipping makes
            # shorter than the sequence: recompute the rotary tables for the true positions.
            rotary = getattr(self.model, "model", self.model).rotary_emb
            pe = rotary(hidden, positions)
        cos, sin = pe
        cos, sin = cos.expand(B, -1, -1), sin.expand(B, -1, -1)
        seq.attention = torch.cat([seq.attention, torch.full((B, T), UNIFORM_ATTENTION, device=hidden.device)], 1)
        return _Forward(seq, positions, cos, sin, decode=(T == 1 and seq.length > 0))

    def _layer(self, idx, orig, hidden, args, kwargs):
        if idx == 0 or self._forward is None:
            self._forward = self._begin(hidden, kwargs)
        fw = self._forward
        try:
            if fw.dense:
                out = self._dense_block(idx, orig, hidden, args, kwargs, fw)
            elif self.training_mode:
                out = self._train_block(idx, orig, hidden, args, kwargs, fw)
            elif fw.decode:
                out = self._decode_block(idx, orig, hidden, args, kwargs, fw)
            else:
                out = self._prefill_block(idx, orig, hidden, args, kwargs, fw)
        finally:
            self._captured.clear()
            if idx == len(self.layers) - 1:
                if not fw.dense:
                    fw.sequence.length += hidden.shape[1]
                self._forward = None
        return out

    def _factors(self, idx: int, fw: _Forward, positions: torch.Tensor) -> torch.Tensor:
        seq = fw.sequence
        return build_factors(positions, seq.attention.shape[1], seq.attention, self.schedule[idx],
                             rank=rank_of(seq.attention))

    @property
    def _hidden_router(self) -> bool:
        return getattr(self.router, "uses_hidden", False)

    def _scores(self, idx: int, fw: _Forward, hidden: torch.Tensor, factors=None) -> torch.Tensor:
        if self._hidden_router:
            return self.router.scores_hidden(hidden, idx)
        return self.router.scores(self._factors(idx, fw, fw.positions) if factors is None else factors, idx)

    def _n_skip(self, idx: int, T: int, fw: _Forward) -> int:
        has_sink = bool(fw.positions[0, 0] == 0)
        return max(0, min(int(self.schedule[idx] * T + 0.5), T - 1 if has_sink or T > 1 else 0))

    def _keep_indices(self, scores: torch.Tensor, n_keep: int, fw: _Forward) -> torch.Tensor:
        scores = scores.float().clone()
        scores[fw.positions == 0] = float("inf")
        return scores.topk(n_keep, dim=1).indices.sort(dim=1).values

    def _call(self, orig, hidden, args, kwargs, positions, cos, sin, mask, cache, idx=None):
        """The wrapped layer on ``hidden`` at ``positions``; ``cache``: the model's, None (no
        cache), or a block-local one (block ``idx``)."""
        kw = dict(kwargs)
        kw["attention_mask"] = mask
        kw["position_ids"] = positions
        kw["position_embeddings"] = (cos, sin)
        if "cache_position" in kw:
            kw["cache_position"] = positions[0]
        if cache is None or cache is not cache_of(kwargs):
            kw.pop("cache", None)
            kw.pop("past_key_values", None)
            kw["use_cache"] = False
        if cache is not None and cache is not cache_of(kwargs):
            kw[cache_kwarg(type(self.layers[idx]))] = cache
        return orig(hidden, *args, **kw)

    def _mask(self, n_query: int, n_past: int, dtype, device, batch: int, allowed: torch.Tensor | None = None):
        """Additive mask (B, 1, q, past + q): everything in the cache is earlier, new keys causal."""
        if allowed is None:
            if n_past == 0 and self.attn_impl in SDPA_LIKE and n_query > 1:
                return None  # sdpa's own causal kernel
            new = torch.ones(n_query, n_query, dtype=torch.bool, device=device).tril()
            allowed = torch.cat([torch.ones(n_query, n_past, dtype=torch.bool, device=device), new], 1)
            allowed = allowed.expand(batch, 1, -1, -1)
        neg = torch.finfo(dtype).min
        return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, neg)

    def _prefill_block(self, idx, orig, hidden, args, kwargs, fw):
        B, T, D = hidden.shape
        cache = cache_of(kwargs)
        n_skip = self._n_skip(idx, T, fw)
        seq = fw.sequence
        past = seq.key_positions[idx]
        n_past = 0 if past is None else past.shape[1]
        if n_skip == 0:
            keep_idx = None
        else:
            keep_idx = self._keep_indices(self._scores(idx, fw, hidden), T - n_skip, fw)
        self.stats.add(idx, B * T, B * n_skip, decode=False)
        if keep_idx is None:
            mask = self._mask(T, n_past, hidden.dtype, hidden.device, B)
            out = self._call(orig, hidden, args, kwargs, fw.positions, fw.cos, fw.sin, mask, cache)
            self._record_keys(idx, fw, cache, fw.positions)
            self._update_attention(idx, fw, cache, fw.positions, None, fw.positions, None)
            return out
        K = T - n_skip
        h_sub, pos_sub, cos_sub, sin_sub = self._rows(hidden, fw, keep_idx)
        if self.dense_kv:
            return self._prefill_dense_kv(idx, orig, hidden, args, kwargs, fw, keep_idx, h_sub, pos_sub, cos_sub, sin_sub)
        mask = self._mask(K, n_past, hidden.dtype, hidden.device, B)
        out_sub = self._call(orig, h_sub, args, kwargs, pos_sub, cos_sub, sin_sub, mask, cache)
        out = hidden.scatter(1, keep_idx.unsqueeze(-1).expand(B, K, D), out_sub)
        self._record_keys(idx, fw, cache, pos_sub)
        self._update_attention(idx, fw, cache, pos_sub, None, pos_sub, (cos_sub, sin_sub))
        if self.prefill_only and cache is not None:
            self._leave_skipped(idx, cache, keep_idx, n_past, T)
        return out

    def _leave_skipped(self, idx, cache, keep_idx, n_past, T):
        """prefill_only, what the tokens that skipped block ``idx`` leave in its cache: for one
        sequence nothing - the layer holds the kept tokens' entries only, and says so
        (``GrowingLayer.compacted``: attention after it reads only real keys); otherwise the layer
        gets an entry per position - zeros where a token skipped the block, which every later
        query is masked from (:meth:`_dense_block`)."""
        B, K = keep_idx.shape
        layer = cache.layers[idx]
        if self.compact_prompt and B == 1 and n_past == 0 and isinstance(layer, GrowingLayer):
            layer.compacted(keep_idx[0].clone(), T)
            return
        zeros = layer.keys.new_zeros(B, layer.keys.shape[1], T - K, layer.keys.shape[3])
        cache.update(zeros, zeros.clone(), idx)
        skipped, skip_idx = _skipped_rows(keep_idx, T)
        self._position_order(idx, layer, n_past, T, torch.cat([keep_idx, skip_idx], 1))
        layer.visible = ~skipped[:, None, None, :]  # travels with the cache (batched, served: core.kvcache)

    @staticmethod
    def _position_order(idx, layer, n_past, T, rows):
        """Reorder the ``T`` newest entries of a cache layer, now holding the forward's tokens
        ``rows`` (B, T) in that order, into position order (in place)."""
        order = rows.argsort(dim=1)
        for name in ("keys", "values"):
            t = getattr(layer, name)
            if t.shape[2] != n_past + T:
                raise TurboLMError(f"block {idx}'s KV cache did not take the prompt whole (a sliding window "
                                   "shorter than the prompt?); this token pruning needs a full-attention cache")
            new = t[:, :, n_past:]
            t[:, :, n_past:] = new.gather(2, order[:, None, :, None].expand_as(new))

    @staticmethod
    def _rows(hidden, fw, rows):
        """The hidden states, positions and rotary tables of the tokens at ``rows`` (B, n)."""
        B, n = rows.shape
        g = rows.unsqueeze(-1)
        hd = fw.cos.shape[-1]
        return (hidden.gather(1, g.expand(B, n, hidden.shape[-1])), fw.positions.gather(1, rows),
                fw.cos.gather(1, g.expand(B, n, hd)), fw.sin.gather(1, g.expand(B, n, hd)))

    def _prefill_dense_kv(self, idx, orig, hidden, args, kwargs, fw, keep_idx, h_sub, pos_sub, cos_sub, sin_sub):
        """dense_kv without running the block on skipped tokens: each one's keys/values (from its input
        to the block) are written to the cache first, then the kept tokens run the block,
        attending to every earlier key; the new entries are then put in position order, so the
        block's cache holds one entry per position. Without a KV cache the block gets one of its
        own for this forward."""
        B, T, D = hidden.shape
        K = keep_idx.shape[1]
        skip_idx = _skipped_rows(keep_idx, T)[1]
        h_skip, pos_skip, cos_skip, sin_skip = self._rows(hidden, fw, skip_idx)
        given = cache_of(kwargs)
        cache = given if given is not None else growing_cache()
        past = fw.sequence.key_positions[idx] if given is not None else None
        n_past = 0 if past is None else past.shape[1]
        cache.update(*self._keys_values(idx, h_skip, cos_skip, sin_skip), idx)
        key_pos = torch.cat([p for p in (past, pos_skip, pos_sub) if p is not None], 1)
        allowed = (key_pos.unsqueeze(1) <= pos_sub.unsqueeze(2)).unsqueeze(1)  # (B, 1, K, n_past + T)
        mask = self._mask(K, n_past + T - K, hidden.dtype, hidden.device, B, allowed=allowed)
        out_sub = self._call(orig, h_sub, args, kwargs, pos_sub, cos_sub, sin_sub, mask, cache, idx)
        out = hidden.scatter(1, keep_idx.unsqueeze(-1).expand(B, K, D), out_sub)
        layer = cache.layers[idx]
        self._position_order(idx, layer, n_past, T, torch.cat([skip_idx, keep_idx], 1))
        self._record_keys(idx, fw, given, fw.positions)
        all_pos = fw.positions if past is None else torch.cat([past, fw.positions], 1)
        self._update_attention(idx, fw, None, pos_sub, None, all_pos, (cos_sub, sin_sub), keys=layer.keys)
        return out

    def _dense_block(self, idx, orig, hidden, args, kwargs, fw):
        """prefill_only after the prompt: the unmodified layer, reading what the prompt left in this
        block's cache - the kept tokens' entries only (a compacted layer: the mask's columns for
        them), or an entry per position with the placeholders masked (the layer's ``visible``)."""
        layer = cache_of(kwargs).layers[idx]
        prompt = getattr(layer, "visible", None)
        compacted = getattr(layer, "kept", None) is not None
        if prompt is None and not compacted:
            return orig(hidden, *args, **kwargs)
        B, T, _ = hidden.shape
        n_past = layer.get_seq_length()  # positions (a compacted layer holds fewer entries)
        mask = kwargs.get("attention_mask")
        if mask is not None and (mask.dim() != 4 or mask.shape[-1] != n_past + T):
            raise TurboLMError(f"prefill_only token pruning got an attention mask of shape {tuple(mask.shape)} for "
                               f"{T} new tokens after {n_past} cached ones; it needs a 4D mask over the whole cache")
        if compacted:
            n_held = layer.keys.shape[2]
            if mask is not None:
                mask = mask.index_select(-1, layer.columns(n_past + T))
            elif T > 1:  # sdpa's own causal kernel: spell it out over the entries there are
                mask = torch.ones(T, n_held + T, dtype=torch.bool, device=hidden.device).tril(n_held)
            return orig(hidden, *args, **{**kwargs, "attention_mask": mask})
        n = min(prompt.shape[-1], n_past)
        visible = torch.nn.functional.pad(prompt[..., :n], (0, n_past + T - n), value=True)
        if mask is None and T == 1:
            mask = visible
        elif mask is None:  # sdpa's own causal kernel: spell it out
            mask = visible & torch.ones(T, n_past + T, dtype=torch.bool, device=hidden.device).tril(n_past)
        elif mask.dtype == torch.bool:
            mask = mask & visible
        else:
            mask = mask.masked_fill(~visible, torch.finfo(mask.dtype).min)
        return orig(hidden, *args, **{**kwargs, "attention_mask": mask})

    def _keys_values(self, idx, hidden, cos, sin):
        """The keys (rotated) and values block ``idx`` gives tokens whose input is ``hidden``:
        the layer's own input norm and projections (and per-head key norm where it has one)."""
        layer = self.layers[idx]
        attn = layer.self_attn
        B, n, _ = hidden.shape
        x = layer.input_layernorm(hidden)
        k = attn.k_proj(x).view(B, n, -1, attn.head_dim)
        if getattr(attn, "k_norm", None) is not None:
            k = attn.k_norm(k)
        v = attn.v_proj(x).view(B, n, -1, attn.head_dim).transpose(1, 2)
        return apply_rotary(k.transpose(1, 2), cos, sin), v

    def _decode_block(self, idx, orig, hidden, args, kwargs, fw):
        cache = cache_of(kwargs)
        if self.schedule[idx] == 0.0:  # a dense block stays dense in decoding too
            keep = True
        else:
            keep = bool(self.router.keep_decode_hidden(hidden, idx).all() if self._hidden_router
                        else self.router.keep_decode(self._factors(idx, fw, fw.positions), idx).all())
        self.stats.add(idx, 1, 0 if keep else 1, decode=True)
        if not keep and not self.dense_kv:
            return hidden
        out = self._call(orig, hidden, args, kwargs, fw.positions, fw.cos, fw.sin, None, cache)
        self._record_keys(idx, fw, cache, fw.positions)
        if not keep:
            return hidden
        self._update_attention(idx, fw, cache, fw.positions, None, fw.positions, None)
        return out

    def _train_block(self, idx, orig, hidden, args, kwargs, fw):
        """All tokens run with keys restricted to the kept tokens; straight-through gates."""
        if cache_of(kwargs) is not None and kwargs.get("use_cache"):
            raise TurboLMError("training mode runs without a KV cache (use_cache=False)")
        B, T, D = hidden.shape
        n_skip = self._n_skip(idx, T, fw)
        factors = None if self._hidden_router else self._factors(idx, fw, fw.positions)
        logits = self._scores(idx, fw, hidden, factors)
        keep_idx = self._keep_indices(logits.detach(), T - n_skip, fw)
        keep = torch.zeros(B, T, dtype=torch.bool, device=hidden.device).scatter_(1, keep_idx, True)
        self.stats.add(idx, B * T, B * n_skip, decode=False)
        causal = torch.ones(T, T, dtype=torch.bool, device=hidden.device).tril()
        if self.dense_kv:
            allowed = causal.expand(B, 1, T, T)
        else:
            eye = torch.eye(T, dtype=torch.bool, device=hidden.device)
            allowed = (causal & (keep[:, None, :] | eye)).unsqueeze(1)
        mask = self._mask(T, 0, hidden.dtype, hidden.device, B, allowed=allowed)
        full = self._call(orig, hidden, args, kwargs, fw.positions, fw.cos, fw.sin, mask, None)
        hard = keep.to(hidden.dtype)
        if logits.requires_grad:
            soft = torch.sigmoid(logits).to(hidden.dtype)
            gate = hard + soft - soft.detach()
        else:
            soft, gate = hard, hard
        out = hidden + gate.unsqueeze(-1) * (full - hidden)
        if self.train_records:
            self.records.append({"block": idx, "soft": soft, "keep": keep, "factors": factors, "logits": logits})
        kept_pos = fw.positions.gather(1, keep_idx)
        key_rows = None if self.dense_kv else keep_idx
        self._update_attention(idx, fw, None, kept_pos, keep_idx, fw.positions if self.dense_kv else kept_pos,
                               None, key_rows=key_rows)
        return out

    @staticmethod
    def _record_keys(idx, fw, cache, key_positions):
        """Remember the positions of the keys/values block ``idx`` just added to its cache."""
        if cache is None:
            return
        prev = fw.sequence.key_positions[idx]
        fw.sequence.key_positions[idx] = key_positions if prev is None else torch.cat([prev, key_positions], 1)

    @torch.no_grad()
    def _update_attention(self, idx, fw, cache, query_positions, query_rows, key_positions, rotary_sub,
                          key_rows=None, keys=None):
        """Refresh factor 2 for the keys of block ``idx`` from its last few computed queries.

        ``query_rows``/``key_rows``: rows of the captured projections that belong to the
        computed queries/keys (None: all rows, in order). ``rotary_sub``: the (cos, sin) of the
        captured rows when they are a gathered sub-batch. ``keys``: the block's rotated keys
        at ``key_positions`` when they are given rather than read from ``cache`` or the capture.
        """
        q_all, k_all = self._captured.get("q_proj"), self._captured.get("k_proj")
        if not self.track_attention or q_all is None or k_all is None or query_positions.shape[1] == 0:
            return
        attn = self.layers[idx].self_attn
        hd = attn.head_dim
        B = q_all.shape[0]
        cos, sin = rotary_sub if rotary_sub is not None else (fw.cos, fw.sin)
        m = min(self.attention_queries, query_positions.shape[1])
        rows = (query_rows[:, -m:] if query_rows is not None
                else torch.arange(q_all.shape[1] - m, q_all.shape[1], device=q_all.device).expand(B, m))
        q = q_all.gather(1, rows.unsqueeze(-1).expand(B, m, q_all.shape[-1]))
        q = q.view(B, m, -1, hd).transpose(1, 2)
        cq = cos.gather(1, rows.unsqueeze(-1).expand(B, m, hd))
        sq = sin.gather(1, rows.unsqueeze(-1).expand(B, m, hd))
        q = apply_rotary(q, cq, sq)
        q_pos = query_positions[:, -m:]
        seq = fw.sequence
        if keys is not None:
            k_pos = key_positions
        elif cache is not None:
            keys = cache.layers[idx].keys
            k_pos = seq.key_positions[idx]
        else:
            if key_rows is not None:
                k_src = k_all.gather(1, key_rows.unsqueeze(-1).expand(B, key_rows.shape[1], k_all.shape[-1]))
                ck = cos.gather(1, key_rows.unsqueeze(-1).expand(B, key_rows.shape[1], hd))
                sk = sin.gather(1, key_rows.unsqueeze(-1).expand(B, key_rows.shape[1], hd))
            else:
                k_src, ck, sk = k_all, cos, sin
            keys = apply_rotary(k_src.view(B, k_src.shape[1], -1, hd).transpose(1, 2), ck, sk)
            k_pos = key_positions
        probs = received_attention(q, q_pos, keys, k_pos, attn.scaling)
        seq.attention.scatter_(1, k_pos, attention_value(probs).to(seq.attention.dtype))


def _skipped_rows(keep_idx: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For kept rows ``keep_idx`` (B, K) of a T-token forward: the skipped mask (B, T) and the
    skipped rows in order (B, T - K)."""
    B, K = keep_idx.shape
    skipped = torch.ones(B, T, dtype=torch.bool, device=keep_idx.device).scatter_(1, keep_idx, False)
    return skipped, torch.arange(T, device=keep_idx.device).expand(B, T)[skipped].view(B, T - K)


def cache_of(kwargs):
    """The KV cache a decoder layer was called with, under any transformers >= 5.17 keyword."""
    for name in ("cache", "past_key_values", "past_key_value"):
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None
