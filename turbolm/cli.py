"""The ``turbolm`` command: a thin layer that parses flags and calls the library."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
from pathlib import Path

from .core.errors import TurboLMError

DEMO_PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Write a short poem about the sea.",
    "Explain in three sentences why the sky is blue.",
]


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="local HF model directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (default: float32)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    p.add_argument("--fast-cpu", choices=["auto", "off"], default="auto",
                   help="auto (default): few-token forwards (tree verification, drafting) through oneDNN with "
                        "pre-packed weights on CPUs where PyTorch's default kernels are slow for few rows (x86, "
                        "not Intel); costs one extra copy of the weights in memory. Vanilla runs the same way.")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256, help="stop after this many new tokens (default: 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default: 1.0 = off)")
    p.add_argument("--sampling-top-k", type=int, default=0, help="sample among the k most likely tokens (default: 0 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable); not included in the output")


def _add_speculative_args(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group("speculative decoding (lossless: the output is the target's own)")
    s.add_argument("--speculative", choices=["none", "prompt-lookup", "model", "jakiro", "eagle2"], default="none",
                   help="none: vanilla decoding (default); prompt-lookup: n-gram matches in the context; "
                        "model: a small draft LM with the same tokenizer (--draft-model); "
                        "jakiro / eagle2: a trained feature-level draft (--draft, default: the shipped one)")
    s.add_argument("--draft", default=None, help="draft checkpoint directory for --speculative jakiro / eagle2")
    s.add_argument("--candidate-mode", choices=["mixture", "decoupled"], default=None,
                   help="override a Jakiro draft's candidate mode")
    s.add_argument("--draft-model", default=None, help="draft model directory or .gguf for --speculative model")
    s.add_argument("--draft-layers", type=int, default=None,
                   help="for --speculative model without --draft-model: draft with the target's own first N layers")
    s.add_argument("--tree", choices=["auto", "fixed"], default=None,
                   help="auto (default for jakiro / eagle2 / model): the tree size that maximises expected tokens/s on "
                        "this machine, from measured target/draft costs and the draft's acceptance (measured once, "
                        "cached); fixed: the proposer's default or --total-tokens/--depth/--top-k")
    s.add_argument("--total-tokens", type=int, default=None, help="most tokens in a draft tree")
    s.add_argument("--depth", type=int, default=None, help="most levels in a draft tree")
    s.add_argument("--top-k", type=int, default=None, help="branches per tree node")


def _add_draft_parser(sub) -> None:
    dr = sub.add_parser("draft", help="train a speculative-decoding draft on the target's features (EAGLE / Jakiro style)")
    steps = dr.add_subparsers(dest="draft_command", required=True)

    p = steps.add_parser("prepare", help="run the target over a chat dataset and store its features for draft training")
    p.add_argument("--target", default=None, help="local HF model directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
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
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (default: float32)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")

    c = steps.add_parser("calibrate", help="measure a trained draft's acceptance (greedy, built-in prompts, one big "
                                           "tree) and store it with the checkpoint, for --tree auto on any machine")
    c.add_argument("--draft", required=True, help="draft checkpoint directory (acceptance.json is written there)")
    c.add_argument("--target", default=None, help="the draft's target (default: the embedded SmolLM2-135M-Instruct)")
    c.add_argument("--max-new-tokens", type=int, default=128, help="tokens per calibration prompt (default: 128)")
    c.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (default: float32)")
    c.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")

    t = steps.add_parser("train", help="train a Jakiro or EAGLE-2 draft on prepared features (accelerate: "
                                       "`accelerate launch -m turbolm.cli draft train ...` scales it out)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    _add_train_config_args(t)


_TRAIN_HELP = {
    "data": "a directory written by `turbolm draft prepare`",
    "out": "checkpoint directory (config.json + model.safetensors, training state, log, loss.png)",
    "arch": "jakiro (MoE FFN + contrastive branch) | eagle2 (dense FFN)",
    "candidate_mode": "mixture (one distribution per node) | decoupled (each expert proposes its own candidates)",
    "draft_vocab_size": "restrict the draft to the N most frequent answer tokens (0 = the full vocabulary)",
    "max_steps": "stop after this many steps in this invocation (resume later with --resume)",
    "target": "the target the features came from (default: the embedded SmolLM2-135M-Instruct)",
    "eval_every": "held-out evaluation every N steps (0 = after each epoch)",
}


def _add_train_config_args(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, with the dataclass defaults."""
    import dataclasses

    from .speculative.draft.train import TrainConfig

    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.default is dataclasses.MISSING:
            p.add_argument(flag, required=True, help=_TRAIN_HELP.get(f.name))
        elif f.name == "betas":
            p.add_argument(flag, type=float, nargs=2, default=list(f.default), help="AdamW betas")
        else:
            kind = str if f.default is None else type(f.default)
            p.add_argument(flag, type=kind, default=f.default, help=(_TRAIN_HELP.get(f.name, "") + f" (default: {f.default})").strip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="turbolm", description="Faster inference for Hugging Face causal language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate an answer to a prompt, streamed to the terminal")
    g.add_argument("--prompt", required=True, help="the user prompt ('-' reads it from standard input)")
    g.add_argument("--system", default=None, help="optional system message")
    g.add_argument("--raw", action="store_true", help="send the prompt as plain text, without the chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object (text, token ids, statistics) instead of streaming")
    _add_model_args(g)
    _add_sampling_args(g)
    _add_speculative_args(g)

    i = sub.add_parser("info", help="versions, machine, threads, and the model's details")
    _add_model_args(i)
    i.add_argument("--json", action="store_true", help="print as JSON")

    d = sub.add_parser("demo", help="stream Jakiro speculative answers to three built-in prompts, then compare with "
                                    "vanilla decoding: tokens/s, speedup, tau, identical outputs")
    _add_model_args(d)
    d.add_argument("--max-new-tokens", type=int, default=128)
    d.add_argument("--draft", default=None, help="Jakiro draft checkpoint (default: the shipped one for the default model)")
    d.add_argument("--speculative", choices=["jakiro", "eagle2", "none"], default="jakiro",
                   help="the method to compare with vanilla (default: jakiro); none: vanilla only")

    _add_draft_parser(sub)
    _add_bench_parser(sub)
    from .evaluation.command import register as register_eval
    from .pruning.command import register as register_prune

    register_prune(sub)
    register_eval(sub)
    return parser


def _load(args):
    from .core.kernels import apply_for_cli
    from .core.models import load_target

    model, tokenizer = load_target(args.model, dtype=args.dtype, device=args.device)
    apply_for_cli(model, getattr(args, "fast_cpu", "auto"))
    return model, tokenizer


def _sampling(args):
    from .core.generation import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.sampling_top_k, seed=args.seed)


def _stream_to_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def cmd_generate(args) -> int:
    from .core.chat import encode_prompt

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    sampling = _sampling(args)
    if not prompt.strip():
        raise TurboLMError("empty prompt: give some text with --prompt")
    if args.speculative == "model" and not (args.draft_model or args.draft_layers):
        raise TurboLMError("--speculative model needs --draft-model DIR_OR_GGUF (a small LM with the target's tokenizer) "
                           "or --draft-layers N (the target's first N layers)")
    if args.speculative != "model" and (args.draft_model or args.draft_layers):
        raise TurboLMError("--draft-model / --draft-layers are only used with --speculative model")
    if args.speculative not in ("jakiro", "eagle2") and (args.draft or args.candidate_mode):
        raise TurboLMError("--draft / --candidate-mode are only used with --speculative jakiro or eagle2")
    model, tokenizer = _load(args)
    ids = encode_prompt(tokenizer, prompt, system=args.system, chat=not args.raw)
    decode = _decoder(args, model, tokenizer)
    result = decode(ids, max_new_tokens=args.max_new_tokens, sampling=sampling, stop=args.stop,
                    on_text=None if args.json else _stream_to_stdout)
    if args.json:
        d = result.to_dict()
        d.update(model=str(model.turbolm_source.name), method=args.speculative)
        print(json.dumps(d))
    else:
        print()
        line = f"[{result.new_tokens} tokens in {result.seconds:.2f} s, {result.tokens_per_second:.1f} tokens/s"
        if args.speculative != "none":
            line += f", tau {result.tau:.2f}"
        print(f"{line}, finish: {result.finish_reason}]", file=sys.stderr)
    return 0


def _draft_overrides(args) -> dict:
    return {"candidate_mode": args.candidate_mode} if args.candidate_mode else {}


def _decoder(args, model, tokenizer):
    """A ``decode(ids, **kw) -> GenerationResult`` for the chosen method."""
    from functools import partial

    from .core.generation import generate

    if args.speculative == "none":
        if any(v is not None for v in (args.total_tokens, args.depth, args.top_k)):
            raise TurboLMError("--total-tokens / --depth / --top-k need --speculative prompt-lookup or model")
        return partial(generate, model, tokenizer)
    from .core.models import load_target
    from .speculative import ModelProposer, PromptLookupProposer, SpeculativeGenerator, TreeConfig
    from .speculative.proposers.small_model import truncated_draft

    if args.speculative == "prompt-lookup":
        proposer = PromptLookupProposer()
    elif args.speculative in ("jakiro", "eagle2"):
        from .speculative.draft.model import load_draft, shipped_draft
        from .speculative.proposers.jakiro import JakiroProposer

        draft = load_draft(args.draft or shipped_draft(args.speculative), model, overrides=_draft_overrides(args))
        proposer = JakiroProposer(draft, model)
    elif args.draft_model:
        draft, draft_tokenizer = load_target(args.draft_model, dtype=args.dtype, device=args.device)
        from .core.kernels import apply_for_cli

        apply_for_cli(draft, args.fast_cpu)
        proposer = ModelProposer(draft, draft_tokenizer)
    else:
        proposer = ModelProposer(truncated_draft(model, args.draft_layers), tokenizer)
    d = proposer.default_tree
    manual = any(v is not None for v in (args.total_tokens, args.depth, args.top_k))
    if args.tree == "auto" and manual:
        raise TurboLMError("--tree auto chooses --total-tokens / --depth / --top-k itself; give one or the other")
    tree = TreeConfig(
        total_tokens=args.total_tokens if args.total_tokens is not None else d.total_tokens,
        depth=args.depth if args.depth is not None else d.depth,
        top_k=args.top_k if args.top_k is not None else d.top_k,
    )
    gen = SpeculativeGenerator(model, tokenizer, proposer, tree)
    if args.tree == "auto" or (args.tree is None and not manual and args.speculative != "prompt-lookup"):
        _auto_tree(args, gen)
    return gen.generate


def _auto_tree(args, gen) -> None:
    """Size the tree for this machine (``--tree auto``) and say what was chosen and why."""
    from .speculative.sizing import auto_tree, stored_acceptance

    acceptance, draft_id = None, args.speculative
    if args.speculative in ("jakiro", "eagle2"):
        from .speculative.draft.model import shipped_draft

        path = Path(args.draft or shipped_draft(args.speculative)).resolve()
        acceptance = stored_acceptance(path, _draft_overrides(args))
        draft_id = f"{path}:{(path / 'model.safetensors').stat().st_mtime_ns}:{args.candidate_mode}"
    elif args.speculative == "model":
        draft_id = f"model:{args.draft_model or args.draft_layers}"
    choice = auto_tree(gen, acceptance=acceptance, draft_id=draft_id, log=lambda m: print(m, file=sys.stderr))
    print(choice.explain(), file=sys.stderr)


def machine_info() -> dict:
    import torch
    import transformers

    from . import __version__
    from .core.machine import cpu_model

    cpu = cpu_model()
    info = {
        "turbolm": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def cmd_info(args) -> int:
    from .core.generation import context_length
    from .core.models import cache_root

    info = machine_info()
    info["cache"] = str(cache_root())
    model, tokenizer = _load(args)
    src = model.turbolm_source
    info["model"] = {
        "name": src.name,
        "source": f"{src.kind}: {src.path}",
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "layers": getattr(model.config, "num_hidden_layers", None),
        "vocab_size": getattr(model.config, "vocab_size", None),
        "context_length": context_length(model, tokenizer),
        "dtype": str(model.dtype).replace("torch.", ""),
        "device": str(model.device),
    }
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        for k, v in info.items():
            if isinstance(v, dict):
                print(f"{k}:")
                for k2, v2 in v.items():
                    print(f"  {k2:<15} {v2}")
            else:
                print(f"{k:<17} {v}")
    return 0


def cmd_demo(args) -> int:
    from .core.chat import encode_prompt
    from .core.generation import generate

    model, tokenizer = _load(args)
    dtype = str(model.dtype).replace("torch.", "")
    print(f"turbolm demo: {model.turbolm_source.name} ({dtype}, {model.device}), greedy, up to {args.max_new_tokens} "
          f"new tokens per answer", flush=True)
    method = None
    if args.speculative != "none":
        args.tree, args.candidate_mode, args.total_tokens, args.depth, args.top_k = "auto", None, None, None, None
        method = _decoder(args, model, tokenizer)
    generate(model, tokenizer, encode_prompt(tokenizer, "Hello"), max_new_tokens=4)  # warm-up
    rows = []
    for prompt in DEMO_PROMPTS:
        ids = encode_prompt(tokenizer, prompt)
        print(f"\n>>> {prompt}")
        if method is None:
            van = generate(model, tokenizer, ids, max_new_tokens=args.max_new_tokens, on_text=_stream_to_stdout)
            print(f"\n[{van.new_tokens} tokens, {van.tokens_per_second:.1f} tokens/s]")
            rows.append((prompt, van, None))
            continue
        spec = method(ids, max_new_tokens=args.max_new_tokens, on_text=_stream_to_stdout)
        van = generate(model, tokenizer, ids, max_new_tokens=args.max_new_tokens)  # the same prompt, right after
        print(f"\n[{spec.new_tokens} tokens at {spec.tokens_per_second:.1f} tokens/s with {args.speculative} "
              f"(tau {spec.tau:.2f}); vanilla {van.tokens_per_second:.1f} tokens/s]")
        rows.append((prompt, van, spec))
    print()
    print(_demo_table(rows, args.speculative))
    return 0


def _demo_table(rows, name: str) -> str:
    """Markdown table: per prompt and overall, vanilla vs the speculative method."""
    def line(label, vans, specs):
        v_tps = sum(r.new_tokens for r in vans) / sum(r.seconds for r in vans)
        if specs[0] is None:
            return f"| {label} | {sum(r.new_tokens for r in vans)} | {v_tps:.1f} |"
        s_tps = sum(r.new_tokens for r in specs) / sum(r.seconds for r in specs)
        steps = sum(r.target_forwards - 1 for r in specs)
        tau = (sum(r.new_tokens for r in specs) - len(specs)) / steps if steps else 1.0
        same = all(s.token_ids == v.token_ids for s, v in zip(specs, vans))
        return (f"| {label} | {sum(r.new_tokens for r in vans)} | {v_tps:.1f} | {s_tps:.1f} | {s_tps / v_tps:.2f}x | "
                f"{tau:.2f} | {'yes' if same else 'NO'} |")

    if rows[0][2] is None:
        head = "| prompt | tokens | vanilla tok/s |\n|---|---|---|"
    else:
        head = (f"| prompt | tokens | vanilla tok/s | {name} tok/s | speedup | tau | identical |\n"
                "|---|---|---|---|---|---|---|")
    body = [line(p[:40] + ("..." if len(p) > 40 else ""), [v], [s]) for p, v, s in rows]
    body.append(line("**all**", [v for _, v, _ in rows], [s for _, _, s in rows]))
    return "\n".join([head, *body])


def cmd_draft_prepare(args) -> int:
    from .speculative.draft.data import prepare_features, prepare_from_tokens

    if args.from_tokens:
        if args.regenerate or args.max_samples is not None:
            raise TurboLMError("--from-tokens takes the samples as they are: no --regenerate / --max-samples")
        meta = prepare_from_tokens(args.target, args.from_tokens, args.out, batch_size=args.batch_size,
                                   shard_size=args.shard_size, dtype=args.dtype, device=args.device)
    else:
        meta = prepare_features(args.target, args.data, args.out, regenerate=args.regenerate, max_samples=args.max_samples,
                                max_length=args.max_length, batch_size=args.batch_size, shard_size=args.shard_size,
                                dtype=args.dtype, device=args.device, regen_max_new_tokens=args.regen_max_new_tokens)
    line = (f"{args.out}: {meta['samples']} samples, {meta['tokens']} tokens ({meta['loss_tokens']} in answers), "
            f"{len(meta['shards'])} shard(s)")
    if meta["skipped"]:
        line += "; skipped rows: " + ", ".join(f"{n} {reason}" for reason, n in sorted(meta["skipped"].items()))
    print(line)
    return 0


def cmd_draft_train(args) -> int:
    import dataclasses

    from .speculative.draft.train import TrainConfig, train

    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    cfg.betas = tuple(cfg.betas)
    result = train(cfg, resume=args.resume)
    if result["finished"]:
        print(f"{args.out}: draft trained in {result['seconds'] / 60:.1f} min ({result['step']} steps); "
              f"log {args.out}/train_log.jsonl, curve {args.out}/loss.png")
    else:
        print(f"{args.out}: stopped at step {result['step']}; continue with --resume")
    return 0


def cmd_draft_calibrate(args) -> int:
    from .core.models import load_target
    from .speculative.sizing import ACCEPTANCE_FILE, calibrate_draft
    from .speculative.tree import TreeConfig

    model, tokenizer = load_target(args.target, dtype=args.dtype, device=args.device)
    table = calibrate_draft(args.draft, model, tokenizer, max_new_tokens=args.max_new_tokens)
    best = max(((d, k, n, v) for d, ks in table.accepted.items() for k, ns in ks.items() for n, v in ns.items()),
               key=lambda r: r[3])
    print(f"{Path(args.draft) / ACCEPTANCE_FILE}: {table.steps} steps recorded; mean accepted tokens per step from "
          f"{table.expected(TreeConfig(1, 1, 1)) + 1:.2f} (1 node) to {best[3] + 1:.2f} ({best[2]} nodes, depth {best[0]}, top-k {best[1]})")
    return 0


DRAFT_COMMANDS = {"prepare": cmd_draft_prepare, "train": cmd_draft_train, "calibrate": cmd_draft_calibrate}


def cmd_draft(args) -> int:
    return DRAFT_COMMANDS[args.draft_command](args)


def _add_bench_parser(sub) -> None:
    from .bench.specbench import METHODS

    b = sub.add_parser("bench", help="benchmarks")
    kinds = b.add_subparsers(dest="bench_command", required=True)
    p = kinds.add_parser("spec", help="Spec-Bench: speedup, tau and losslessness of every decoding method on the same questions")
    p.add_argument("--questions", required=True, help="Spec-Bench jsonl: question_id, category, turns (list of strings)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)} "
                   "(default: all; vanilla, the baseline, always runs)")
    p.add_argument("--draft", action="append", default=[], metavar="NAME=DIR",
                   help="draft checkpoint for eagle2 or jakiro (repeatable; default: the shipped one)")
    _add_model_args(p)
    p.add_argument("--max-new-tokens", type=int, default=256, help="most new tokens per turn (default: 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling (default: 0)")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions (after --categories)")
    p.add_argument("--per-category", type=int, default=None, help="only the first N questions of each category")
    p.add_argument("--tree", choices=["auto", "fixed"], default=None,
                   help="auto (default unless --total-tokens/--depth/--top-k): eagle2 / jakiro trees sized for this "
                        "machine as `generate` does; fixed: each method's default tree or the flags below")
    p.add_argument("--categories", default=None, help="comma list of categories to run (default: all)")
    p.add_argument("--total-tokens", type=int, default=None, help="most tokens in a draft tree (default: each method's own)")
    p.add_argument("--depth", type=int, default=None, help="most levels in a draft tree (default: each method's own)")
    p.add_argument("--top-k", type=int, default=None, help="branches per tree node (default: each method's own)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up questions per method (default: 1)")
    p.add_argument("--out", default="runs/spec_bench", help="output directory (default: runs/spec_bench)")


def cmd_bench(args) -> int:
    from .bench.specbench import SpecBenchConfig, run_spec_bench

    drafts = {}
    for d in args.draft:
        name, sep, path = d.partition("=")
        if not sep or not name or not path:
            raise TurboLMError(f"--draft {d!r}: expected NAME=DIR, e.g. --draft jakiro=runs/my_jakiro")
        drafts[name.strip()] = path
    categories = [c.strip() for c in args.categories.split(",")] if args.categories else None
    config = SpecBenchConfig(
        questions=args.questions, out=args.out, methods=args.methods.split(","), model=args.model, device=args.device,
        dtype=args.dtype, max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
        limit=args.limit, categories=categories, drafts=drafts, total_tokens=args.total_tokens, depth=args.depth,
        top_k=args.top_k, warmup=args.warmup, fast_cpu=args.fast_cpu, per_category=args.per_category,
        tree=args.tree or ("fixed" if any(v is not None for v in (args.total_tokens, args.depth, args.top_k)) else "auto"),
    )
    report = run_spec_bench(config, progress=True)
    print((Path(args.out) / "report.md").read_text())
    if report["lossless"]["ok"] is False:
        print(f"turbolm: warning: {report['lossless']['ours_differing']} output(s) of turbolm's methods differ from "
              f"vanilla; see {args.out}/report.md", file=sys.stderr)
    if report["interrupted"]:
        print(f"\nturbolm: interrupted; the report in {args.out} covers {report['questions_measured']} question(s)",
              file=sys.stderr)
        return 130
    return 0


def cmd_eval(args) -> int:
    from .evaluation.command import cmd_eval as run_eval

    return run_eval(args)


def cmd_prune(args) -> int:
    from .pruning.command import run

    return run(args)


COMMANDS = {"generate": cmd_generate, "info": cmd_info, "demo": cmd_demo, "draft": cmd_draft, "bench": cmd_bench,
            "prune": cmd_prune, "eval": cmd_eval}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    _quiet_transformers()
    try:
        return COMMANDS[args.command](args)
    except TurboLMError as e:
        print(f"turbolm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nturbolm: interrupted", file=sys.stderr)
        return 130


def _quiet_transformers() -> None:
    """Progress bars and advisory warnings from transformers would clutter a streamed answer."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
