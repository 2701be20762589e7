"""Training a draft on prepared target features, with accelerate.

Per sample (tokens x, target features f, answer mask m), draft entry j is (x_{j+1}, f_j) and
its output predicts f_{j+1} (and so the target's distribution of x_{j+2}); Jakiro's contrastive
output predicts f_{j+2}. Loss (the paper's, weights are flags):

    w_v * (SmoothL1(f_hat, f_{j+1}) + 0.5 * SmoothL1(h_con, f_{j+2}))
  + w_p * (CE(softmax(lm_head f_{j+1}), lm_head f_hat) + 0.5 * same for h_con)

counted where the predicted token is an answer token, with uniform noise on the input
features. The target's embedding and lm_head are frozen and never saved with the draft.
Resume is exact: the training state (draft, AdamW moments, schedule, data position) is
saved atomically in safetensors + JSON, data order and noise derive from (seed, epoch, step).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ...core.errors import ParameterError, TurboLMError
from ...core.io import load_training_state, save_training_state
from .model import DraftConfig, DraftModel, KVCache


@dataclass
class TrainConfig:
    data: str
    out: str
    arch: str = "jakiro"
    candidate_mode: str = "mixture"
    num_experts: int = 2
    draft_vocab_size: int = 0  # 0 = the target's full vocabulary
    epochs: int = 2
    batch_size: int = 8
    lr: float = 9e-5
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 0.5
    warmup_steps: int = 50
    w_v: float = 1.0
    w_p: float = 0.1
    noise: float = 0.2
    eval_samples: int = 32
    eval_depth: int = 5
    save_every: int = 200
    eval_every: int = 0  # 0: at the end of each epoch only
    seed: int = 0
    max_steps: int = 0  # 0: run all epochs (a positive value stops early, for tests and resumable chunks)
    target: str | None = None  # target source; default: the one recorded by prepare


def _target_pieces(cfg: TrainConfig, meta: dict):
    """The frozen target modules the draft needs: embedding and lm_head (and identity check)."""
    from ...core.models import identity_mismatch, load_target

    model, _ = load_target(cfg.target)
    diff = identity_mismatch(meta["target"], model)
    if diff:
        raise TurboLMError(f"the features in {cfg.data} were prepared for a different target than "
                           f"{cfg.target or 'the default'} ({diff})")
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    for p in list(embed.parameters()) + list(head.parameters()):
        p.requires_grad_(False)
    return model, embed, head


def draft_vocabulary(data_dir: str, size: int) -> torch.Tensor:
    """The ``size`` most frequent answer tokens of the training data (target ids, ascending)."""
    from .data import FeatureDataset

    ds = FeatureDataset(data_dir)
    counts = None
    for ids, mask in ds.iter_tokens():
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
    feats = torch.zeros(len(samples), L, H)
    for i, s in enumerate(samples):
        n = s["input_ids"].shape[0]
        ids[i, :n], mask[i, :n], feats[i, :n] = s["input_ids"], s["loss_mask"], s["features"]
    return {"input_ids": ids, "loss_mask": mask, "features": feats}


def draft_loss(draft: DraftModel, embed, lm_head_w, batch: dict, cfg: TrainConfig, generator=None) -> dict:
    """The training loss of one batch and its parts (plain floats except ``loss``)."""
    ids, m, f = batch["input_ids"], batch["loss_mask"], batch["features"]
    B, L, H = f.shape
    if L < 3:
        raise TurboLMError("training samples need at least 3 tokens")
    inp = f[:, :-1]
    if cfg.noise > 0:
        noise = (torch.rand(inp.shape, generator=generator) - 0.5) * cfg.noise * 512 / L
        inp = inp + noise.to(inp.device)
    out = draft(embed(ids[:, 1:]), inp, torch.arange(L - 1, device=f.device).expand(B, -1))
    target = f[:, 1:]  # f_{j+1}
    weight = torch.zeros(B, L - 1, device=f.device)
    weight[:, :-1] = m[:, 2:].float()  # the token predicted by entry j is x_{j+2}
    if not weight.any():
        raise TurboLMError("a training batch holds no answer token to learn from")
    # The lm_head dominates the cost: evaluate it only where a loss is counted.
    sel = weight.bool()
    with torch.no_grad():
        t_logp_sel = draft.logits(target[sel], lm_head_w).float().log_softmax(-1)
    parts = _prediction_loss(draft, lm_head_w, out.hidden[sel], target[sel], t_logp_sel)
    loss = cfg.w_v * parts["vloss"] + cfg.w_p * parts["ploss"]
    if out.expert_hidden is not None:  # decoupled: each selected expert's own feature predicts too
        for e in range(out.expert_hidden.shape[-2]):
            ex = _prediction_loss(draft, lm_head_w, out.expert_hidden[..., e, :][sel], target[sel], t_logp_sel)
            loss = loss + 0.5 * (cfg.w_v * ex["vloss"] + cfg.w_p * ex["ploss"])
    if out.contrastive is not None:
        # The contrastive output of entry j (j <= L-3) predicts f_{j+2} and so token x_{j+3}.
        sel2 = torch.zeros(B, L - 2, dtype=torch.bool, device=f.device)
        sel2[:, :-1] = m[:, 3:].bool()
        with torch.no_grad():
            t2 = target[:, 1:][sel2]
            t2_logp = draft.logits(t2, lm_head_w).float().log_softmax(-1)
        con = _prediction_loss(draft, lm_head_w, out.contrastive[:, :-1][sel2], t2, t2_logp)
        loss = loss + 0.5 * (cfg.w_v * con["vloss"] + cfg.w_p * con["ploss"])
        parts.update(con_vloss=con["vloss"], con_ploss=con["ploss"], con_acc=con["acc"])
    parts["loss"] = loss
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
    T = L - 1
    t_top = draft.logits(f, lm_head_w).argmax(-1)  # the target's greedy token after each position
    result: dict = {"agree": {}, "contrastive": {}}

    def record(key, k, hidden):
        n = L - 1 - k
        if n > 0:
            pred = draft.logits(hidden[:n], lm_head_w).argmax(-1)
            w = m[k + 1 : k + 1 + n]
            hits, total = result[key].get(k, (0, 0))
            result[key][k] = (hits + int(((pred == t_top[k : k + n]) & w).sum()), total + int(w.sum()))

    cache = KVCache()
    out = draft(embed(ids[None, 1:]), f[None, :-1], torch.arange(T, device=dev)[None], cache)
    record("agree", 1, out.hidden[0])
    blocks = []  # cache offsets of earlier chain steps
    for k in range(2, depth + 1):
        if out.contrastive is not None:
            record("contrastive", k, out.contrastive[0])
        n = L - 1 - k
        if n <= 0:
            break
        S, j = len(cache), torch.arange(n, device=dev)
        allowed = torch.zeros(n, S + n, dtype=torch.bool, device=dev)
        allowed[:, :T] = torch.arange(T, device=dev)[None] <= j[:, None]
        for off in blocks:
            allowed[j, off + j] = True
        allowed[j, S + j] = True
        blocks.append(S)
        out = draft(embed(ids[None, k : k + n]), out.hidden[:, :n], (j + k - 1)[None], cache, allowed[None, None])
        record("agree", k, out.hidden[0])
    return result


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
    """Chain agreement rates over held-out samples: {"agree": {k: rate}, "contrastive": {k: rate}}."""
    draft.eval()
    sums: dict = {"agree": {}, "contrastive": {}}
    for i in indices:
        r = chain_agreement(draft, embed, head_w, dataset[i], depth)
        for key in sums:
            for k, (h, t) in r[key].items():
                a, b = sums[key].get(k, (0, 0))
                sums[key][k] = (a + h, b + t)
    draft.train()
    return {key: {str(k): (h / t if t else None) for k, (h, t) in sorted(v.items())} for key, v in sums.items()}


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Train a draft on the features in ``cfg.data``; write the checkpoint to ``cfg.out``."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from .data import FeatureDataset, read_meta

    out = Path(cfg.out)
    meta = read_meta(cfg.data)
    dataset = FeatureDataset(cfg.data)
    n = len(dataset)
    if n <= cfg.eval_samples:
        raise ParameterError(f"{cfg.data} has {n} samples; need more than {{}} ({cfg.eval_samples})", "eval_samples")
    if resume and not (out / "latest.json").is_file():
        raise ParameterError(f"nothing to resume in {out} (no latest.json); start without {{}}", "resume")
    if not resume and (out / "latest.json").is_file():
        raise ParameterError(f"{out} already holds a training run; pass {{}} to continue it or choose another {{}}", "resume", "out")
    out.mkdir(parents=True, exist_ok=True)

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    target, embed, head = _target_pieces(cfg, meta)
    embed, head = embed.to(accelerator.device), head.to(accelerator.device)
    dconf = DraftConfig.for_target(
        target, arch=cfg.arch, candidate_mode=cfg.candidate_mode, num_experts=cfg.num_experts,
        draft_vocab_size=cfg.draft_vocab_size,
    )
    torch.manual_seed(cfg.seed)
    draft = DraftModel(dconf)
    if cfg.draft_vocab_size and not resume:
        draft.draft_vocab.copy_(draft_vocabulary(cfg.data, cfg.draft_vocab_size))
    decay = [p for name, p in draft.named_parameters() if p.dim() >= 2]
    no_decay = [p for name, p in draft.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=tuple(cfg.betas),
    )
    train_idx = list(range(n - cfg.eval_samples))
    eval_idx = list(range(n - cfg.eval_samples, n))
    lengths = dataset.lengths()
    per_epoch = math.ceil(len(train_idx) / cfg.batch_size)
    total = per_epoch * cfg.epochs
    state = {"step": 0, "epoch": 0, "batch": 0, "config": asdict(cfg), "seconds": 0.0}
    if resume:
        state = load_training_state(out, draft, optimizer, weights="draft.safetensors")
        if _settings(state["config"]) != _settings(asdict(cfg)):
            raise TurboLMError(f"{out} was trained with other settings; resume it with the same flags")
    draft, optimizer = accelerator.prepare(draft, optimizer)
    head_w = head.weight
    stop_at = state["step"] + cfg.max_steps if cfg.max_steps else total
    bar = tqdm(total=total, initial=state["step"], disable=not progress, desc=f"train {cfg.arch}", unit="step")
    draft.train()
    t_start, tokens = time.perf_counter() - state["seconds"], 0
    while state["epoch"] < cfg.epochs and state["step"] < stop_at:
        batches = _batches(lengths, train_idx, cfg.batch_size, cfg.seed, state["epoch"])
        while state["batch"] < len(batches) and state["step"] < stop_at:
            batch = collate([dataset[i] for i in batches[state["batch"]]])
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + state["step"])
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * _lr_factor(state["step"], cfg.warmup_steps, total)
            parts = draft_loss(accelerator.unwrap_model(draft), embed, head_w, batch, cfg, g)
            optimizer.zero_grad()
            accelerator.backward(parts["loss"])
            accelerator.clip_grad_norm_(draft.parameters(), cfg.grad_clip)
            optimizer.step()
            state["step"] += 1
            state["batch"] += 1
            tokens += int(batch["loss_mask"].sum())
            row = {k: float(v.detach()) for k, v in parts.items()}
            bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['acc']:.2f}")
            bar.update()
            if state["step"] % 10 == 0 or state["step"] == total:
                _log(out, {"step": state["step"], "epoch": state["epoch"], "lr": optimizer.param_groups[0]["lr"], **row,
                           "answer_tokens_per_s": tokens / max(1e-9, time.perf_counter() - t_start)})
            if cfg.eval_every and state["step"] % cfg.eval_every == 0:
                _log(out, {"step": state["step"], "eval": evaluate(accelerator.unwrap_model(draft), embed, head_w, dataset, eval_idx, cfg.eval_depth)})
            if state["step"] % cfg.save_every == 0:
                state["seconds"] = time.perf_counter() - t_start
                save_training_state(out, accelerator.unwrap_model(draft), optimizer, state, weights="draft.safetensors")
        if state["batch"] >= len(batches):
            state["epoch"] += 1
            state["batch"] = 0
            if not cfg.eval_every:
                _log(out, {"step": state["step"], "epoch": state["epoch"],
                           "eval": evaluate(accelerator.unwrap_model(draft), embed, head_w, dataset, eval_idx, cfg.eval_depth)})
    bar.close()
    state["seconds"] = time.perf_counter() - t_start
    save_training_state(out, accelerator.unwrap_model(draft), optimizer, state, weights="draft.safetensors")
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
