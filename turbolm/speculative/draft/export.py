"""``turbolm draft export``: an EAGLE-2 draft in the layout vLLM and SGLang load as an EAGLE draft.

Both engines read an EAGLE-1/2 draft as a one-layer Llama (vLLM: ``speculative_config={"method":
"eagle", "model": DIR}``; SGLang: ``--speculative-algorithm EAGLE --speculative-draft-model-path
DIR``): a ``LlamaConfig`` with ``num_hidden_layers: 1`` and the target's sizes, and weights
``fc.weight`` [H, 2H] (+ ``fc.bias``), ``layers.0.self_attn.{q,k,v,o}_proj.weight``,
``layers.0.post_attention_layernorm.weight`` and ``layers.0.mlp.{gate,up,down}_proj.weight`` - no
input layernorm on layer 0 (the fc output goes straight into attention), no final norm, no
lm_head and no embedding (the target's are used). The input is ``fc(concat(embed(token),
target feature))``, the feature being the target's final-norm hidden state: exactly our EAGLE-2
draft, so the export is a renaming.

vLLM builds ``fc`` without a bias and drops ``fc.bias``; SGLang keeps it. A draft trained with
a bias (the shipped ones) therefore runs slightly differently under vLLM - :func:`check_export`
measures how much (top-1 agreement of the draft's next-token prediction with and without the
bias); ``turbolm draft train --no-fc-bias`` trains a draft that both run exactly.

A Jakiro draft (a Mixture-of-Experts FFN and a contrastive branch) has no equivalent in those
formats and is refused. The reduced draft vocabulary (``--draft-vocab-size``) is ours only: the
engines score the predicted feature with the target's full lm_head.

:func:`check_export` validates a written directory against an independent implementation of the
format: transformers' own ``LlamaDecoderLayer`` (input layernorm replaced by the identity, as
both engines do) built from the exported ``config.json`` and weights, compared with our draft on
the same inputs through the target's lm_head.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...core.errors import DataError, ParameterError, literal
from ...core.io import atomic_write, load_safetensors
from .model import DraftModel

#: our parameter name -> the EAGLE layout's
RENAME = {
    "fc.weight": "fc.weight",
    "fc.bias": "fc.bias",
    "q_proj.weight": "layers.0.self_attn.q_proj.weight",
    "k_proj.weight": "layers.0.self_attn.k_proj.weight",
    "v_proj.weight": "layers.0.self_attn.v_proj.weight",
    "o_proj.weight": "layers.0.self_attn.o_proj.weight",
    "post_attention_norm.weight": "layers.0.post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "layers.0.mlp.gate_proj.weight",
    "mlp.up_proj.weight": "layers.0.mlp.up_proj.weight",
    "mlp.down_proj.weight": "layers.0.mlp.down_proj.weight",
}
_TARGET_FIELDS = ("vocab_size", "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
                  "tie_word_embeddings", "hidden_act")


def eagle_config(draft: DraftModel, target) -> dict:
    """The one-layer ``LlamaConfig`` (as a dict) both engines read for ``draft`` on ``target``."""
    c, t = draft.config, target.config
    out = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_hidden_layers": 1,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
        "bias": draft.fc.bias is not None,  # SGLang's / EAGLE's name for the fc bias
    }
    for name in _TARGET_FIELDS:
        value = getattr(t, name, None)
        if value is not None:
            out[name] = value
    out.setdefault("hidden_act", "silu")
    return out


def export_eagle(draft: DraftModel, target, out: str | Path, overwrite: bool = False,
                 dtype: torch.dtype | None = None) -> Path:
    """Write ``draft`` (EAGLE-2) to ``out`` as ``config.json`` + ``model.safetensors`` in the EAGLE
    layout (atomically; an existing non-empty ``out`` is refused unless ``overwrite``)."""
    from safetensors.torch import save_file

    if draft.config.arch != "eagle2":
        raise ParameterError("{} is a Jakiro draft (a Mixture-of-Experts FFN and a contrastive branch), which has no "
                             "equivalent in vLLM's or SGLang's EAGLE format; export an EAGLE-2 draft", "draft")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ParameterError(f"{{}} {literal(out)} is a file, not a directory", "out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ParameterError(f"{{}} {literal(out)} is not empty; choose a new directory or overwrite it", "out")
    state = draft.state_dict()
    unknown = sorted(set(state) - set(RENAME) - {"draft_vocab"})
    if unknown:  # a new parameter the layout does not know: better refuse than drop it
        raise DataError(f"the draft holds parameters the EAGLE layout has no place for: {', '.join(unknown)}")
    tensors = {}
    for ours, theirs in RENAME.items():
        if ours in state:
            t = state[ours].detach().contiguous().cpu()
            tensors[theirs] = t.to(dtype) if dtype is not None else t.float()
    out.mkdir(parents=True, exist_ok=True)
    config = eagle_config(draft, target)
    if dtype is not None:
        config["torch_dtype"] = str(dtype).replace("torch.", "")
    atomic_write(out / "model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    atomic_write(out / "config.json", lambda p: Path(p).write_text(json.dumps(config, indent=1) + "\n"))
    return out


class EagleReference(torch.nn.Module):
    """The EAGLE layout run by transformers' own Llama layer: ``fc`` then ``LlamaDecoderLayer``
    with the input layernorm replaced by the identity; returns the predicted feature."""

    def __init__(self, directory: str | Path):
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        super().__init__()
        d = Path(directory)
        fields = json.loads((d / "config.json").read_text(encoding="utf-8"))
        fields.pop("architectures", None)
        fields.pop("bias", None)
        fields.pop("torch_dtype", None)
        self.config = LlamaConfig(**fields)
        self.config._attn_implementation = "eager"
        weights = load_safetensors(d / "model.safetensors")
        H = self.config.hidden_size
        self.fc = torch.nn.Linear(2 * H, H, bias="fc.bias" in weights)
        self.layer = LlamaDecoderLayer(self.config, layer_idx=0)
        self.layer.input_layernorm = torch.nn.Identity()
        self.rotary = LlamaRotaryEmbedding(self.config)
        state = {k.removeprefix("layers.0."): v for k, v in weights.items() if k.startswith("layers.0.")}
        self.layer.load_state_dict(state, strict=False)
        missing = [k for k in self.layer.state_dict() if k not in state]
        if missing:
            raise DataError(f"{d / 'model.safetensors'} lacks {', '.join(missing)}")
        self.fc.load_state_dict({k.removeprefix("fc."): v for k, v in weights.items() if k.startswith("fc.")})
        self.float().eval()

    def forward(self, token_embeds: torch.Tensor, features: torch.Tensor, use_bias: bool = True) -> torch.Tensor:
        B, T, _ = features.shape
        x = torch.cat([token_embeds, features], -1).float()
        x = torch.nn.functional.linear(x, self.fc.weight, self.fc.bias if use_bias else None)
        positions = torch.arange(T, device=x.device).unsqueeze(0).expand(B, T)
        mask = torch.full((T, T), torch.finfo(x.dtype).min, device=x.device).triu(1)[None, None]
        out = self.layer(x, attention_mask=mask, position_ids=positions,
                         position_embeddings=self.rotary(x, positions))
        return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def check_export(directory: str | Path, draft: DraftModel, target, input_ids: torch.Tensor) -> dict:
    """Run the exported draft through :class:`EagleReference` and our draft on the same inputs (the
    target's features of ``input_ids`` (1, T), their next tokens' embeddings) and compare.

    Returns ``max_feature_diff`` (largest absolute difference of the predicted features),
    ``top1_agreement`` (how often the two predictions' top-1 token under the target's lm_head agree)
    and, for a draft with an fc bias, ``top1_agreement_without_fc_bias`` (what vLLM, which drops
    the bias, would predict, against ours)."""
    from ...core.generation import FeatureCapture, forward, new_cache

    reference = EagleReference(directory)
    ids = input_ids[:, :1024]
    with FeatureCapture(target) as capture:
        forward(target, ids, new_cache(target))
    features = capture.features[0].float().unsqueeze(0)[:, :-1]  # f_j for j < T - 1
    embeds = target.get_input_embeddings()(ids[:, 1:]).float()  # embed(x_{j+1})
    positions = torch.arange(features.shape[1]).unsqueeze(0)
    was = next(draft.parameters()).dtype
    ours = draft.float()(embeds, features, positions).hidden
    draft.to(was)
    theirs = reference(embeds, features)
    head = target.get_output_embeddings().weight.float()
    top_ours = (ours @ head.T).argmax(-1)
    result = {
        "tokens": int(features.shape[1]),
        "max_feature_diff": float((ours - theirs).abs().max()),
        "top1_agreement": float((top_ours == (theirs @ head.T).argmax(-1)).float().mean()),
    }
    if reference.fc.bias is not None:
        without = reference(embeds, features, use_bias=False)
        result["top1_agreement_without_fc_bias"] = float((top_ours == (without @ head.T).argmax(-1)).float().mean())
        result["fc_bias_max_abs"] = float(reference.fc.bias.abs().max())
    return result
