"""``turbolm draft prepare | train | calibrate | export``: the data, training and acceptance statistics of
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
    p.add_argument("--regen-temperature", type=float, default=0.0,
                   help="with --regenerate: sample the answers at this temperature instead of greedy (default: 0 = "
                        "greedy); a draft that will serve sampling learns from the text sampling produces")
    p.add_argument("--regen-dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="precision of the target copy that writes the answers (default: --dtype); bfloat16 is ~2x "
                        "faster on CPUs with AMX, the features are still computed in --dtype")
    add_model_args(p, flag="--target", fast_cpu=False)
    p.set_defaults(run=cmd_prepare, flags={"model": "--target"})

    c = steps.add_parser("calibrate", help="measure a trained draft's acceptance (greedy and sampling, built-in "
                                           "prompts, every depth's own tree) and store it with the checkpoint, for "
                                           "--tree auto on any machine")
    c.add_argument("--draft", required=True, help="draft checkpoint directory (acceptance.json is written there)")
    c.add_argument("--max-new-tokens", type=int, default=128, help="tokens per calibration prompt (default: 128)")
    c.add_argument("--temperatures", type=float, nargs="*", default=[1.0],
                   help="also record sampling at these temperatures, for --tree auto when sampling (default: 1.0; "
                        "none: greedy only; another temperature is recorded on first use and cached)")
    add_model_args(c, flag="--target", fast_cpu=False)
    c.set_defaults(run=cmd_calibrate, flags={"model": "--target"})

    e = steps.add_parser("export", help="write an EAGLE-2 draft in the layout vLLM (speculative method eagle) and "
                                        "SGLang (--speculative-algorithm EAGLE) load, checked against transformers' "
                                        "own Llama layer")
    e.add_argument("--draft", required=True, help="EAGLE-2 draft checkpoint directory (from `turbolm draft train`)")
    e.add_argument("--out", required=True, help="output directory (config.json + model.safetensors)")
    e.add_argument("--overwrite", action="store_true", help="replace the files in a non-empty --out")
    e.add_argument("--weights-dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="precision of the written weights (default: float32)")
    add_model_args(e, flag="--target", fast_cpu=False)
    e.set_defaults(run=cmd_export, flags={"model": "--target", "draft": "--draft", "out": "--out"})

    t = steps.add_parser("train", help="train a Jakiro or EAGLE-2 draft on prepared features (accelerate: "
                                       "`accelerate launch -m turbolm.cli draft train ...` scales it out)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    _add_train_config_args(t)
    t.set_defaults(run=cmd_train)


_TRAIN_HELP = {
    "data": "a directory written by `turbolm draft prepare`, or a token file (.safetensors, `export_tokens`): the target then "
            "computes the features at the start, in memory (nothing stored; on the device accelerate picks); several "
            "prepared directories are read as one dataset, in the order given (the held-out samples are the last one's last)",
    "target_dtype": "the target's precision when it computes features from a token file (bfloat16 on a GPU)",
    "mixed_precision": "no | bf16: autocast the training steps in bfloat16 (for GPUs)",
    "out": "checkpoint directory (config.json + model.safetensors, training state, log, loss.png)",
    "arch": "jakiro (MoE FFN + contrastive branch) | eagle2 (dense FFN)",
    "candidate_mode": "mixture (one distribution per node) | decoupled (each expert proposes its own candidates)",
    "draft_vocab_size": "restrict the draft to the N most frequent answer tokens (0 = the full vocabulary)",
    "max_steps": "stop after this many steps in this invocation (resume later with --resume)",
    "target": "the target the features came from (default: the embedded SmolLM2-135M-Instruct)",
    "fc_bias": "a bias in the draft's fc layer; --no-fc-bias for EAGLE-2 drafts meant for vLLM, which drops it",
    "eval_every": "held-out evaluation every N steps (0 = after each epoch)",
    "clip_mode": "gradient clipping: norm (clip the global norm to --grad-clip) | value (each value to +-grad-clip, the reference's)",
    "expert_size": "Jakiro's expert intermediate size (0: the hidden size, as in the paper; the target's "
                   "intermediate size / num_experts splits the target's FFN between the experts, as many "
                   "parameters as EAGLE-2's FFN)",
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
        if f.name == "data":
            p.add_argument(flag, required=True, nargs="+", metavar="DATA", help=_TRAIN_HELP.get(f.name))
        elif f.default is dataclasses.MISSING:
            p.add_argument(flag, required=True, help=_TRAIN_HELP.get(f.name))
        elif f.name == "betas":
            p.add_argument(flag, type=float, nargs=2, default=list(f.default), help="AdamW betas")
        elif isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                           help=(_TRAIN_HELP.get(f.name, "") + f" (default: {f.default})").strip())
        else:
            kind = str if f.default is None else type(f.default)
            p.add_argument(flag, type=kind, default=f.default, help=(_TRAIN_HELP.get(f.name, "") + f" (default: {f.default})").strip())


def cmd_prepare(args) -> int:
    from ..speculative.draft.data import prepare_features, prepare_from_tokens

    if args.from_tokens and (args.regenerate or args.max_samples is not None or args.regen_dtype or args.regen_temperature):
        raise ParameterError("{} takes the samples as they are: no {} / {} / {} / {}", "from_tokens", "regenerate",
                             "max_samples", "regen_dtype", "regen_temperature")
    if args.regen_temperature and not args.regenerate:
        raise ParameterError("{} needs {} (it samples the target's own answers)", "regen_temperature", "regenerate")
    with sigterm_as_interrupt():  # as Ctrl-C: the shards written so far stay, a rerun continues
        if args.from_tokens:
            meta = prepare_from_tokens(args.model, args.from_tokens, args.out, batch_size=args.batch_size,
                                       shard_size=args.shard_size, dtype=args.dtype, device=args.device)
        else:
            meta = prepare_features(args.model, args.data, args.out, regenerate=args.regenerate,
                                    max_samples=args.max_samples, max_length=args.max_length,
                                    batch_size=args.batch_size, shard_size=args.shard_size, dtype=args.dtype,
                                    device=args.device, regen_max_new_tokens=args.regen_max_new_tokens,
                                    regen_dtype=args.regen_dtype, regen_temperature=args.regen_temperature)
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


CHECK_TEXT = ("Speculative decoding drafts several tokens with a small model and checks them with the large one in "
              "a single forward pass. When the draft is right, several tokens are produced for the price of one.")


def cmd_export(args) -> int:
    import torch

    from ..core.chat import encode_chat
    from ..core.models import load_target
    from ..speculative.draft.export import check_export, export_eagle
    from ..speculative.draft.model import load_draft

    model, tokenizer = load_target(args.model, dtype=args.dtype, device=args.device)
    draft = load_draft(args.draft, model)
    out = export_eagle(draft, model, args.out, overwrite=args.overwrite, dtype=getattr(torch, args.weights_dtype))
    ids = torch.tensor([encode_chat(tokenizer, [{"role": "user", "content": CHECK_TEXT}])])
    check = check_export(out, draft, model, ids)
    print(f"{out}: EAGLE layout (config.json, model.safetensors); checked on {check['tokens']} positions against "
          f"transformers' LlamaDecoderLayer: max feature difference {check['max_feature_diff']:.2e}, top-1 agreement "
          f"{check['top1_agreement']:.1%}")
    if "top1_agreement_without_fc_bias" in check:
        print(f"note: this draft has an fc bias (max |b| {check['fc_bias_max_abs']:.3f}); SGLang uses it, vLLM drops it "
              f"(top-1 agreement without it: {check['top1_agreement_without_fc_bias']:.1%}); train with --no-fc-bias "
              "for a draft vLLM runs exactly")
    print(f"vLLM:   LLM(model=TARGET, speculative_config={{\"method\": \"eagle\", \"model\": \"{out}\", "
          f"\"num_speculative_tokens\": 5}})")
    print(f"SGLang: python -m sglang.launch_server --model-path TARGET --speculative-algorithm EAGLE "
          f"--speculative-draft-model-path {out} --speculative-num-steps 5 --speculative-eagle-topk 8 "
          "--speculative-num-draft-tokens 32")
    return 0


def cmd_calibrate(args) -> int:
    from ..core.models import load_target
    from ..speculative.sizing import ACCEPTANCE_FILE, calibrate_draft
    from ..speculative.tree import TreeConfig

    model, tokenizer = load_target(args.model, dtype=args.dtype, device=args.device)
    bad = [t for t in args.temperatures if not 0 < t < float("inf")]
    if bad:
        raise ParameterError(f"{{}} must be numbers > 0, got {bad[0]}", "temperatures")
    table = calibrate_draft(args.draft, model, tokenizer, max_new_tokens=args.max_new_tokens,
                            temperatures=tuple(args.temperatures))
    best = max(((d, k, n, v) for d, ks in table.accepted.items() for k, ns in ks.items() for n, v in ns.items()),
               key=lambda r: r[3])
    print(f"{Path(args.draft) / ACCEPTANCE_FILE}: {table.steps} steps recorded; mean accepted tokens per step from "
          f"{table.expected(TreeConfig(1, 1, 1)) + 1:.2f} (1 node) to {best[3] + 1:.2f} ({best[2]} nodes, depth {best[0]}, top-k {best[1]})")
    for sampled in map(type(table).from_dict, table.sampled):
        print(f"  sampling at temperature {sampled.sampling['temperature']:g}: {sampled.steps} steps; "
              f"{sampled.expected(TreeConfig(1, 1, 1)) + 1:.2f} (1 node) to "
              f"{sampled.expected(TreeConfig(64, 6, 4)) + 1:.2f} (64 nodes, depth 6, top-k 4)")
    return 0
