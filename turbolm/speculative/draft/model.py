"""The Jakiro draft: one decoder layer on the target's features, with a Mixture-of-Experts FFN.

Input at draft position j: ``fc(concat(embed(x_{j+1}), f_j))`` where ``f_j`` is the target's
final-norm hidden state at j (or the draft's own prediction of it inside a tree) and ``embed``
is the target's frozen embedding. One attention block (no input norm: the fc output goes
straight in), then the FFN. The output predicts ``f_{j+1}``; the target's frozen lm_head turns
it into the distribution of ``x_{j+2}``.

- ``arch="jakiro"``: the FFN is ``num_experts`` SwiGLU experts (intermediate = hidden size)
  behind a linear router with ``num_experts + 2`` logits. The first ``num_experts`` weight the
  top-2 experts (``mixture`` output). The last two weight a *contrastive* output
  ``x + v_a E_a - v_b E_b`` that predicts the feature two steps ahead (``f_{j+2}``), so the
  tree's last two levels cost one draft forward. ``contrastive_pairing="expert"`` is the
  reference's: value slot ``num_experts + e`` belongs to expert ``e`` (a = the expert whose value
  is larger); ``"ranked"`` (the first shipped drafts) gives the larger value to the expert the
  mixture router ranks first. In ``decoupled`` candidate mode each selected
  expert also gives its own feature ``x + E_e``, hence its own distribution.
- ``arch="eagle2"``: the same code with one dense SwiGLU FFN and no contrastive branch.

The target's embedding and lm_head are passed in at run time, never stored in a checkpoint.
An optional reduced draft vocabulary (``draft_vocab``: target ids) restricts the draft's
lm_head to those rows, which matters when the lm_head dominates a small draft's cost.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...core.errors import DataError, ParameterError, TurboLMError, literal
from ...core.io import atomic_write, load_weights
from ...core.kernels import linear as fast_linear
from ...core.kvcache import append_in_place
from ...core.models import identity_mismatch, model_identity

ARCHS = ("jakiro", "eagle2")
ARCH_NAMES = {"jakiro": "Jakiro", "eagle2": "EAGLE-2"}
CANDIDATE_MODES = ("mixture", "decoupled")
PAIRINGS = ("expert", "ranked")


@dataclass
class DraftConfig:
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int  # the dense FFN of arch eagle2
    arch: str = "jakiro"
    num_experts: int = 2
    expert_intermediate_size: int = 0  # 0: the hidden size (paper)
    candidate_mode: str = "mixture"
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    draft_vocab_size: int = 0  # 0: the target's full vocabulary
    contrastive_pairing: str = "ranked"  # absent from the first checkpoints' configs, which were "ranked"
    fc_bias: bool = True  # False: fc without a bias, as vLLM's EAGLE layout has it (draft/export.py)
    target: dict = field(default_factory=dict)  # model_identity() of the target it was trained for

    def __post_init__(self):
        for name in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
                     "num_experts", "expert_intermediate_size", "draft_vocab_size"):
            value, low = getattr(self, name), 0 if name in ("expert_intermediate_size", "draft_vocab_size") else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise TurboLMError(f"{name} must be an integer >= {low}, got {value!r}")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < float("inf"):
                raise TurboLMError(f"{name} must be a positive number, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise TurboLMError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                               f"num_key_value_heads ({self.num_key_value_heads})")
        if not isinstance(self.fc_bias, bool):
            raise TurboLMError(f"fc_bias must be true or false, got {self.fc_bias!r}")
        if not isinstance(self.target, dict):
            raise TurboLMError(f"target must be an object (the target model's identity), got {self.target!r}")
        if self.arch not in ARCHS:
            raise TurboLMError(f"unknown draft architecture '{self.arch}'; use one of {', '.join(ARCHS)}")
        if self.candidate_mode not in CANDIDATE_MODES:
            raise TurboLMError(f"unknown candidate mode '{self.candidate_mode}'; use mixture or decoupled")
        if self.contrastive_pairing not in PAIRINGS:
            raise TurboLMError(f"unknown contrastive pairing '{self.contrastive_pairing}'; use expert or ranked")
        if self.arch == "jakiro" and self.num_experts < 2:
            raise TurboLMError("a Jakiro draft needs at least 2 experts")
        if self.arch == "eagle2" and self.candidate_mode != "mixture":
            raise TurboLMError("the EAGLE-2 draft has one FFN: only candidate mode 'mixture' applies")
        self.expert_intermediate_size = self.expert_intermediate_size or self.hidden_size
        vocab = (self.target or {}).get("vocab_size")
        if self.draft_vocab_size < 0 or (vocab and self.draft_vocab_size >= vocab):
            raise TurboLMError(f"draft vocabulary size must be 0 (the target's full vocabulary) or between 1 and "
                               f"{vocab - 1 if vocab else 'the target vocabulary size'}, got {self.draft_vocab_size}")

    @property
    def has_contrastive(self) -> bool:
        return self.arch == "jakiro"

    @classmethod
    def for_target(cls, target, **overrides) -> DraftConfig:
        c = target.config
        rope = getattr(c, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(c, "rope_theta", 10000.0)) if isinstance(rope, dict) else 10000.0
        heads = c.num_attention_heads
        fields = dict(
            hidden_size=c.hidden_size,
            num_attention_heads=heads,
            num_key_value_heads=getattr(c, "num_key_value_heads", heads) or heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
            intermediate_size=c.intermediate_size,
            rms_norm_eps=getattr(c, "rms_norm_eps", 1e-5),
            rope_theta=float(theta),
            target=model_identity(target),
        )
        fields.update(overrides)
        return cls(**fields)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding (Llama's half-split form) of x: (B, heads, T, d) at positions (B, T)."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    ang = positions.float().unsqueeze(-1) * inv  # (B, T, d/2)
    cos, sin = torch.cat([ang, ang], -1).cos().unsqueeze(1), torch.cat([ang, ang], -1).sin().unsqueeze(1)
    x1, x2 = x.float().chunk(2, dim=-1)
    return (x.float() * cos + torch.cat([-x2, x1], -1) * sin).to(x.dtype)


class KVCache:
    """The draft's key/value cache: (B, kv_heads, S, head_dim) tensors, grown and trimmed in place."""

    def __init__(self):
        self.k = self.v = self._k_buffer = self._v_buffer = None

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k, v):
        self.k, self._k_buffer = append_in_place(self.k, self._k_buffer, k)
        self.v, self._v_buffer = append_in_place(self.v, self._v_buffer, v)
        return self.k, self.v

    def truncate(self, length: int) -> None:
        if self.k is not None:
            self.k, self.v = self.k[:, :, :length], self.v[:, :, :length]


@dataclass
class DraftOutput:
    hidden: torch.Tensor  # (B, T, H): predicted next feature (mixture of experts / dense FFN)
    contrastive: torch.Tensor | None = None  # (B, T, H): predicted feature two steps ahead
    expert_hidden: torch.Tensor | None = None  # (B, T, 2, H): the two selected experts' own features
    expert_weights: torch.Tensor | None = None  # (B, T, 2): their mixture weights
    experts: torch.Tensor | None = None  # (B, T, E, H): every expert's FFN output (before the residual)
    residual: torch.Tensor | None = None  # (B, T, H): the stream the experts add to (x + E_e: expert e's feature)


class DraftModel(nn.Module):
    def __init__(self, config: DraftConfig):
        super().__init__()
        self.config = c = config
        H = c.hidden_size
        self.fc = nn.Linear(2 * H, H, bias=c.fc_bias)
        self.q_proj = nn.Linear(H, c.num_attention_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(H, c.num_key_value_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(H, c.num_key_value_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, H, bias=False)
        self.post_attention_norm = RMSNorm(H, c.rms_norm_eps)
        if c.arch == "eagle2":
            self.mlp = SwiGLU(H, c.intermediate_size)
        else:
            self.experts = nn.ModuleList(SwiGLU(H, c.expert_intermediate_size) for _ in range(c.num_experts))
            self.router = nn.Linear(H, c.num_experts + 2, bias=False)
        # Target ids of the draft vocabulary (empty: the full vocabulary).
        self.register_buffer("draft_vocab", torch.zeros(c.draft_vocab_size, dtype=torch.long))

    # --- the network --------------------------------------------------------------------------

    def forward(self, token_embeds, features, positions, cache: KVCache | None = None, mask=None) -> DraftOutput:
        """token_embeds, features: (B, T, H); positions: (B, T). ``mask``: bool (B|1, 1, T, S) with
        True where a query may attend (S = cached + T); None means causal over cache + new tokens."""
        c = self.config
        B, T, _ = features.shape
        x = self.fc(torch.cat([token_embeds, features.to(token_embeds.dtype)], -1))
        q = self.q_proj(x).view(B, T, c.num_attention_heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        q, k = rotate(q, positions, c.rope_theta), rotate(k, positions, c.rope_theta)
        past = len(cache) if cache is not None else 0
        if cache is not None:
            k, v = cache.append(k, v)
        if mask is None and past:
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)[None, None]
        attn = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
            enable_gqa=c.num_attention_heads != c.num_key_value_heads,
        )
        x = x + self.o_proj(attn.transpose(1, 2).reshape(B, T, -1))
        h = self.post_attention_norm(x)
        if c.arch == "eagle2":
            return DraftOutput(hidden=x + self.mlp(h))
        logits = self.router(h)
        top = torch.topk(logits[..., : c.num_experts], 2, dim=-1)
        weights = top.values.softmax(-1)  # (B, T, 2)
        outs = torch.stack([e(h) for e in self.experts], dim=-2)  # (B, T, E, H)
        sel = torch.gather(outs, -2, top.indices.unsqueeze(-1).expand(*top.indices.shape, outs.shape[-1]))
        hidden = x + (weights.unsqueeze(-1) * sel).sum(-2)
        # Contrastive branch: a = the larger of the two values, b = the other; "expert": value slot
        # e is expert e's (the reference), "ranked": slot e is the mixture's e-th ranked expert.
        v = logits[..., c.num_experts :].softmax(-1)
        a_first = (v[..., 0] >= v[..., 1]).unsqueeze(-1)
        v_a, v_b = v.max(-1).values.unsqueeze(-1), v.min(-1).values.unsqueeze(-1)
        pair = outs[..., :2, :] if c.contrastive_pairing == "expert" else sel
        e_a = torch.where(a_first, pair[..., 0, :], pair[..., 1, :])
        e_b = torch.where(a_first, pair[..., 1, :], pair[..., 0, :])
        contrastive = x + v_a * e_a - v_b * e_b
        expert_hidden = x.unsqueeze(-2) + sel if c.candidate_mode == "decoupled" else None
        return DraftOutput(hidden, contrastive, expert_hidden, weights, outs, x)

    def logits(self, hidden: torch.Tensor, lm_head_weight: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits of predicted features through the target's lm_head rows."""
        # F.linear itself wherever the fast path does not apply (training, GPU, other dtypes).
        return fast_linear(hidden.to(lm_head_weight.dtype), self.head_weight(lm_head_weight))

    def head_weight(self, lm_head_weight: torch.Tensor) -> torch.Tensor:
        """The target lm_head rows of the draft vocabulary. The target is frozen, so the gathered
        rows are kept until the weight or the vocabulary changes (it is on every hot path)."""
        if not self.draft_vocab.numel():
            return lm_head_weight
        key = (lm_head_weight.data_ptr(), lm_head_weight._version, lm_head_weight.dtype, self.draft_vocab._version)
        if getattr(self, "_head_key", None) != key:
            self._head = lm_head_weight.detach()[self.draft_vocab]
            self._head_key = key
        return self._head

    def to_target_ids(self, idx: torch.Tensor) -> torch.Tensor:
        return self.draft_vocab[idx] if self.draft_vocab.numel() else idx

    # --- checkpoints --------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        """Write ``config.json`` and ``model.safetensors`` atomically (temp files, then rename);
        ``dtype`` stores the floating-point weights in that precision (e.g. float16 to ship)."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        atomic_write(d / "model.safetensors", lambda p: save_file(state, str(p)))
        atomic_write(d / "config.json", lambda p: Path(p).write_text(json.dumps(asdict(self.config), indent=1)))


@torch.no_grad()
def init_from_target(draft: DraftModel, target) -> list[str]:
    """Start the draft from the target's last decoder layer instead of noise: the parts that
    *read* the stream - attention q/k/v projections and, where the shapes allow, the FFN's gate
    and up projections (EAGLE-2's dense FFN has the target's shapes; Jakiro's expert e takes the
    target's FFN neurons ``e*I .. (e+1)*I``) - and the post-attention norm. The parts that
    *write* back (``o_proj``, ``down_proj``) start at zero and ``fc`` passes the feature through
    (identity on the feature half, the token half random and scaled down), so the draft starts
    as the identity on the feature and learns from there. Copying the writing parts too makes
    the start explode on final-norm features (SmolLM2-135M: held-out SmoothL1 40 and soft CE 497
    at step 0, against 0.93 / 13.7 from noise and 0.69 / 11.2 this way). Returns the names of
    the initialised draft parameters."""
    layers = getattr(target.get_decoder(), "layers", None)
    if not layers:
        raise ParameterError("{} has no decoder layers to initialise a draft from", "target")
    layer, done = layers[-1], []

    def copy(dst: torch.Tensor, src, name: str, rows: slice | None = None, cols: slice | None = None):
        if src is None:
            return
        w = src.weight if hasattr(src, "weight") else src
        w = w[rows] if rows is not None else w
        w = w[:, cols] if cols is not None else w
        if tuple(w.shape) == tuple(dst.shape):
            dst.copy_(w.to(dst.dtype))
            done.append(name)

    attn = getattr(layer, "self_attn", None)
    for proj in ("q_proj", "k_proj", "v_proj"):
        copy(getattr(draft, proj).weight, getattr(attn, proj, None), proj)
    norm = getattr(layer, "post_attention_layernorm", None)
    if norm is not None and not type(norm).__name__.startswith("Gemma"):  # Gemma scales by 1 + weight
        copy(draft.post_attention_norm.weight, norm, "post_attention_norm")
    mlp = getattr(layer, "mlp", None)
    if draft.config.arch == "eagle2":
        for proj in ("gate_proj", "up_proj"):
            copy(getattr(draft.mlp, proj).weight, getattr(mlp, proj, None), f"mlp.{proj}")
    else:
        size = draft.config.expert_intermediate_size
        for e, expert in enumerate(draft.experts):
            part = slice(e * size, (e + 1) * size)
            for proj in ("gate_proj", "up_proj"):
                copy(getattr(expert, proj).weight, getattr(mlp, proj, None), f"experts.{e}.{proj}", rows=part)
    if len(done) == 0:
        raise ParameterError("the target's last layer matches none of the draft's shapes: start from noise ({} random)", "init")
    draft.o_proj.weight.zero_()
    for ffn in ([draft.mlp] if draft.config.arch == "eagle2" else draft.experts):
        ffn.down_proj.weight.zero_()
    H = draft.config.hidden_size
    draft.fc.weight[:, :H] *= 0.1
    draft.fc.weight[:, H:] = torch.eye(H, dtype=draft.fc.weight.dtype)
    draft.fc.bias.zero_()
    return done + ["fc", "o_proj", "down_proj"]


SHIPPED = Path(__file__).resolve().parents[2] / "checkpoints"
SHIPPED_DRAFTS = {"jakiro": "jakiro-smollm2-135m", "eagle2": "eagle2-smollm2-135m"}


def shipped_draft(arch: str) -> Path:
    """The draft shipped with turbolm for the default model (trained by the recipe in docs/speculative.md)."""
    path = SHIPPED / SHIPPED_DRAFTS[arch]
    if not (path / "model.safetensors").is_file():
        raise ParameterError(f"no shipped {arch} draft at {path}; train one (`turbolm draft train`) and pass {{}} DIR", "draft")
    return path


def load_draft(directory: str | os.PathLike, target=None, device=None, dtype=None, overrides: dict | None = None) -> DraftModel:
    """Load a draft checkpoint; with ``target``, refuse one trained for a different target.
    ``overrides`` changes inference-only settings (``candidate_mode``). A missing, damaged or
    hand-broken checkpoint is a :class:`DataError` naming the file and the problem."""
    from dataclasses import replace

    d = Path(directory)
    if not (d / "config.json").is_file() or not (d / "model.safetensors").is_file():
        raise DataError(f"{directory} is not a draft checkpoint (needs config.json and model.safetensors, "
                        "as `turbolm draft train` writes them)")
    try:
        fields = json.loads((d / "config.json").read_text(encoding="utf-8"))
        if not isinstance(fields, dict):
            raise ValueError(f"expected a JSON object, got {type(fields).__name__}")
        config = DraftConfig(**fields)
    except (OSError, TypeError, ValueError, TurboLMError) as e:
        raise DataError(f"{d / 'config.json'} is not a valid draft config: {str(e).splitlines()[0]}") from None
    mode = (overrides or {}).get("candidate_mode")
    if mode and config.arch == "eagle2" and mode != "mixture":
        where = literal(directory)
        raise ParameterError(f"{{}} {mode} needs a Jakiro draft; {where} holds an EAGLE-2 draft", "candidate_mode")
    if overrides:
        config = replace(config, **overrides)
    if target is not None:
        diff = identity_mismatch(config.target, target)
        if diff:
            raise TurboLMError(f"the draft in {directory} was trained for a different target ({diff})")
    model = DraftModel(config)
    load_weights(model, d / "model.safetensors", remedy="train the draft again or restore the file",
                 convert=lambda v: v.float() if v.is_floating_point() else v)
    vocab = model.draft_vocab
    limit = (config.target or {}).get("vocab_size") or (target.config.vocab_size if target is not None else None)
    if vocab.numel() and (int(vocab.min()) < 0 or (limit and int(vocab.max()) >= limit)):
        raise DataError(f"{d / 'model.safetensors'} is damaged: its draft vocabulary holds ids outside the target's "
                        f"vocabulary (0..{limit - 1 if limit else '?'})")
    if dtype is None and target is not None:
        dtype = target.dtype
    return model.to(device=device or (target.device if target is not None else "cpu"), dtype=dtype).eval()
