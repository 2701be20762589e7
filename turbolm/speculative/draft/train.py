"""Training a draft on prepared target features, with accelerate.

Per sample (tokens x, target features f, answer mask m), draft entry j is (x_{j+1}, f_j) and
its output predicts f_{j+1} (and so the target's distribution of x_{j+2}); Jakiro's contrastive
output predicts f_{j+2}. Loss (the paper's, weights are flags):

    w_v * (SmoothL1(f_hat, f_{j+1}) + 0.5 * SmoothL1(h_con, f_{j+2}))
  + w_p * (CE(softmax(lm_head f_{j+1}), lm_head f_hat) + 0.5 * same for h_con)

counted where the predicted token is an answer token, with uniform noise on the input
features. With ``ttt_steps`` K > 1 (training-time test, EAGLE-3) the draft is also run on its
own predicted features for K steps, as inside a tree, and the same loss is counted at every
step (averaged over the steps), so agreement does not decay along the tree. The target's
embedding and lm_head are frozen and never saved with the draft.
Resume is exact: the training state (draft, AdamW moments, schedule, data position) is
saved atomically in safetensors + JSON, data order and noise derive from (seed, epoch, step).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ...core.attention import without_cudnn_attention
from ...core.errors import ParameterError, TurboLMError, literal
from ...core.interrupts import Interrupted, stop_at_safe_point
from ...core.io import load_training_state, save_training_state, settings_differences
from .model import ARCHS, CANDIDATE_MODES, PAIRINGS, DraftConfig, DraftModel, KVCache, init_from_target, load_draft


@dataclass
class TrainConfig:
    data: str | list[str]  # a prepared directory or token file; or several prepared directories, read as one
    out: str
    arch: str = "jakiro"
    candidate_mode: str = "mixture"
    num_experts: int = 2
    expert_size: int = 0  # Jakiro's expert intermediate size; 0: the hidden size (the paper)
    draft_vocab_size: int = 0  # 0 = the target's full vocabulary
    epochs: int = 2
    batch_size: int = 8
    lr: float = 9e-5
    weight_decay: float = 0.0  # the reference: 1e-3
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 0.5
    clip_mode: str = "norm"  # norm | value (the reference clips each gradient value to +-grad_clip)
    init: str = "random"  # random | target (the target's last decoder layer) | a draft checkpoint directory
    contrastive_pairing: str = "expert"  # expert (the reference) | ranked (the first shipped drafts)
    ttt_steps: int = 1  # training-time test: unroll the draft on its own features for this many steps
    fc_bias: bool = True  # False: no fc bias, so vLLM (which drops it) runs an exported EAGLE-2 draft exactly
    warmup_steps: int = 50
    w_v: float = 1.0
    w_p: float = 0.1
    noise: float = 0.2
    eval_samples: int = 32
    eval_depth: int = 5
    save_every: int = 200
    eval_every: int = 0  # 0: at the end of each epoch only
    seed: int = 0
    max_samples: int = 0  # 0: all; N: the first N samples (of a preparation that may still be running)
    max_steps: int = 0  # 0: run all epochs (a positive value stops early, for tests and resumable chunks)
    target: str | None = None  # target source; default: the one recorded by prepare
    target_dtype: str = "float32"  # the target's precision where it computes features (data = a token file)
    mixed_precision: str = "no"  # no | bf16 (autocast of the training steps)

    def __post_init__(self):
        if not isinstance(self.data, (str, os.PathLike)) and len(self.data) == 1:
            self.data = str(self.data[0])  # one source is recorded as before, so a run started either way resumes

def target_and_data(cfg: TrainConfig, device, progress: bool):
    """The target, the training samples and the frozen float32 target modules the draft needs
    (embedding, lm_head). ``cfg.data`` is a prepared directory (features read from disk, the
    target checked against the one they came from) or a token file (features computed now, in
    memory, by the target on ``device`` in ``cfg.target_dtype``)."""
    from ...core.models import identity_mismatch, load_target
    from .data import FeatureDatasets, TokenFeatures

    sources = data_sources(cfg.data)
    token_files = [d for d in sources if Path(d).is_file() and Path(d).suffix == ".safetensors"]
    if token_files and len(sources) > 1:
        raise ParameterError(f"{{}} takes one token file ({literal(token_files[0])}) or prepared directories, not "
                             f"{len(sources)} sources with token files among them; merge token files first "
                             f"(turbolm.speculative.draft.data.merge_tokens)", "data")
    if token_files:
        model, _ = load_target(cfg.target, dtype=cfg.target_dtype, device=device)
        dataset = TokenFeatures(token_files[0], model, samples=cfg.max_samples or None, progress=progress)
    else:
        dataset = FeatureDatasets(sources, partial=bool(cfg.max_samples))
        model, _ = load_target(cfg.target)
        for part in dataset.parts:
            diff = identity_mismatch(part.meta["target"], model)
            if diff:
                raise TurboLMError(f"the features in {part.directory} were prepared for a different target than "
                                   f"{cfg.target or 'the default'} ({diff})")
    embed, head = model.get_input_embeddings().float(), model.get_output_embeddings().float()
    for p in list(embed.parameters()) + list(head.parameters()):
        p.requires_grad_(False)
    return model, dataset, embed, head


def sample_split(cfg: TrainConfig, samples: int) -> tuple[list[int], list[int]]:
    """(training, held-out) sample indices of a ``samples``-sample dataset: the first ``max_samples``
    (all when 0), the last ``eval_samples`` of them held out."""
    n = min(samples, cfg.max_samples or samples)
    cut = max(0, n - cfg.eval_samples)
    return list(range(cut)), list(range(cut, n))


def data_sources(data: str | list[str] | tuple[str, ...]) -> list[str]:
    """``TrainConfig.data`` as a list: one source (a prepared directory or a token file) or several
    prepared directories, trained on as one dataset in the order given."""
    sources = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    if not sources:
        raise ParameterError("{} names no training data", "data")
    return [str(d) for d in sources]


def _named(data) -> str:
    sources = data_sources(data)
    named = sources[0] if len(sources) == 1 else f"the {len(sources)} directories of data ({', '.join(sources)})"
    return literal(named)  # placed in ParameterError templates


def draft_vocabulary(ds, size: int, samples: int | None = None) -> torch.Tensor:
    """The ``size`` most frequent answer tokens of a FeatureDataset's first ``samples`` samples
    (the training ones; default all), as target ids, ascending."""
    counts = None
    for ids, mask in ds.iter_tokens(samples):
        c = torch.bincount(ids[mask.bool()], minlength=ds.vocab_size)
        counts = c if counts is None else counts + c
    return torch.sort(torch.topk(counts, size).indices).values


def collate(samples: list[dict]) -> dict:
    """Right-pad to the longest sample; padded positions get mask 0 (causal attention keeps
    them from influencing real positions)."""
    L = max(s["input_ids"].shape[0] for s in samples)
    H = samples[0]["features"].shape[1]
    ids = torch.zeros(len(samples), L, dtype=torch.long)
    mask = torch.zeros(len(samples), L, dtype=torch.bool)
    feats = torch.zeros(len(samples), L, H, device=samples[0]["features"].device)  # where the features are kept
    for i, s in enumerate(samples):
        n = s["input_ids"].shape[0]
        ids[i, :n], mask[i, :n], feats[i, :n] = s["input_ids"], s["loss_mask"], s["features"]
    return {"input_ids": ids, "loss_mask": mask, "features": feats}


def unrolled(draft: DraftModel, embed, ids: torch.Tensor, features: torch.Tensor, steps: int):
    """The draft run as inside a tree, on its own predicted features, for ``steps`` steps:
    yields ``(k, DraftOutput)`` for k = 1 .. steps.

    ``ids`` (B, L) are the tokens, ``features`` (B, L-1, H) the target features fed at step 1
    (entry j = (x_{j+1}, f_j), output predicting f_{j+1}). Chain j branches off after entry j:
    its step-k entry is (x_{j+k}, f_hat_{j+k-1}) at position j+k-1 and attends to the true
    entries 0..j, its own earlier steps and itself; its output predicts f_{j+k}. Step k has
    L-k entries (chains whose tokens exist). Gradients flow through the chain."""
    B, L = ids.shape
    T, dev = L - 1, ids.device
    cache = KVCache() if steps > 1 else None
    out = draft(embed(ids[:, 1:]), features, torch.arange(T, device=dev).expand(B, -1), cache)
    yield 1, out
    blocks = []  # cache offsets of earlier chain steps
    for k in range(2, steps + 1):
        n = L - k
        if n <= 0:
            return
        S, j = len(cache), torch.arange(n, device=dev)
        allowed = torch.zeros(n, S + n, dtype=torch.bool, device=dev)
        allowed[:, :T] = torch.arange(T, device=dev)[None] <= j[:, None]
        for off in blocks:
            allowed[j, off + j] = True
        allowed[j, S + j] = True
        blocks.append(S)
        out = draft(embed(ids[:, k : k + n]), out.hidden[:, :n], (j + k - 1).expand(B, -1), cache, allowed[None, None])
        yield k, out


def draft_loss(draft: DraftModel, embed, lm_head_w, batch: dict, cfg: TrainConfig, generator=None) -> dict:
    """The training loss of one batch and its parts (plain floats except ``loss``): the
    step-1 parts as ``vloss``/``ploss``/``acc`` (and ``con_*``), with ``ttt_steps`` > 1 also
    ``acc_k`` for every later step k."""
    ids, m, f = batch["input_ids"], batch["loss_mask"], batch["features"]
    B, L, H = f.shape
    if L < 3:
        raise TurboLMError("training samples need at least 3 tokens")
    inp = f[:, :-1]
    if cfg.noise > 0:
        noise = (torch.rand(inp.shape, generator=generator, device=generator.device if generator else inp.device)
                 - 0.5) * cfg.noise * 512 / L
        inp = inp + noise.to(inp.device)
    if not m[:, 2:].any():
        raise TurboLMError("a training batch holds no answer token to learn from")
    # The target's distribution after f_i, computed once for every i whose next token x_{i+1}
    # is an answer token (the lm_head dominates the cost; every step and the contrastive
    # branch index these rows).
    need = torch.zeros(B, L, dtype=torch.bool, device=f.device)
    need[:, :-1] = m[:, 1:].bool()
    with torch.no_grad():
        t_logp = draft.logits(f[need], lm_head_w).float().log_softmax(-1)
    row = torch.full((B, L), -1, dtype=torch.long, device=f.device)
    row[need] = torch.arange(int(need.sum()), device=f.device)

    def predicted(pred, shift, n):
        """Loss parts of ``pred`` (B, >=n, H) whose entry j predicts f_{j+shift}, counted where
        x_{j+shift+1} is an answer token (j < n)."""
        sel = m[:, shift + 1 : shift + 1 + n].bool()
        if not sel.any():
            return None
        return _prediction_loss(draft, lm_head_w, pred[:, : sel.shape[1]][sel], f[:, shift : shift + sel.shape[1]][sel],
                                t_logp[row[:, shift : shift + sel.shape[1]][sel]])

    loss, parts = 0.0, {}
    for k, out in unrolled(draft, embed, ids, inp, max(1, cfg.ttt_steps)):
        n = out.hidden.shape[1]
        step = predicted(out.hidden, k, n)
        if step is None:
            break
        step_loss = cfg.w_v * step["vloss"] + cfg.w_p * step["ploss"]
        if out.expert_hidden is not None:  # decoupled: each selected expert's own feature predicts too
            for e in range(out.expert_hidden.shape[-2]):
                ex = predicted(out.expert_hidden[..., e, :], k, n)
                step_loss = step_loss + 0.5 * (cfg.w_v * ex["vloss"] + cfg.w_p * ex["ploss"])
        con = predicted(out.contrastive, k + 1, n) if out.contrastive is not None else None
        if con is not None:  # the contrastive output of entry j predicts f_{j+k+1}
            step_loss = step_loss + 0.5 * (cfg.w_v * con["vloss"] + cfg.w_p * con["ploss"])
        loss = loss + step_loss
        if k == 1:
            parts.update(step)
            if con is not None:
                parts.update(con_vloss=con["vloss"], con_ploss=con["ploss"], con_acc=con["acc"])
        else:
            parts[f"acc_{k}"] = step["acc"]
    parts["loss"] = loss / max(1, cfg.ttt_steps)
    return parts


def _prediction_loss(draft, lm_head_w, pred, target, t_logp) -> dict:
    """Feature regression, soft cross-entropy against the target's distribution, and top-1
    agreement, averaged over the selected positions (rows of ``pred``)."""
    n = max(1, pred.shape[0])
    v = F.smooth_l1_loss(pred.float(), target.float(), reduction="none").mean(-1)
    d_logp = draft.logits(pred, lm_head_w).float().log_softmax(-1)
    p = -(t_logp.exp() * d_logp).sum(-1)
    acc = (d_logp.argmax(-1) == t_logp.argmax(-1)).float()
    return {"vloss": v.sum() / n, "ploss": p.sum() / n, "acc": acc.sum() / n}


@torch.no_grad()
def chain_agreement(draft: DraftModel, embed, lm_head_w, sample: dict, depth: int) -> dict:
    """How often the draft's top-1 equals the target's greedy token k steps ahead (k = 1..depth)
    when it runs on its *own* predicted features, as inside a tree (tokens teacher-forced).

    Chain j branches off after true entry j: its step-k entry is (x_{j+k}, f_hat_{j+k-1}) at
    position j+k-1 and attends to true entries 0..j, its own earlier steps and itself. Step k
    predicts x_{j+k+1}; it counts where that is an answer token. ``contrastive[k]``: the same
    for the contrastive output of step k-1 (Jakiro's last tree level). Returns
    {"agree": {k: (hits, total)}, "contrastive": {k: (hits, total)}}.
    """
    dev = lm_head_w.device
    ids, m = sample["input_ids"].to(dev), sample["loss_mask"].to(dev).bool()
    f = sample["features"].to(dev, lm_head_w.dtype)
    L = ids.shape[0]
    t_top = draft.logits(f, lm_head_w).argmax(-1)  # the target's greedy token after each position
    result: dict = {"agree": {}, "contrastive": {}}

    def record(key, k, hidden):
        n = L - 1 - k
        if n > 0:
            pred = draft.logits(hidden[:n], lm_head_w).argmax(-1)
            w = m[k + 1 : k + 1 + n]
            hits, total = result[key].get(k, (0, 0))
            result[key][k] = (hits + int(((pred == t_top[k : k + n]) & w).sum()), total + int(w.sum()))

    for k, out in unrolled(draft, embed, ids[None], f[None, :-1], depth):
        record("agree", k, out.hidden[0])
        if out.contrastive is not None and k < depth:
            record("contrastive", k + 1, out.contrastive[0])
    return result


@torch.no_grad()
def expert_similarity(draft: DraftModel, embed, lm_head_w, sample: dict) -> dict | None:
    """How alike a Jakiro draft's first two experts are on one sample's answer positions (step 1,
    true features): sums of the cosine of their FFN outputs and of top-1 agreement of their own
    features ``x + E_e``, with the position count. None for a draft without experts."""
    if not draft.config.has_contrastive:
        return None
    dev = lm_head_w.device
    ids, m = sample["input_ids"].to(dev), sample["loss_mask"].to(dev).bool()
    f = sample["features"].to(dev, lm_head_w.dtype)
    L = ids.shape[0]
    out = draft(embed(ids[None, 1:]), f[None, :-1], torch.arange(L - 1, device=dev)[None])
    sel = m[2:]
    e0, e1 = out.experts[0, :-1, 0][sel], out.experts[0, :-1, 1][sel]
    x = out.residual[0, :-1][sel]
    cos = F.cosine_similarity(e0.float(), e1.float(), dim=-1)
    top0, top1 = draft.logits(x + e0, lm_head_w).argmax(-1), draft.logits(x + e1, lm_head_w).argmax(-1)
    return {"cosine": float(cos.sum()), "top1_agree": float((top0 == top1).sum()), "n": int(sel.sum())}


# --- the training loop ----------------------------------------------------------------------------


def _batches(lengths: list[int], indices: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """This epoch's batches: a seeded shuffle, similar lengths grouped (less padding), batch
    order shuffled again. Deterministic in (seed, epoch), so a resumed run sees the same data."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = [indices[i] for i in torch.randperm(len(indices), generator=g).tolist()]
    chunk = batch_size * 32
    batches = []
    for c in range(0, len(order), chunk):
        group = sorted(order[c : c + chunk], key=lambda i: lengths[i])
        batches += [group[b : b + batch_size] for b in range(0, len(group), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


_RESUME_MAY_CHANGE = {"max_steps", "save_every", "eval_every"}


def _settings(config: dict) -> dict:
    """The settings a resumed run must share with the original (JSON-normalised)."""
    return {k: v for k, v in json.loads(json.dumps(config)).items() if k not in _RESUME_MAY_CHANGE}


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _log(out: Path, row: dict) -> None:
    with open(out / "train_log.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def evaluate(draft, embed, head_w, dataset, indices, depth) -> dict:
    """Chain agreement rates over held-out samples: {"agree": {k: rate}, "contrastive": {k: rate}},
    and for a Jakiro draft "experts": the cosine of its two experts' outputs and how often their
    own top-1 tokens agree (experts that became alike cannot give diverse candidates)."""
    draft.eval()
    sums: dict = {"agree": {}, "contrastive": {}}
    alike = {"cosine": 0.0, "top1_agree": 0.0, "n": 0}
    for i in indices:
        sample = dataset[i]
        r = chain_agreement(draft, embed, head_w, sample, depth)
        for key in sums:
            for k, (h, t) in r[key].items():
                a, b = sums[key].get(k, (0, 0))
                sums[key][k] = (a + h, b + t)
        e = expert_similarity(draft, embed, head_w, sample)
        for key in alike if e else ():
            alike[key] += e[key]
    draft.train()
    result = {key: {str(k): (h / t if t else None) for k, (h, t) in sorted(v.items())} for key, v in sums.items()}
    if alike["n"]:
        result["experts"] = {"cosine": alike["cosine"] / alike["n"], "top1_agree": alike["top1_agree"] / alike["n"]}
    return result


def _check_config(cfg: TrainConfig) -> None:
    if cfg.init not in ("random", "target") and not (Path(cfg.init) / "config.json").is_file():
        raise ParameterError(f"{{}} must be random, target or a draft checkpoint directory, got {cfg.init!r}", "init")
    choices = {"clip_mode": ("norm", "value"), "contrastive_pairing": PAIRINGS, "mixed_precision": ("no", "bf16"),
               "target_dtype": ("float32", "bfloat16", "float16"),
               "arch": ARCHS, "candidate_mode": CANDIDATE_MODES}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ParameterError(f"{{}} must be one of {', '.join(allowed)}, got {getattr(cfg, name)!r}", name)
    for name in ("ttt_steps", "epochs", "batch_size"):
        if getattr(cfg, name) < 1:
            raise ParameterError(f"{{}} must be >= 1, got {getattr(cfg, name)}", name)
    if cfg.expert_size < 0:
        raise ParameterError(f"{{}} must be >= 0 (0: the hidden size), got {cfg.expert_size}", "expert_size")
    if cfg.expert_size and cfg.arch != "jakiro":
        raise ParameterError(f"{{}} is for {{}} jakiro (its experts), not {cfg.arch!r}", "expert_size", "arch")


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Train a draft on the features in ``cfg.data``; write the checkpoint to ``cfg.out``."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    out = Path(cfg.out)
    if resume and not (out / "latest.json").is_file():
        raise ParameterError(f"nothing to resume in {out} (no latest.json); start without {{}}", "resume")
    if not resume and (out / "latest.json").is_file():
        raise ParameterError(f"{out} already holds a training run; pass {{}} to continue it or choose another {{}}", "resume", "out")
    _check_config(cfg)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    target, dataset, embed, head = target_and_data(cfg, accelerator.device, progress)
    train_idx, eval_idx = sample_split(cfg, len(dataset))
    n = len(train_idx) + len(eval_idx)
    if cfg.max_samples and len(dataset) < cfg.max_samples:
        raise ParameterError(f"{_named(cfg.data)} has {len(dataset)} samples so far; {{}} is {cfg.max_samples}", "max_samples")
    if n <= cfg.eval_samples:
        raise ParameterError(f"{_named(cfg.data)} has {n} samples; need more than {{}} ({cfg.eval_samples})", "eval_samples")
    out.mkdir(parents=True, exist_ok=True)
    embed, head = embed.to(accelerator.device), head.to(accelerator.device)
    start = load_draft(cfg.init, target) if cfg.init not in ("random", "target") and not resume else None
    expert_size = cfg.expert_size or (start.config.expert_intermediate_size if start is not None else 0)
    dconf = DraftConfig.for_target(
        target, arch=cfg.arch, candidate_mode=cfg.candidate_mode, num_experts=cfg.num_experts,
        expert_intermediate_size=expert_size, draft_vocab_size=cfg.draft_vocab_size,
        contrastive_pairing=cfg.contrastive_pairing, fc_bias=cfg.fc_bias,
    )
    torch.manual_seed(cfg.seed)
    draft = DraftModel(dconf)
    if cfg.init == "target" and not resume:
        init_from_target(draft, target)
    elif start is not None:  # continue from a trained draft: its weights and vocabulary
        sc = start.config
        if (sc.arch, sc.num_experts, sc.draft_vocab_size) != (dconf.arch, dconf.num_experts, dconf.draft_vocab_size) or (
                sc.arch == "jakiro" and sc.expert_intermediate_size != dconf.expert_intermediate_size):
            raise ParameterError(f"the draft in {cfg.init} is a {sc.arch} with {sc.num_experts} experts of "
                                 f"{sc.expert_intermediate_size} and a {sc.draft_vocab_size}-token vocabulary; train "
                                 f"with the same {{}}, {{}}, {{}} and {{}}", "arch", "num_experts", "expert_size",
                                 "draft_vocab_size")
        state = start.state_dict()
        if not dconf.fc_bias:  # continuing without the bias: the draft starts a little off and adapts
            state.pop("fc.bias", None)
        elif "fc.bias" not in state:
            state["fc.bias"] = torch.zeros_like(draft.fc.bias)
        draft.load_state_dict(state)
    if cfg.draft_vocab_size and not resume and cfg.init in ("random", "target"):
        draft.draft_vocab.copy_(draft_vocabulary(dataset, cfg.draft_vocab_size, len(train_idx)))
    decay = [p for name, p in draft.named_parameters() if p.dim() >= 2]
    no_decay = [p for name, p in draft.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=tuple(cfg.betas),
    )
    lengths = dataset.lengths()
    per_epoch = math.ceil(len(train_idx) / cfg.batch_size)
    total = per_epoch * cfg.epochs
    state = {"step": 0, "epoch": 0, "batch": 0, "config": asdict(cfg), "seconds": 0.0}
    if resume:
        state = load_training_state(out, draft, optimizer, weights="draft.safetensors")
        changed = settings_differences(_settings(state["config"]), _settings(asdict(cfg)))
        if changed:
            raise TurboLMError(f"{out} was trained with other settings ({changed}); resume it with the same flags")
    draft, optimizer = accelerator.prepare(draft, optimizer)
    head_w = head.weight
    stop_at = state["step"] + cfg.max_steps if cfg.max_steps else total
    bar = tqdm(total=total, initial=state["step"], disable=not progress, desc=f"train {cfg.arch}", unit="step")
    draft.train()
    t_start, tokens = time.perf_counter() - state["seconds"], 0
    position = lambda: (state["step"], state["epoch"], state["batch"])  # noqa: E731
    saved = position()

    def save():
        """The training state after the last finished step, unless it is saved already."""
        nonlocal saved
        if position() != saved:
            state["seconds"] = time.perf_counter() - t_start
            save_training_state(out, accelerator.unwrap_model(draft), optimizer, state, weights="draft.safetensors")
            saved = position()

    # Ctrl-C / SIGTERM: the step in progress finishes, the state is saved, Interrupted is raised.
    with stop_at_safe_point() as stop, without_cudnn_attention():
        while state["epoch"] < cfg.epochs and state["step"] < stop_at and not stop.requested:
            batches = _batches(lengths, train_idx, cfg.batch_size, cfg.seed, state["epoch"])
            while state["batch"] < len(batches) and state["step"] < stop_at and not stop.requested:
                batch = collate([dataset[i] for i in batches[state["batch"]]])
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                g = torch.Generator(accelerator.device).manual_seed(cfg.seed * 1_000_003 + state["step"])
                for group in optimizer.param_groups:
                    group["lr"] = cfg.lr * _lr_factor(state["step"], cfg.warmup_steps, total)
                with torch.autocast(accelerator.device.type, torch.bfloat16, enabled=cfg.mixed_precision == "bf16"):
                    parts = draft_loss(accelerator.unwrap_model(draft), embed, head_w, batch, cfg, g)
                optimizer.zero_grad()
                accelerator.backward(parts["loss"])
                if cfg.clip_mode == "value":
                    accelerator.clip_grad_value_(draft.parameters(), cfg.grad_clip)
                else:
                    accelerator.clip_grad_norm_(draft.parameters(), cfg.grad_clip)
                optimizer.step()
                state["step"] += 1
                state["batch"] += 1
                tokens += int(batch["loss_mask"].sum())
                row = {k: float(v.detach()) for k, v in parts.items()}
                bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['acc']:.2f}")
                bar.update()
                if state["step"] % 10 == 0 or state["step"] == total:
                    _log(out, {"step": state["step"], "epoch": state["epoch"], "lr": optimizer.param_groups[0]["lr"],
                               **row, "answer_tokens_per_s": tokens / max(1e-9, time.perf_counter() - t_start)})
                if cfg.eval_every and state["step"] % cfg.eval_every == 0:
                    _log(out, {"step": state["step"], "eval": evaluate(accelerator.unwrap_model(draft), embed, head_w,
                                                                       dataset, eval_idx, cfg.eval_depth)})
                if state["step"] % cfg.save_every == 0:
                    save()
            if state["batch"] >= len(batches):
                state["epoch"] += 1
                state["batch"] = 0
                if not cfg.eval_every:
                    _log(out, {"step": state["step"], "epoch": state["epoch"],
                               "eval": evaluate(accelerator.unwrap_model(draft), embed, head_w, dataset, eval_idx,
                                                cfg.eval_depth)})
        bar.close()
        save()
    if stop.requested:
        if not (out / "latest.json").is_file():
            raise KeyboardInterrupt  # before the first step: nothing to save
        raise Interrupted(f"interrupted at step {state['step']}; the training state is saved in {out}: "
                          "continue with --resume")
    state["seconds"] = time.perf_counter() - t_start
    final = accelerator.unwrap_model(draft)
    finished = state["epoch"] >= cfg.epochs
    if finished:
        final.save(out)
        plot_training(out)
    return {"step": state["step"], "finished": finished, "seconds": state["seconds"]}


def plot_training(out: Path) -> Path:
    """loss.png: training loss and held-out agreement per step, from train_log.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval" in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], label="loss")
    a.plot([r["step"] for r in train_rows], [r["acc"] for r in train_rows], label="top-1 acc (step 1, train)")
    a.set_xlabel("step"), a.legend(), a.set_title("training")
    for k in sorted({k for r in eval_rows for k in r["eval"]["agree"]}, key=int):
        b.plot([r["step"] for r in eval_rows], [r["eval"]["agree"].get(k) for r in eval_rows], marker="o", label=f"step {k}")
    b.set_xlabel("step"), b.set_ylim(0, 1), b.legend(), b.set_title("held-out agreement with the target")
    fig.tight_layout()
    path = out / "loss.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
