"""Pruner checkpoints: ``config.json`` (schedule, factor definitions, threshold, the target's
identity, how it was made) + ``router.safetensors`` (learned router only). Loading one onto a
model other than the one it was made for, or a damaged or hand-broken one, is a clear error."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ..core.errors import DataError, TurboLMError
from ..core.io import atomic_write, load_weights, write_json
from ..core.models import identity_mismatch, model_identity
from .factors import FACTOR_NAMES
from .router import ROUTER_KINDS, HiddenStateRouter, LearnedRouter, make_router
from .skipping import TokenPruner, decoder_layers

FORMAT = "turbolm-ftp-pruner"
VERSION = 1
FACTOR_DEFINITIONS = {
    "position": "i / (N - 1) for token i of a sequence of N tokens so far",
    "attention": "log(1 + n * a_i), a_i = attention probability token i receives, mean over heads and the "
                 "last m computed queries of the most recent block that had i as a key (n keys)",
    "rank": "fraction of the sequence's tokens with a lower attention factor (ties by position)",
    "sparsity": "the block's target sparsity from the schedule",
}
SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints"
TRAINED = ("learned", "mod")  # routers with weights in router.safetensors


def shipped_pruner(sparsity: float) -> Path:
    return SHIPPED / f"ftp-smollm2-135m-s{round(sparsity * 100):02d}"


def pruner_config(model, router, schedule, *, target_sparsity: float, threshold: float = 0.5,
                  dense_kv: bool = False, attention_queries: int = 8, **info) -> dict:
    kind = getattr(router, "kind", "learned")
    cfg = {
        "format": FORMAT, "version": VERSION, "router": kind,
        "target_sparsity": float(target_sparsity),
        "achieved_schedule_mean": round(sum(schedule) / len(schedule), 6),
        "schedule": [round(float(s), 6) for s in schedule],
        "threshold": float(threshold), "dense_kv": bool(dense_kv), "attention_queries": int(attention_queries),
        "factors": FACTOR_DEFINITIONS,
        "target": model_identity(model),
    }
    if isinstance(router, LearnedRouter):
        cfg["router_hidden"] = router.net[0].out_features
        cfg["router_inputs"] = list(router.inputs)
        if router.blocks:
            cfg["router_blocks"] = router.blocks
            cfg["router_knots"] = router.position_offset.shape[1]
    if kind == "mod":
        cfg["factors"] = {"hidden_state": "the token's hidden state at the block input (Mixture-of-Depths-style)"}
    cfg.update(info)
    return cfg


def save_pruner(out: str | os.PathLike, config: dict, router=None) -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if config["router"] in TRAINED:
        state = {k: v.detach().float().contiguous().cpu() for k, v in router.state_dict().items()}
        atomic_write(out / "router.safetensors", lambda p: save_file(state, str(p)))
    write_json(out / "config.json", config)
    return out


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


#: What each field of a pruner's config.json must hold: (check, description); optional fields may be absent.
_FIELDS = {
    "router": (lambda v: v in ROUTER_KINDS, f"one of {', '.join(ROUTER_KINDS)}"),
    "schedule": (lambda v: isinstance(v, list) and v and all(_is_number(s) and 0 <= s < 1 for s in v),
                 "a non-empty list of block sparsities in [0, 1)"),
    "threshold": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "dense_kv": (lambda v: isinstance(v, bool), "true or false"),
    "target": (lambda v: isinstance(v, dict), "an object (the identity of the model it was made for)"),
}
_OPTIONAL = {
    "attention_queries": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
    "router_hidden": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
    "router_blocks": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
    "router_knots": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 2, "an integer >= 2"),
    "router_inputs": (lambda v: isinstance(v, list) and v and len(set(v)) == len(v) and set(v) <= set(FACTOR_NAMES),
                      f"a non-empty list of distinct factor names ({', '.join(FACTOR_NAMES)})"),
}


def read_pruner_config(path: str | os.PathLike) -> dict:
    """The checked ``config.json`` of a pruner checkpoint (``path``: the directory or the file);
    anything missing or malformed is a :class:`DataError` naming the file and the field."""
    path = Path(path)
    cfg_path = path / "config.json" if path.is_dir() else path
    if not cfg_path.is_file():
        raise DataError(f"no pruner checkpoint at {path} (expected a directory with config.json, as "
                        "`turbolm prune train` or `turbolm prune search` writes it)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {cfg_path}: {str(e).splitlines()[0]}") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        found = cfg.get("format") if isinstance(cfg, dict) else type(cfg).__name__
        raise DataError(f"{cfg_path} is not a turbolm pruner checkpoint (format {found!r}, expected {FORMAT!r})")
    for name, (ok, want) in [*_FIELDS.items(), *((k, c) for k, c in _OPTIONAL.items() if k in cfg)]:
        if name not in cfg:
            raise DataError(f"{cfg_path} lacks '{name}' ({want}); make the checkpoint again")
        if not ok(cfg[name]):
            raise DataError(f"{cfg_path}: '{name}' must be {want}, got {_short(cfg[name])}; make the checkpoint again")
    return cfg


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def load_pruner(path: str | os.PathLike, model, *, router: str | None = None, seed: int = 0,
                dense_kv: bool | None = None, prefill_only: bool = False) -> TokenPruner:
    """A TokenPruner (not attached) for ``model`` from a checkpoint directory.

    ``router`` overrides the stored router kind (e.g. ``static`` with a learned pruner's schedule);
    ``dense_kv`` the stored K/V semantics; ``prefill_only``: see :class:`TokenPruner`.
    """
    path = Path(path)
    cfg = read_pruner_config(path)
    why = identity_mismatch(cfg["target"], model)
    if why:
        raise TurboLMError(f"the pruner {path} was made for another model ({why})")
    layers = len(decoder_layers(model))
    if len(cfg["schedule"]) != layers:
        raise DataError(f"{path / 'config.json'}: the schedule has {len(cfg['schedule'])} blocks but the model has "
                        f"{layers} layers; make the checkpoint again")
    kind = router or cfg["router"]
    if kind not in ROUTER_KINDS:
        raise TurboLMError(f"unknown router {kind!r} in {path}")
    if kind in TRAINED:
        if cfg["router"] != kind:
            raise TurboLMError(f"{path} holds a {cfg['router']} router, not a {kind} one")
        if kind == "mod":
            r = HiddenStateRouter(model.config.hidden_size, len(cfg["schedule"]), threshold=cfg["threshold"])
        else:
            blocks = cfg.get("router_blocks", 0)
            if blocks and blocks != layers:
                raise DataError(f"{path / 'config.json'}: the router scores {blocks} blocks but the model has "
                                f"{layers} layers; make the checkpoint again")
            r = LearnedRouter(hidden=cfg.get("router_hidden", 64), threshold=cfg["threshold"],
                              inputs=tuple(cfg.get("router_inputs", FACTOR_NAMES)), blocks=blocks,
                              knots=cfg.get("router_knots", 16))
        load_weights(r, path / "router.safetensors", remedy="make the checkpoint again or restore the file")
        r.to(model.device).eval()
    else:
        r = make_router(kind, seed=seed)
    return TokenPruner(model, r, cfg["schedule"], dense_kv=cfg["dense_kv"] if dense_kv is None else dense_kv,
                       prefill_only=prefill_only, attention_queries=cfg.get("attention_queries", 8))
