"""Router training with the LLM frozen (FTP's three losses).

- distillation: KL(dense || pruned) of the next-token distributions, per token, on the last
  ``score_last`` positions of each chunk (the predictions pruning serves; see .calibration);
- sparsity: one-sided, sum over blocks of max(s_target - s_soft, 0), where s_soft = 1 - the
  mean sigmoid gate of the block (zero when the router prunes more than asked);
- guide: binary cross-entropy of the router's gates toward the static router's keep decisions,
  weight decaying linearly from ``guide_weight`` to 0 over ``guide_steps``.

The router starts from the static router's ranking (``init="static"``) and the held-out KL is
measured every ``eval_every`` steps; the best router so far is what training returns. The top-k
choice is relaxed by straight-through gates: the forward pass uses the hard keep
decisions (exactly the tokens inference would compute), the backward pass the sigmoid's
gradient (see ``TokenPruner`` training mode). Checkpoints are atomic and resumable.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..core.errors import ParameterError, TurboLMError, literal
from ..core.interrupts import Interrupted, stop_at_safe_point
from ..core.io import atomic_write, load_training_state, load_weights, save_training_state, settings_differences
from .calibration import default_score_last
from .factors import FACTOR_NAMES
from .router import LearnedRouter
from .skipping import TokenPruner


@dataclass
class RouterTrainConfig:
    steps: int = 200
    batch_size: int = 4
    lr: float = 1e-3
    init: str = "static"  # "static": start at the static router (LearnedRouter.init_static); "static-saturated": the first such start; "random"
    sparsity_weight: float = 10.0
    guide_weight: float = 1.0
    guide_steps: int = 100
    hidden: int = 64
    threshold: float = 0.5
    inputs: list[str] = field(default_factory=lambda: list(FACTOR_NAMES))
    block_inputs: bool = False  # the router also knows the block (LearnedRouter(blocks=...)); beyond the paper
    knots: int = 16  # with block_inputs: points of each block's position offset
    block_lr_scale: float = 30.0  # with block_inputs: the per-block parameters' learning rate, in units of lr
    dense_kv: bool = False
    score_last: int | None = None  # distil the last N positions of each chunk (default: its last quarter)
    save_every: int = 20
    eval_every: int = 25
    seed: int = 0


def distillation_loss(dense_logits: torch.Tensor, pruned_logits: torch.Tensor) -> torch.Tensor:
    """Mean KL(dense || pruned) per token (dense is the teacher, no gradient)."""
    ref = F.log_softmax(dense_logits.float(), dim=-1)
    lp = F.log_softmax(pruned_logits.float(), dim=-1)
    return (ref.exp() * (ref - lp)).sum(-1).mean()


def sparsity_loss(soft_gates: list[torch.Tensor], targets: list[float]) -> torch.Tensor:
    """sum_l max(s_target_l - (1 - mean gate_l), 0): penalises keeping more than the schedule allows."""
    terms = [torch.relu(torch.as_tensor(t, dtype=g.dtype) - (1 - g.float().mean())) for g, t in zip(soft_gates, targets)]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def guide_loss(logits: list[torch.Tensor], static_keep: list[torch.Tensor]) -> torch.Tensor:
    terms = [F.binary_cross_entropy_with_logits(lg.float(), k.float()) for lg, k in zip(logits, static_keep)]
    return torch.stack(terms).mean() if terms else torch.zeros(())


def guide_weight(step: int, cfg: RouterTrainConfig) -> float:
    return cfg.guide_weight * max(0.0, 1.0 - step / max(1, cfg.guide_steps))


def static_keep(positions: torch.Tensor, n_keep: int) -> torch.Tensor:
    """The static router's keep mask for a (B, T) chunk: the first token and the most recent ones."""
    B, T = positions.shape
    keep = torch.zeros(B, T, dtype=torch.bool, device=positions.device)
    keep[:, T - (n_keep - 1):] = True
    keep[positions == 0] = True
    return keep


def _order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def _batch(chunks: torch.Tensor, step: int, cfg: RouterTrainConfig) -> torch.Tensor:
    n = len(chunks)
    per_epoch = max(1, n // cfg.batch_size)
    epoch, k = divmod(step, per_epoch)
    order = _order(n, cfg.seed, epoch)
    return chunks[order[k * cfg.batch_size:(k + 1) * cfg.batch_size]]


_RESUME_MAY_CHANGE = {"save_every", "eval_every"}


def check_out(out: str | Path, resume: bool) -> None:
    """A training run in ``out`` is continued (``resume``) or refused, never started over."""
    state_dir = Path(out) / "train"
    if not resume and (state_dir / "latest.json").exists():
        raise ParameterError(f"{state_dir} already holds a training run: pass {{}} to continue it, "
                             "or choose another {}", "resume", "out")


def _settings(config: dict) -> dict:
    """The settings a resumed router training must share with the original."""
    return {k: v for k, v in config.items() if k not in _RESUME_MAY_CHANGE}


def train_router(model, train_chunks: torch.Tensor, schedule: list[float], out: str | Path,
                 cfg: RouterTrainConfig, *, reference=None, resume: bool = False, progress: bool = True,
                 log=print, stop_at: int | None = None, router: torch.nn.Module | None = None
                 ) -> tuple[torch.nn.Module, dict]:
    """Train a router (default: a new LearnedRouter; or e.g. a HiddenStateRouter) for ``schedule``
    on ``train_chunks`` (N, T); state under ``out/train``.

    ``reference``: a :class:`.calibration.DenseReference` for the periodic held-out KL.
    ``stop_at``: stop (and checkpoint) after this step, as an interruption would; resume later.
    Returns the router and a summary (final losses, held-out KL, seconds).
    """
    from tqdm.auto import tqdm

    out = Path(out)
    state_dir = out / "train"
    check_out(out, resume)
    state_dir.mkdir(parents=True, exist_ok=True)
    if len(train_chunks) < cfg.batch_size:
        raise TurboLMError(f"{len(train_chunks)} training chunks is fewer than the batch size {cfg.batch_size}")
    device = model.device
    torch.manual_seed(cfg.seed)
    if router is None:
        router = LearnedRouter(hidden=cfg.hidden, threshold=cfg.threshold, inputs=tuple(cfg.inputs),
                               blocks=len(schedule) if cfg.block_inputs else 0, knots=cfg.knots)
        if cfg.init in ("static", "static-saturated"):
            router.init_static(saturated=cfg.init == "static-saturated")
    router = router.to(device)
    per_block = {id(p) for p in getattr(router, "block_parameters", list)()}
    groups = [{"params": [p for p in router.parameters() if id(p) not in per_block], "scale": 1.0}]
    if per_block:
        groups.append({"params": [p for p in router.parameters() if id(p) in per_block], "scale": cfg.block_lr_scale})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.0)
    state = {"step": 0, "seconds": 0.0, "config": asdict(cfg), "best_kl": None, "best_step": None}
    if resume and (state_dir / "latest.json").exists():
        state = load_training_state(state_dir, router, optimizer, weights="router.safetensors")
        changed = settings_differences(_settings(state.get("config", {})), _settings(asdict(cfg)))
        changed = literal(changed)
        if changed:
            raise ParameterError(f"{state_dir} was trained with other settings ({changed}); resume it with the same "
                                 "flags, or choose another {}", "out")
        log(f"resuming router training at step {state['step']}")
    model.requires_grad_(False)
    pruner = TokenPruner(model, router, schedule, dense_kv=cfg.dense_kv, train_records=True)
    lr_at = lambda s: cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, cfg.steps))))  # noqa: E731
    bar = tqdm(total=cfg.steps, initial=state["step"], disable=not progress, desc="router", unit="step")
    last: dict = {}
    best_path = state_dir / "best.safetensors"

    def held_out(step: int) -> float:
        """Held-out KL with the inference path; the best router so far is kept (model selection)."""
        from safetensors.torch import save_file

        router.eval()
        pruner.schedule = list(schedule)
        kl = reference.kl(pruner)
        if state.get("best_kl") is None or kl < state["best_kl"]:
            state["best_kl"], state["best_step"] = kl, step
            weights = {k: v.detach().float().contiguous().cpu() for k, v in router.state_dict().items()}
            atomic_write(best_path, lambda p: save_file(weights, str(p)))
        return kl

    saved = state["step"]

    def save():
        nonlocal saved
        if state["step"] != saved:
            save_training_state(state_dir, router, optimizer, state, weights="router.safetensors")
            saved = state["step"]

    # Ctrl-C / SIGTERM: the step in progress finishes, the state is saved, Interrupted is raised.
    with stop_at_safe_point() as stop:
        with pruner:
            if reference is not None and state["step"] == 0:
                log(f"held-out KL of the initial router: {held_out(0):.5f}")
            while state["step"] < min(cfg.steps, cfg.steps if stop_at is None else stop_at) and not stop.requested:
                step = state["step"]
                t0 = time.perf_counter()
                ids = _batch(train_chunks, step, cfg).to(device)
                tail = cfg.score_last or default_score_last(ids.shape[1])
                with torch.no_grad(), pruner.disabled():
                    dense = model(input_ids=ids, use_cache=False, logits_to_keep=tail).logits
                pruner.training_mode = True
                pruner.records.clear()
                router.train()
                pruned = model(input_ids=ids, use_cache=False, logits_to_keep=tail).logits
                pruner.training_mode = False
                recs = [r for r in pruner.records if schedule[r["block"]] > 0]
                positions = torch.arange(ids.shape[1], device=device).expand_as(ids)
                l_distill = distillation_loss(dense, pruned)
                l_sparse = sparsity_loss([r["soft"] for r in recs], [schedule[r["block"]] for r in recs])
                l_guide = guide_loss([r["logits"] for r in recs],
                                     [static_keep(positions, int(r["keep"][0].sum())) for r in recs])
                w = guide_weight(step, cfg)
                loss = l_distill + cfg.sparsity_weight * l_sparse + w * l_guide
                for g in optimizer.param_groups:
                    g["lr"] = lr_at(step) * g["scale"]
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                pruner.records.clear()
                soft_sparsity = (sum(1 - float(r["soft"].detach().float().mean()) for r in recs) / len(recs)) if recs else 0.0
                state["step"] = step + 1
                state["seconds"] += time.perf_counter() - t0
                last = {"step": step + 1, "loss": float(loss.detach()), "distill": float(l_distill.detach()),
                        "sparsity": float(l_sparse.detach()), "guide": float(l_guide.detach()), "guide_weight": w, "soft_sparsity": round(soft_sparsity, 4),
                        "lr": lr_at(step), "seconds": round(state["seconds"], 1)}
                if reference is not None and (state["step"] % cfg.eval_every == 0 or state["step"] == cfg.steps):
                    last["heldout_kl"] = round(held_out(state["step"]), 5)
                with open(state_dir / "train_log.jsonl", "a") as f:
                    f.write(json.dumps(last) + "\n")
                if state["step"] % cfg.save_every == 0 or state["step"] in (cfg.steps, stop_at):
                    save()
                bar.set_postfix(kl=f"{last['distill']:.4f}", s=f"{soft_sparsity:.2f}")
                bar.update(1)
        if stop.requested:
            bar.close()
            save()
            if not (state_dir / "latest.json").is_file():
                raise KeyboardInterrupt  # before the first step: nothing to save
            raise Interrupted(f"interrupted at router training step {state['step']}; the training state is saved "
                              f"in {state_dir}: continue with --resume")
    bar.close()
    if best_path.is_file():
        load_weights(router, best_path, "train again, or resume from the last state with --resume")
    router.eval()
    return router, {**last, "steps": state["step"], "train_seconds": round(state["seconds"], 1),
                    "best_heldout_kl": None if state.get("best_kl") is None else round(state["best_kl"], 5),
                    "best_step": state.get("best_step")}


def train_pruner(model, chunks, reference, out: str | Path, schedule: list[float], cfg: RouterTrainConfig, *,
                 target_sparsity: float, router_kind: str = "learned", search_config=None,
                 finetune_generations: int = 5, resume: bool = False, provenance: dict | None = None) -> dict:
    """FTP's whole training step: the router (LLM frozen) for ``schedule``, then ``finetune_generations``
    of the schedule search with the trained router, then a pruner checkpoint in ``out``.

    ``chunks``: the packed training text (``data.pack_rows``); ``reference``: the dense model on
    the held-out chunks (:class:`.calibration.DenseReference`); ``router_kind``: learned (FTP's
    router on the four factors) or mod (the Mixture-of-Depths-style ablation); ``provenance`` is
    stored in the checkpoint as it is. Returns what the checkpoint's config records (``heldout_kl``:
    the static router on ``schedule``, the trained router before and after the fine-tuning)."""
    from dataclasses import replace

    from .checkpoint import pruner_config, save_pruner
    from .genetic import SearchConfig
    from .router import HiddenStateRouter, StaticRouter
    from .search import run_search

    out = Path(out)
    with TokenPruner(model, StaticRouter(), schedule, dense_kv=cfg.dense_kv) as static:
        static_kl = reference.kl(static)
    initial = None
    if router_kind == "mod":
        initial = HiddenStateRouter(model.config.hidden_size, len(schedule), threshold=cfg.threshold)
    router, summary = train_router(model, chunks.train, schedule, out, cfg, reference=reference, resume=resume,
                                   router=initial)
    final, finetune = schedule, None
    if finetune_generations > 0:
        search_cfg = replace(search_config or SearchConfig(), generations=finetune_generations, seed=cfg.seed + 1)
        result = run_search(model, router, reference, target_sparsity, out / "finetune.json", search_cfg,
                            initial=[schedule], resume=resume, dense_kv=cfg.dense_kv)
        final = result.best
        finetune = {"generations": finetune_generations, "kl_before": -result.history[0]["best"]
                    if result.history else None, "kl_after": -result.best_fitness}
    with TokenPruner(model, router, final, dense_kv=cfg.dense_kv) as learned:
        final_kl = reference.kl(learned)
    provenance = dict(provenance or {})
    info = {"training": {**summary, "config": cfg.__dict__, **provenance.pop("training", {}),
                         "train_chunks": len(chunks.train)},
            "heldout_kl": {"static_router_searched_schedule": round(static_kl, 5),
                           "learned_router_before_finetune": summary.get("best_heldout_kl"), "final": round(final_kl, 5)},
            **provenance, "finetune": finetune,
            "calibration": {"chunks": len(reference.chunks), "seq_len": reference.chunks.shape[1],
                            "score_last": reference.score_last}}
    save_pruner(out, pruner_config(model, router, final, target_sparsity=target_sparsity, dense_kv=cfg.dense_kv, **info),
                router)
    return info
