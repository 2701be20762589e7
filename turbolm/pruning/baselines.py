"""Layer-pruning baselines compared with FTP at matched compute: ShortGPT and BlockPruner.

- ShortGPT (Men et al., 2024): Block Influence ``BI_l = 1 - mean cos(x_in, x_out)`` of decoder
  layer ``l`` over all calibration tokens, measured once on the dense model; the
  ``round(sparsity * L)`` layers with the lowest BI are deleted (:func:`block_influence`,
  :func:`shortgpt_layers`).
- BlockPruner (Zhong et al., 2024): every layer is split into its attention block and its MLP
  block; greedily, the block whose removal raises the calibration perplexity least is removed,
  until the removed compute reaches the target (:func:`blockpruner_order`). One greedy pass
  to the largest sparsity gives every smaller one as a prefix (:func:`blockpruner_blocks`).

Compute is counted as the per-token FLOPs of the decoder layers' linear projections (one MAC
per weight: attention = q, k, v, o projections; MLP = gate, up, down), read from the weight
shapes of every ``nn.Linear`` inside ``layer.self_attn`` and ``layer.mlp``, so it holds for any
Llama / Qwen2 / Mistral size. Not counted: embeddings and the LM head (identical for every
method), norms and activations (negligible), and the attention-score products
(``QK^T``, ``AV``), which grow with the context length. A block's *compute fraction* is its
share of that total (:func:`compute_fractions`); this is the same unit as FTP's sparsity when
every block is skipped for the same share of tokens.

The pruned models are applied without forking modeling files by :class:`LayerDropper`, which
overrides ``forward`` on module instances, like :class:`.skipping.TokenPruner`. Both are
subclasses of :class:`~turbolm.core.patches.ModelPatch`: detaching restores exactly what was
there, and the two are never attached to one model together. The replacement forwards:

- a dropped layer returns its input hidden states unchanged;
- a dropped attention block: ``layer.self_attn`` returns ``(zeros, None)`` (the attention of
  every supported version returns ``(attn_output, attn_weights)`` and the layer adds
  ``attn_output`` to the residual), so the residual passes through;
- a dropped MLP block: ``layer.mlp`` returns zeros.

KV cache: a dropped attention block (or layer) computes no keys/values, so its cache layer
stays empty, which saves its KV memory. Transformers derives the positions of new tokens and
the mask sizes from the cache length of layer 0 (and of the first layer of each attention
type: full / sliding), so when one of those *anchor* layers is dropped, the dropper appends
zero placeholder keys/values there (no projection is computed; they are never attended to).
Decoding with a ``DynamicCache`` then gives exactly what recomputing the whole sequence gives.
"""

from __future__ import annotations

import math
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import TurboLMError
from ..core.patches import ModelPatch
from .skipping import cache_of, decoder_layers

BLOCK_KINDS = ("attention", "mlp")


# -- compute accounting ------------------------------------------------------------------------
def _linear_macs(module: nn.Module) -> int:
    """Multiply-accumulates per token of all linear layers inside ``module`` (weight numel)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def compute_fractions(model) -> dict:
    """Per-layer shares of the decoder layers' per-token linear FLOPs.

    Returns ``{"attention": [L floats], "mlp": [L floats], "layer": [L floats],
    "attention_total": float, "mlp_total": float, "flops_per_token": int}``; all fractions
    together sum to 1. ``flops_per_token`` = 2 x the MACs of all decoder-layer projections.
    """
    layers = decoder_layers(model)
    attn = [_linear_macs(layer.self_attn) for layer in layers]
    mlp = [_linear_macs(getattr(layer, "mlp", nn.Identity())) for layer in layers]
    if not all(attn) or not all(mlp):
        raise TurboLMError(f"cannot count the linear FLOPs of {type(model).__name__}: every decoder layer needs "
                           "nn.Linear projections in self_attn and mlp")
    total = sum(attn) + sum(mlp)
    fa = [a / total for a in attn]
    fm = [m / total for m in mlp]
    return {"attention": fa, "mlp": fm, "layer": [a + m for a, m in zip(fa, fm)],
            "attention_total": sum(fa), "mlp_total": sum(fm), "flops_per_token": 2 * total}


# -- ShortGPT ----------------------------------------------------------------------------------
def _hidden_in(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _hidden_out(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def block_influence(model, chunks: torch.Tensor, batch_size: int = 4) -> list[float]:
    """ShortGPT's Block Influence of every decoder layer: ``1 - mean cos(x_in, x_out)``.

    ``x_in`` / ``x_out`` are the hidden states entering and leaving the layer, read by forward
    hooks on the layers themselves (not ``output_hidden_states``: Hugging Face's last hidden
    state has the final norm applied, so it is not the last layer's output). The mean runs
    over every token of every chunk (``chunks``: (N, T) token ids), the cosine in float32.
    """
    layers = decoder_layers(model)
    sums = [0.0] * len(layers)
    count = 0

    def hook_for(idx):
        def hook(module, args, kwargs, output):
            x_in = _hidden_in(args, kwargs).float()
            x_out = _hidden_out(output).float()
            sums[idx] += float(F.cosine_similarity(x_in, x_out, dim=-1).double().sum())
        return hook

    handles = [layer.register_forward_hook(hook_for(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for i in range(0, len(chunks), batch_size):
            ids = chunks[i: i + batch_size].to(model.device)
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
            count += ids.numel()
    finally:
        for h in handles:
            h.remove()
    if not count:
        raise TurboLMError("block influence needs at least one calibration chunk")
    return [1.0 - s / count for s in sums]


def _check_sparsity(sparsity: float) -> float:
    sparsity = float(sparsity)
    if not 0.0 <= sparsity < 1.0:
        raise TurboLMError(f"sparsity must be in [0, 1), not {sparsity}")
    return sparsity


def shortgpt_layers(bi, sparsity: float) -> list[int]:
    """The ``round(sparsity * L)`` layers with the lowest Block Influence (ties: lower index),
    sorted by index. Rounding is half-up (30 layers: 22% -> 7, 30% -> 9, 40% -> 12)."""
    sparsity = _check_sparsity(sparsity)
    n = int(sparsity * len(bi) + 0.5)
    ranked = sorted(range(len(bi)), key=lambda i: (bi[i], i))
    return sorted(ranked[:n])


# -- applying a pruned model -------------------------------------------------------------------
def _indices(name: str, values, n: int) -> set[int]:
    out = set()
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < n:
            raise TurboLMError(f"{name}: {v!r} is not a layer index in [0, {n})")
        out.add(int(v))
    return out


def _anchor_layers(config, n_layers: int) -> set[int]:
    """Layers whose cache length transformers reads (positions, mask sizes): layer 0 and the
    first layer of each attention type (``config.layer_types``: full / sliding)."""
    anchors = {0}
    types = getattr(config, "layer_types", None)
    if types:
        types = list(types)[:n_layers]
        anchors |= {types.index(t) for t in set(types)}
    return anchors


class LayerDropper(ModelPatch):
    """Drop whole decoder layers, attention blocks and MLP blocks of ``model`` (in place;
    :meth:`detach` restores it exactly). Use as a context manager or attach()/detach().

    A layer listed in both ``drop_attention`` and ``drop_mlp`` is dropped as a whole layer.
    ``removed_fraction``: the share of the decoder layers' per-token linear FLOPs removed
    (see :func:`compute_fractions`).
    """

    patches = frozenset({"decoder_layers"})

    def __init__(self, model, drop_layers=(), drop_attention=(), drop_mlp=()):
        super().__init__(model)
        self.layers = decoder_layers(model)
        n = len(self.layers)
        layers = _indices("drop_layers", drop_layers, n)
        attn = _indices("drop_attention", drop_attention, n)
        mlp = _indices("drop_mlp", drop_mlp, n)
        layers |= attn & mlp
        self.drop_layers = sorted(layers)
        self.drop_attention = sorted(attn - layers)
        self.drop_mlp = sorted(mlp - layers)
        fr = compute_fractions(model)
        self.removed_fraction = (sum(fr["layer"][i] for i in self.drop_layers)
                                 + sum(fr["attention"][i] for i in self.drop_attention)
                                 + sum(fr["mlp"][i] for i in self.drop_mlp))
        self._anchors = _anchor_layers(model.config, n)

    def describe(self) -> str:
        parts = []
        for name, idx in (("layers", self.drop_layers), ("attention blocks", self.drop_attention),
                          ("MLP blocks", self.drop_mlp)):
            if idx:
                parts.append(f"{name} {idx}")
        what = "; ".join(parts) if parts else "nothing"
        return f"dropped {what}: {100 * self.removed_fraction:.1f}% of the decoder's per-token linear FLOPs"

    def to_json(self) -> dict:
        return {"drop_layers": self.drop_layers, "drop_attention": self.drop_attention,
                "drop_mlp": self.drop_mlp, "removed_fraction": round(self.removed_fraction, 6)}

    # -- attaching -------------------------------------------------------------------------
    def _patch(self) -> None:
        for i in self.drop_layers:
            self.replace(self.layers[i], "forward", self._skip_layer(i))
        for i in self.drop_attention:
            self.replace(self.layers[i].self_attn, "forward", self._zero_attention(i))
        for i in self.drop_mlp:
            self.replace(self.layers[i].mlp, "forward", _zero_mlp)
        # Kept for readers that predate the patch registry (patches.find(model, LayerDropper)).
        self.replace(self.model, "turbolm_dropper", self)

    # -- replacement forwards ----------------------------------------------------------------
    def _placeholder_kv(self, idx: int, hidden: torch.Tensor, kwargs: dict) -> None:
        """Zero keys/values for an anchor layer, so the cache length transformers reads stays right."""
        if idx not in self._anchors:
            return
        cache = cache_of(kwargs)
        if cache is None:
            return
        attn = self.layers[idx].self_attn
        head_dim = getattr(attn, "head_dim", None) or attn.k_proj.out_features // attn.config.num_key_value_heads
        n_kv = attn.k_proj.out_features // head_dim
        B, T = hidden.shape[:2]
        kv = hidden.new_zeros(B, n_kv, T, head_dim)
        cache.update(kv, kv.clone(), idx)

    def _skip_layer(self, idx: int):
        def forward(*args, **kwargs):
            hidden = _hidden_in(args, kwargs)
            self._placeholder_kv(idx, hidden, kwargs)
            return hidden
        return forward

    def _zero_attention(self, idx: int):
        def forward(*args, **kwargs):
            hidden = _hidden_in(args, kwargs)
            self._placeholder_kv(idx, hidden, kwargs)
            return torch.zeros_like(hidden), None
        return forward


def _zero_mlp(hidden, *args, **kwargs):
    return torch.zeros_like(hidden)


# -- BlockPruner -------------------------------------------------------------------------------
@torch.no_grad()
def calibration_perplexity(model, chunks: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token loss) over every position of every chunk (N, T) of token ids."""
    total, count = 0.0, 0
    for i in range(0, len(chunks), batch_size):
        ids = chunks[i: i + batch_size].to(model.device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
        target = ids[:, 1:]
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
        total += float(loss)
        count += target.numel()
    if not count:
        raise TurboLMError("perplexity needs calibration chunks of at least 2 tokens")
    mean = total / count
    return math.exp(mean) if math.isfinite(mean) and mean < 700 else math.inf


def blockpruner_order(model, chunks: torch.Tensor, max_fraction: float, batch_size: int = 4,
                      progress: bool = True, start: list[dict] | None = None, on_step=None) -> list[dict]:
    """BlockPruner's greedy removal order, until the removed compute fraction reaches ``max_fraction``.

    Each step tries removing each remaining block (attention or MLP of some layer) on top of
    the blocks removed so far, and removes the one with the lowest calibration perplexity
    (:func:`calibration_perplexity`; ties: lower layer, attention first). Returns one dict per
    removal: ``{"step", "layer", "block" ("attention" | "mlp"), "fraction" (this block's),
    "removed_fraction" (cumulative), "perplexity" (after this removal), "candidates"}``.

    ``start``: an earlier (partial) order to continue from; ``on_step(order)`` is called after
    every removal (e.g. to save it). Cost: about ``sum_k (2L - k)`` perplexity evaluations.
    """
    if not 0.0 < max_fraction < 1.0:
        raise TurboLMError(f"max_fraction must be in (0, 1), not {max_fraction}")
    layers = decoder_layers(model)
    fr = compute_fractions(model)
    order = [dict(s) for s in (start or [])]
    removed = {(s["layer"], s["block"]) for s in order}
    cum = order[-1]["removed_fraction"] if order else 0.0
    blocks = [(layer, kind) for layer in range(len(layers)) for kind in BLOCK_KINDS]

    from tqdm.auto import tqdm
    bar = tqdm(desc="blockpruner", unit="eval", disable=not progress, file=sys.stderr)
    try:
        while cum < max_fraction - 1e-12:
            remaining = [b for b in blocks if b not in removed]
            if not remaining:
                break
            best, best_ppl = None, math.inf
            for cand in remaining:
                trial = removed | {cand}
                dropper = LayerDropper(model, drop_attention=[lay for lay, k in trial if k == "attention"],
                                       drop_mlp=[lay for lay, k in trial if k == "mlp"])
                with dropper:
                    ppl = calibration_perplexity(model, chunks, batch_size)
                if not math.isfinite(ppl):
                    ppl = math.inf
                if best is None or ppl < best_ppl:
                    best, best_ppl = cand, ppl
                bar.update(1)
            layer, kind = best
            frac = fr["attention" if kind == "attention" else "mlp"][layer]
            removed.add(best)
            cum += frac
            order.append({"step": len(order), "layer": layer, "block": kind, "fraction": frac,
                          "removed_fraction": cum, "perplexity": best_ppl, "candidates": len(remaining)})
            bar.set_postfix(removed=f"{100 * cum:.1f}%", ppl=f"{best_ppl:.2f}")
            if on_step is not None:
                on_step(order)
    finally:
        bar.close()
    return order


def blockpruner_blocks(order: list[dict], sparsity: float, mode: str = "at_least") -> dict:
    """The blocks of a prefix of a :func:`blockpruner_order` result, as ``LayerDropper`` keyword
    arguments ``{"drop_attention": [...], "drop_mlp": [...]}``.

    ``mode="at_least"`` (default): the shortest prefix whose cumulative fraction is >=
    ``sparsity`` (so the baseline never gets more compute than the method it is compared to).
    ``mode="closest"``: the prefix whose fraction is nearest to ``sparsity`` (ties: the larger).
    Both raise when the order stops below ``sparsity`` (run the pass to a larger max_fraction).
    """
    sparsity = _check_sparsity(sparsity)
    if mode not in ("at_least", "closest"):
        raise TurboLMError(f"mode must be 'at_least' or 'closest', not {mode!r}")
    cums = [0.0] + [s["removed_fraction"] for s in order]
    if cums[-1] < sparsity - 1e-9:
        raise TurboLMError(f"the BlockPruner order reaches only {cums[-1]:.3f} of the compute, not {sparsity}; "
                           "compute it with a larger max_fraction")
    k = next(i for i, c in enumerate(cums) if c >= sparsity - 1e-9)
    if mode == "closest" and k > 0 and sparsity - cums[k - 1] < cums[k] - sparsity:
        k -= 1
    prefix = order[:k]
    return {"drop_attention": sorted(s["layer"] for s in prefix if s["block"] == "attention"),
            "drop_mlp": sorted(s["layer"] for s in prefix if s["block"] == "mlp")}


def time_perplexity(model, chunks: torch.Tensor, batch_size: int = 4, repeats: int = 1) -> float:
    """Seconds for one :func:`calibration_perplexity` evaluation (the unit of a BlockPruner step)."""
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        calibration_perplexity(model, chunks, batch_size)
        if torch.device(model.device).type == "cuda":
            torch.cuda.synchronize(model.device)
        best = min(best, time.perf_counter() - t0)
    return best
