"""Pruner checkpoints: ``config.json`` (schedule, factor definitions, threshold, the target's
identity, how it was made) + ``router.safetensors`` (learned router only). Loading one onto a
model other than the one it was made for is a clear error."""

from __future__ import annotations

import os
from pathlib import Path

from ..core.errors import TurboLMError
from ..core.io import atomic_write, write_json
from ..core.models import identity_mismatch, model_identity
from .factors import FACTOR_NAMES
from .router import ROUTER_KINDS, HiddenStateRouter, LearnedRouter, make_router
from .skipping import TokenPruner

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


def read_pruner_config(path: str | os.PathLike) -> dict:
    import json

    path = Path(path)
    cfg_path = path / "config.json" if path.is_dir() else path
    if not cfg_path.is_file():
        raise TurboLMError(f"no pruner checkpoint at {path} (expected a directory with config.json)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise TurboLMError(f"cannot read {cfg_path}: {e}") from None
    if cfg.get("format") != FORMAT:
        raise TurboLMError(f"{cfg_path} is not a turbolm pruner checkpoint (format {cfg.get('format')!r})")
    return cfg


def load_pruner(path: str | os.PathLike, model, *, router: str | None = None, seed: int = 0,
                dense_kv: bool | None = None) -> TokenPruner:
    """A TokenPruner (not attached) for ``model`` from a checkpoint directory.

    ``router`` overrides the stored router kind (e.g. ``static`` with a learned pruner's schedule).
    """
    from safetensors.torch import load_file

    path = Path(path)
    cfg = read_pruner_config(path)
    why = identity_mismatch(cfg.get("target", {}), model)
    if why:
        raise TurboLMError(f"the pruner {path} was made for another model ({why})")
    kind = router or cfg["router"]
    if kind not in ROUTER_KINDS:
        raise TurboLMError(f"unknown router {kind!r} in {path}")
    if kind in TRAINED:
        if cfg["router"] != kind:
            raise TurboLMError(f"{path} holds a {cfg['router']} router, not a {kind} one")
        if kind == "mod":
            r = HiddenStateRouter(model.config.hidden_size, len(cfg["schedule"]), threshold=cfg["threshold"])
        else:
            r = LearnedRouter(hidden=cfg.get("router_hidden", 64), threshold=cfg["threshold"],
                              inputs=tuple(cfg.get("router_inputs", FACTOR_NAMES)))
        try:
            r.load_state_dict(load_file(str(path / "router.safetensors")), strict=True)
        except (OSError, RuntimeError) as e:
            raise TurboLMError(f"cannot load {path / 'router.safetensors'}: {e}") from None
        r.to(model.device).eval()
    else:
        r = make_router(kind, seed=seed)
    return TokenPruner(model, r, cfg["schedule"], dense_kv=cfg["dense_kv"] if dense_kv is None else dense_kv,
                       attention_queries=cfg.get("attention_queries", 8))
