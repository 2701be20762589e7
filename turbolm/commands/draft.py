"""``turbolm draft prepare | train | calibrate``: the data, training and acceptance statistics of
a feature-level draft (Jakiro or EAGLE-2) for a target."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..core.errors import ParameterError
from ..core.interrupts import Interrupted, sigterm_as_interrupt
from .common import add_model_args


def register(sub) -> None:
    dr = sub.add_parser("draft", help="train a speculative-decoding draft on the target's features (EAGLE / Jakiro style)")
    steps = dr.add_subparsers(dest="draft_command", required=True)

    p = steps.add_parser("prepare", help="run the target over a chat dataset and store its features for draft training")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="Alpaca or ShareGPT rows: a JSON list, or one row per line (.jsonl)")
    src.add_argument("--from-tokens", metavar="FILE",
                     help="token ids + answer masks made elsewhere (a token file from export_tokens(), or a prepared "
                          "directory): only the features are computed, e.g. after --regenerate on a GPU")
    p.add_argument("--out", required=True, help="output directory; rerun with the same --out to resume")
    p.add_argument("--regenerate", action="store_true",
                   help="the target writes the answers itself (greedy, first user turn), so the draft learns the target's own distribution")
    p.add_argument("--max-samples", type=int, default=None, help="use only the first N rows of the data")
    p.add_argument("--max-length", type=int, default=1024, help="truncate each sample to this many tokens (default: 1024)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per target forward (default: 8)")
    p.add_argument("--shard-size", type=int, default=256, help="samples per shard file (default: 256)")
    p.add_argument("--regen-max-new-tokens", type=int, default=256, help="longest regenerated answer (default: 256)")
    p.add_argument("--regen-dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="precision of the target copy that writes the answers (default: --dtype); bfloat16 is ~2x "
                        "faster on CPUs with AMX, the features are still computed in --dtype")
    add_model_args(p, flag="--target", fast_cpu=False)
    p.set_defaults(run=cmd_prepare, flags={"model": "--target"})

    c = steps.add_parser("calibrate", help="measure a trained draft's acceptance (greedy, built-in prompts, one big "
                                           "tree) and store it with the checkpoint, for --tree auto on any machine")
    c.add_argument("--draft", required=True, help="draft checkpoint directory (acceptance.json is written there)")
    c.add_argument("--max-new-tokens", type=int, default=128, help="tokens per calibration prompt (default: 128)")
    add_model_args(c, flag="--target", fast_cpu=False)
    c.set_defaults(run=cmd_calibrate, flags={"model": "--target"})

    t = steps.add_parser("train", help="train a Jakiro or EAGLE-2 draft on prepared features (accelerate: "
                                       "`accelerate launch -m turbolm.cli draft train ...` scales it out)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    _add_train_config_args(t)
    t.set_defaults(run=cmd_train)


_TRAIN_HELP = {
    "data": "a directory written by `turbolm draft prepare`",
    "out": "checkpoint directory (config.json + model.safetensors, training state, log, loss.png)",
    "arch": "jakiro (MoE FFN + contrastive branch) | eagle2 (dense FFN)",
    "candidate_mode": "mixture (one distribution per node) | decoupled (each expert proposes its own candidates)",
    "draft_vocab_size": "restrict the draft to the N most frequent answer tokens (0 = the full vocabulary)",
    "max_steps": "stop after this many steps in this invocation (resume later with --resume)",
    "target": "the target the features came from (default: the embedded SmolLM2-135M-Instruct)",
    "eval_every": "held-out evaluation every N steps (0 = after each epoch)",
    "clip_mode": "gradient clipping: norm (clip the global norm to --grad-clip) | value (each value to +-grad-clip, the reference's)",
    "init": "random | target: start the draft's attention (and FFN where shapes allow) from the target's last layer",
    "contrastive_pairing": "Jakiro's contrastive branch: expert (value slot e belongs to expert e, the reference's) | ranked",
    "ttt_steps": "training-time test: also train the draft on its own predicted features for K steps (1 = off)",
    "max_samples": "train on the first N samples only (0 = all); works while `draft prepare` is still writing",
}


def _add_train_config_args(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, with the dataclass defaults."""
    import dataclasses

    from ..speculative.draft.train import TrainConfig

    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.default is dataclasses.MISSING:
            p.add_argument(flag, required=True, help=_TRAIN_HELP.get(f.name))
        elif f.name == "betas":
            p.add_argument(flag, type=float, nargs=2, default=list(f.default), help="AdamW betas")
        else:
            kind = str if f.default is None else type(f.default)
            p.add_argument(flag, type=kind, default=f.default, help=(_TRAIN_HELP.get(f.name, "") + f" (default: {f.default})").strip())


def cmd_prepare(args) -> int:
    from ..speculative.draft.data import prepare_features, prepare_from_tokens

    if args.from_tokens and (args.regenerate or args.max_samples is not None or args.regen_dtype):
        raise ParameterError("{} takes the samples as they are: no {} / {} / {}", "from_tokens", "regenerate",
                             "max_samples", "regen_dtype")
    with sigterm_as_interrupt():  # as Ctrl-C: the shards written so far stay, a rerun continues
        if args.from_tokens:
            meta = prepare_from_tokens(args.model, args.from_tokens, args.out, batch_size=args.batch_size,
                                       shard_size=args.shard_size, dtype=args.dtype, device=args.device)
        else:
            meta = prepare_features(args.model, args.data, args.out, regenerate=args.regenerate,
                                    max_samples=args.max_samples, max_length=args.max_length,
                                    batch_size=args.batch_size, shard_size=args.shard_size, dtype=args.dtype,
                                    device=args.device, regen_max_new_tokens=args.regen_max_new_tokens,
                                    regen_dtype=args.regen_dtype)
    line = (f"{args.out}: {meta['samples']} samples, {meta['tokens']} tokens ({meta['loss_tokens']} in answers), "
            f"{len(meta['shards'])} shard(s)")
    if meta["skipped"]:
        line += "; skipped rows: " + ", ".join(f"{n} {reason}" for reason, n in sorted(meta["skipped"].items()))
    print(line)
    return 0


def cmd_train(args) -> int:
    import dataclasses

    from ..speculative.draft.train import TrainConfig, train

    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    cfg.betas = tuple(cfg.betas)
    try:
        with sigterm_as_interrupt():
            result = train(cfg, resume=args.resume)
    except Interrupted as e:  # the state is saved: say where, and how to continue
        print(f"\nturbolm: {e}", file=sys.stderr)
        return 130
    if result["finished"]:
        print(f"{args.out}: draft trained in {result['seconds'] / 60:.1f} min ({result['step']} steps); "
              f"log {args.out}/train_log.jsonl, curve {args.out}/loss.png")
    else:
        print(f"{args.out}: stopped at step {result['step']}; continue with --resume")
    return 0


def cmd_calibrate(args) -> int:
    from ..core.models import load_target
    from ..speculative.sizing import ACCEPTANCE_FILE, calibrate_draft
    from ..speculative.tree import TreeConfig

    model, tokenizer = load_target(args.model, dtype=args.dtype, device=args.device)
    table = calibrate_draft(args.draft, model, tokenizer, max_new_tokens=args.max_new_tokens)
    best = max(((d, k, n, v) for d, ks in table.accepted.items() for k, ns in ks.items() for n, v in ns.items()),
               key=lambda r: r[3])
    print(f"{Path(args.draft) / ACCEPTANCE_FILE}: {table.steps} steps recorded; mean accepted tokens per step from "
          f"{table.expected(TreeConfig(1, 1, 1)) + 1:.2f} (1 node) to {best[3] + 1:.2f} ({best[2]} nodes, depth {best[0]}, top-k {best[1]})")
    return 0
