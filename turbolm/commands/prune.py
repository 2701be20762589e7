"""``turbolm prune search | train | generate | bench | report``: the FTP steps as commands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..core.errors import ParameterError
from ..core.interrupts import Interrupted, sigterm_as_interrupt
from .common import add_model_args, load_model, read_prompt, write_out

#: PrunerSpec parameters spelled otherwise on this command line
FLAGS = {"checkpoint": "--pruner", "method": "--router"}

STEPS_HELP = """FTP token-wise pruning, in four steps:
  search    genetic search of the per-block sparsity schedule (mean = --sparsity) with the static router,
            fitness = minus the KL to the dense model on held-out calibration chunks of --data
  train     train the learned router (4 -> 64 -> 1, LLM frozen; distillation + sparsity + guide losses),
            then fine-tune the schedule once more with it; writes a pruner checkpoint
  generate  greedy generation with a pruner (prefill skips tokens; each new token runs a block only if
            the router's score passes the threshold)
  bench     prefill wall-clock, dense vs pruned, and the token sparsity achieved
  report    accuracy-retention table and plot from `turbolm eval` results of pruned models"""


def _data_args(p) -> None:
    p.add_argument("--data", required=True, action="append",
                   help="Alpaca or ShareGPT rows, or plain-text rows {\"text\": ...} (JSON list or .jsonl), e.g. "
                        "../shared/data/text/enwiki_sample_8mb.jsonl; repeat it to mix sources (they share the "
                        "held-out and training chunks evenly)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per chunk (default: 256)")
    p.add_argument("--calibration", type=int, default=8, help="held-out chunks for the fitness / held-out KL (default: 8)")
    p.add_argument("--score-last", type=int, default=None,
                   help="compare pruned and dense predictions on the last N positions of each chunk (default: seq_len/4)")


def _ga_args(p, generations: int) -> None:
    p.add_argument("--population", type=int, default=12, help="GA population (default: 12)")
    p.add_argument("--generations", type=int, default=generations, help=f"GA generations, the first included (default: {generations})")
    p.add_argument("--mutation", type=float, default=0.08, help="std of the gaussian mutation per block (default: 0.08)")
    p.add_argument("--max-block-sparsity", type=float, default=0.9, help="upper bound of one block's sparsity (default: 0.9)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")


def _pruner_args(p) -> None:
    p.add_argument("--pruner", default=None, help="pruner checkpoint directory (from `turbolm prune train`)")
    p.add_argument("--router", choices=["learned", "static", "random", "mod"], default=None,
                   help="router to use: default the checkpoint's; static / random need no checkpoint (with --sparsity)")
    p.add_argument("--sparsity", type=float, default=None, help="uniform sparsity for --router static/random without --pruner")
    p.add_argument("--schedule", default=None, help="per-block schedule from a search file (with --router static/random)")
    p.add_argument("--dense-kv", action="store_true",
                   help="skipped tokens still provide keys/values, from their input to the block (the ablation: "
                        "far worse on the shipped pruners, and about dense prefill time on a CPU)")
    p.add_argument("--prefill-only", action="store_true",
                   help="only the prompt skips tokens; every new token runs the dense model (what `turbolm generate "
                        "--pruner` does)")


def register(sub) -> None:
    pr = sub.add_parser("prune", help="FTP token-wise pruning: search, train, generate, bench, report",
                        description=STEPS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    steps = pr.add_subparsers(dest="prune_command", required=True)

    s = steps.add_parser("search", help="genetic search of the per-block sparsity schedule (static router)",
                         description="Search per-block token sparsity whose mean is --sparsity, maximising agreement "
                                     "with the dense model (minus the mean KL of next-token distributions on held-out "
                                     "chunks). Saved after every generation; --resume continues.")
    s.add_argument("--sparsity", type=float, required=True, help="mean token sparsity, e.g. 0.3")
    s.add_argument("--out", required=True, help="search result JSON (best schedule and fitness history)")
    s.add_argument("--router", choices=["static", "random"], default="static", help="router used during the search (default: static)")
    s.add_argument("--first-block-dense", action="store_true", help="pin block 0 to sparsity 0")
    s.add_argument("--resume", action="store_true", help="continue a search saved in --out")
    _data_args(s)
    _ga_args(s, generations=10)
    add_model_args(s, fast_cpu=False)
    s.set_defaults(run=cmd_search, flags=FLAGS)

    t = steps.add_parser("train", help="train the learned router, fine-tune the schedule, write a pruner checkpoint",
                         description="Train FTP's global router (LLM frozen) for a schedule from `prune search` (or a "
                                     "uniform one), then re-run a short schedule search with the trained router. "
                                     "Checkpoints every --save-every steps; --resume continues.")
    t.add_argument("--sparsity", type=float, required=True, help="mean token sparsity, e.g. 0.3")
    t.add_argument("--out", required=True, help="pruner checkpoint directory")
    t.add_argument("--schedule", default=None, help="search JSON from `prune search` (default: uniform)")
    t.add_argument("--router", choices=["learned", "mod"], default="learned",
                   help="learned: FTP's router on the four factors (default); mod: the Mixture-of-Depths-style "
                        "ablation, a linear score per block from the hidden state")
    t.add_argument("--steps", type=int, default=150, help="optimizer steps (default: 150)")
    t.add_argument("--batch-size", type=int, default=4, help="chunks per step (default: 4)")
    t.add_argument("--lr", type=float, default=1e-3, help="peak learning rate, cosine decay (default: 1e-3)")
    t.add_argument("--init", choices=["static", "static-saturated", "random"], default="static",
                   help="static (default): start the router exactly at the static router, free to leave it; "
                        "static-saturated: the first such start (steep slope, near-zero free units: it does not "
                        "leave it); random: default init")
    t.add_argument("--sparsity-weight", type=float, default=10.0, help="weight of the one-sided sparsity loss (default: 10)")
    t.add_argument("--guide-weight", type=float, default=1.0, help="initial weight of the guide loss (default: 1)")
    t.add_argument("--guide-steps", type=int, default=None, help="steps over which the guide weight decays to 0 (default: steps/2)")
    t.add_argument("--max-train-chunks", type=int, default=None, help="use at most N training chunks")
    t.add_argument("--drop-factor", action="append", default=[], choices=["position", "attention", "rank", "sparsity"],
                   help="ablation: train without this router input (repeatable)")
    t.add_argument("--block-inputs", action="store_true",
                   help="beyond the paper: the learned router also knows the block it scores (a hidden-layer bias "
                        "and a position offset per block, both zero at the start)")
    t.add_argument("--knots", type=int, default=16, help="with --block-inputs: points of each block's position offset (default: 16)")
    t.add_argument("--block-lr-scale", type=float, default=30.0,
                   help="with --block-inputs: the per-block parameters' learning rate in units of --lr (default: 30)")
    t.add_argument("--dense-kv", action="store_true", help="ablation: skipped tokens still provide keys/values")
    t.add_argument("--finetune-generations", type=int, default=5,
                   help="generations of the schedule search with the trained router (default: 5; 0 = skip)")
    t.add_argument("--save-every", type=int, default=20, help="checkpoint every N steps (default: 20)")
    t.add_argument("--eval-every", type=int, default=25,
                   help="measure the held-out KL every N steps; the best router measured is kept (default: 25)")
    t.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    _data_args(t)
    _ga_args(t, generations=5)
    add_model_args(t, fast_cpu=False)
    t.set_defaults(run=cmd_train, flags=FLAGS)

    g = steps.add_parser("generate", help="greedy generation with a pruner; prints the token sparsity achieved")
    g.add_argument("--prompt", required=True, help="the user prompt ('-' reads standard input)")
    g.add_argument("--raw", action="store_true", help="plain text, without the chat template")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--json", action="store_true", help="print one JSON object")
    _pruner_args(g)
    add_model_args(g, fast_cpu=False)
    g.set_defaults(run=cmd_generate, flags=FLAGS)

    b = steps.add_parser("bench", help="prefill seconds dense vs pruned (interleaved, median), speed-up, sparsity")
    b.add_argument("--prompt-length", type=int, action="append", required=True,
                   help="prompt tokens (repeatable: --prompt-length 512 --prompt-length 1024)")
    b.add_argument("--text-file", default=None, help="text for the prompts (default: WikiText-2 raw test if present)")
    b.add_argument("--repeat", type=int, default=3, help="timed runs of each (default: 3)")
    b.add_argument("--json", action="store_true", help="print one JSON object (a list for several lengths)")
    _pruner_args(b)
    add_model_args(b, fast_cpu=False)
    b.set_defaults(run=cmd_bench, flags=FLAGS)

    r = steps.add_parser("report", help="the accuracy-retention table and plot from `turbolm eval --out` files",
                         description="Reads every eval JSON in --results (one dense run, pruned runs from `turbolm "
                                     "eval --pruner/--baseline`), writes report.md, report.json and retention.png.")
    r.add_argument("--results", required=True, help="folder of `turbolm eval --json --out` files")
    r.add_argument("--out", default=None, help="output folder (default: --results)")
    r.set_defaults(run=cmd_report)


def pruner_spec(args):
    """The PrunerSpec of --pruner / --router / --sparsity / --schedule / --dense-kv / --prefill-only."""
    from ..pruning import PrunerSpec

    if args.pruner:
        return PrunerSpec(checkpoint=args.pruner, router=args.router, dense_kv=args.dense_kv,
                          prefill_only=args.prefill_only).check()
    return PrunerSpec(method=args.router or "ftp", sparsity=args.sparsity, schedule=args.schedule,
                      dense_kv=args.dense_kv, prefill_only=args.prefill_only).check()


def _search_config(args):
    from ..pruning.genetic import SearchConfig

    return SearchConfig(population=args.population, generations=args.generations, mutation=args.mutation,
                        max_sparsity=args.max_block_sparsity, seed=args.seed)


def _chunks_and_reference(args, model, tokenizer, max_train=None):
    from ..pruning.calibration import DenseReference
    from ..pruning.data import pack_rows

    chunks = pack_rows(tokenizer, args.data, args.seq_len, args.calibration, max_train=max_train)
    print(f"data: {chunks.describe()}", file=sys.stderr)
    return chunks, DenseReference(model, chunks.calibration, score_last=args.score_last)


def _check_sparsity(s: float) -> None:
    if not 0.0 < s < 0.9:
        raise ParameterError(f"{{}} {s}: give a mean token sparsity in (0, 0.9), e.g. 0.3", "sparsity")


def cmd_search(args) -> int:
    from ..pruning.router import make_router
    from ..pruning.search import check_out, run_search

    _check_sparsity(args.sparsity)
    check_out(args.out, args.resume)  # before the model loads: a refusal is immediate
    model, tokenizer = load_model(args)
    _, reference = _chunks_and_reference(args, model, tokenizer, max_train=0)
    with sigterm_as_interrupt():  # as Ctrl-C: the search is saved after every generation
        result = run_search(model, make_router(args.router, seed=args.seed), reference, args.sparsity, args.out,
                            _search_config(args), resume=args.resume, first_block_dense=args.first_block_dense)
    print(json.dumps({"out": args.out, "best_fitness": result.best_fitness, "evaluations": result.evaluations,
                      "schedule": [round(s, 3) for s in result.best]}))
    return 0


def cmd_train(args) -> int:
    from ..pruning.factors import FACTOR_NAMES
    from ..pruning.genetic import uniform_schedule
    from ..pruning.search import read_schedule
    from ..pruning.skipping import decoder_layers
    from ..pruning.train import RouterTrainConfig, check_out, train_pruner

    _check_sparsity(args.sparsity)
    check_out(args.out, args.resume)  # before the model loads: a refusal is immediate
    inputs = [f for f in FACTOR_NAMES if f not in args.drop_factor]
    if not inputs:
        raise ParameterError("{} removed every router input", "drop_factor")
    if args.block_inputs and args.router != "learned":
        raise ParameterError(f"{{}} is an option of the learned router, not of --router {args.router}", "block_inputs")
    if args.block_inputs and args.knots < 2:
        raise ParameterError(f"{{}} must be >= 2 (the position offset's end points), got {args.knots}", "knots")
    model, tokenizer = load_model(args)
    n = len(decoder_layers(model))
    schedule = read_schedule(args.schedule) if args.schedule else uniform_schedule(n, args.sparsity)
    if len(schedule) != n or abs(sum(schedule) / n - args.sparsity) > 1e-3:
        raise ParameterError(f"the schedule in {args.schedule} has {len(schedule)} blocks of mean "
                             f"{sum(schedule) / len(schedule):.3f}; the model has {n} and {{}} is {args.sparsity}",
                             "sparsity")
    chunks, reference = _chunks_and_reference(args, model, tokenizer, max_train=args.max_train_chunks)
    cfg = RouterTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, sparsity_weight=args.sparsity_weight,
                            guide_weight=args.guide_weight, guide_steps=args.guide_steps or max(1, args.steps // 2),
                            inputs=inputs, block_inputs=args.block_inputs, knots=args.knots,
                            block_lr_scale=args.block_lr_scale, dense_kv=args.dense_kv, score_last=args.score_last, init=args.init,
                            save_every=args.save_every, eval_every=args.eval_every, seed=args.seed)
    try:
        with sigterm_as_interrupt():
            info = train_pruner(model, chunks, reference, args.out, schedule, cfg, target_sparsity=args.sparsity,
                                router_kind=args.router, search_config=_search_config(args),
                                finetune_generations=args.finetune_generations, resume=args.resume,
                                provenance={"training": {"data": [str(d) for d in args.data], "seq_len": args.seq_len},
                                            "search_schedule": args.schedule})
    except Interrupted as e:  # the state is saved: say where, and how to continue
        print(f"\nturbolm: {e}", file=sys.stderr)
        return 130
    print(json.dumps({"out": str(args.out), **info["heldout_kl"]}))
    return 0


def cmd_generate(args) -> int:
    from ..core.chat import encode_prompt
    from ..core.generation import generate
    from ..pruning import build_pruned

    spec = pruner_spec(args)
    model, tokenizer = load_model(args)
    pruner = build_pruned(model, tokenizer, spec)
    ids = encode_prompt(tokenizer, read_prompt(args.prompt), chat=not args.raw)
    with pruner:
        res = generate(model, tokenizer, ids, max_new_tokens=args.max_new_tokens, on_text=None if args.json else write_out)
    stats = pruner.stats.to_json()
    if args.json:
        print(json.dumps({"text": res.text, "token_ids": res.token_ids, "prompt_tokens": res.prompt_tokens,
                          "new_tokens": len(res.token_ids), "seconds": round(res.seconds, 3), **stats}))
    else:
        print(f"\n[{len(res.token_ids)} tokens, prefill token sparsity {stats['prefill_sparsity']:.1%}, "
              f"blocks skipped by new tokens {stats['decode_sparsity']:.1%}]", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    from ..core.machine import describe_machine
    from ..core.models import describe_model
    from ..pruning import build_pruned
    from ..pruning.bench import check_bench, prefill_benchmark, prompt_ids

    check_bench(args.prompt_length, args.repeat)
    spec = pruner_spec(args)
    model, tokenizer = load_model(args)
    check_bench(args.prompt_length, args.repeat, model, tokenizer)
    pruner = build_pruned(model, tokenizer, spec).patch
    rows = []
    with sigterm_as_interrupt():
        for n in args.prompt_length:
            ids, source = prompt_ids(tokenizer, n, args.text_file)
            row = prefill_benchmark(model, pruner, ids, repeat=args.repeat)
            row["text"] = source
            rows.append(row)
            if not args.json:
                print(f"{n:>6} tokens: dense {row['dense_seconds']:.3f} s, pruned {row['pruned_seconds']:.3f} s, "
                      f"speed-up {row['speedup']:.2f}x, token sparsity {row['token_sparsity']:.1%}", flush=True)
    if args.json:
        for r in rows:
            r["machine"] = {**describe_machine(), **describe_model(model)}
            r["pruner"] = args.pruner or f"{args.router} router"
        print(json.dumps(rows[0] if len(rows) == 1 else rows))
    return 0


def cmd_report(args) -> int:
    from ..pruning.report import write_report

    out = args.out or args.results
    write_report(args.results, out)
    print((Path(out) / "report.md").read_text())
    return 0


