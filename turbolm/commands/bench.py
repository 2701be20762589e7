"""``turbolm bench spec``: Spec-Bench - every decoding method on the same questions, in one process;
``turbolm bench serve``: ``turbolm serve`` under concurrent clients, in several configurations."""

from __future__ import annotations

import sys
from pathlib import Path

from ..core.errors import ParameterError
from ..core.interrupts import sigterm_as_interrupt
from .common import add_model_args

#: SpecBenchConfig parameters spelled otherwise on this command line
FLAGS = {"drafts": "--draft", "hybrid_mode": "--hybrid"}


def register(sub) -> None:
    from ..bench.specbench import METHODS, OPTIONAL_METHODS

    b = sub.add_parser("bench", help="benchmarks")
    kinds = b.add_subparsers(dest="bench_command", required=True)
    p = kinds.add_parser("spec", help="Spec-Bench: speedup, tau and losslessness of every decoding method on the same questions")
    p.add_argument("--questions", required=True, help="Spec-Bench jsonl: question_id, category, turns (list of strings)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)} "
                   f"(default: all; vanilla, the baseline, always runs), and on request {', '.join(OPTIONAL_METHODS)}: "
                   "llama.cpp on the model's GGUF file (needs pip install 'turbolm[llamacpp]')")
    p.add_argument("--llama-cpp-gguf", default=None, metavar="FILE",
                   help="the GGUF file of the same model for the llama-cpp methods (default: the model's own, when "
                        "--model is a GGUF file or the default model)")
    p.add_argument("--draft", action="append", default=[], metavar="NAME=DIR",
                   help="draft checkpoint for eagle2, jakiro or hybrid (repeatable; default: the shipped one; hybrid: "
                        "jakiro's)")
    p.add_argument("--hybrid", dest="hybrid_mode", choices=["merge", "choose"], default=None,
                   help="the strategy of method hybrid (prompt lookup with a trained draft): merge (default) or choose")
    add_model_args(p)
    p.add_argument("--max-new-tokens", type=int, default=256, help="most new tokens per turn (default: 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling (default: 0)")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions (after --categories)")
    p.add_argument("--per-category", type=int, default=None, help="only the first N questions of each category")
    p.add_argument("--tree", choices=["auto", "fixed"], default=None,
                   help="auto (default unless --total-tokens/--depth/--top-k): eagle2 / jakiro / hybrid trees sized for this "
                        "machine as `generate` does; fixed: each method's default tree or the flags below")
    p.add_argument("--retime", action="store_true",
                   help="with --tree auto: time the target and the drafts again instead of using the cached timings")
    p.add_argument("--categories", default=None, help="comma list of categories to run (default: all)")
    p.add_argument("--total-tokens", type=int, default=None,
                   help="most nodes in a draft tree, the root not counted (default: each method's own)")
    p.add_argument("--depth", type=int, default=None,
                   help="most levels in a draft tree, below the root (default: each method's own)")
    p.add_argument("--top-k", type=int, default=None, help="branches per tree node (default: each method's own)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up questions per method (default: 1)")
    p.add_argument("--out", default="runs/spec_bench", help="output directory (default: runs/spec_bench); one that "
                   "holds a run needs --resume or --overwrite")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the run in --out: measure only the questions it has not finished (its settings "
                            "must be the same; --limit / --categories / --per-category may select more questions)")
    again.add_argument("--overwrite", action="store_true",
                       help="measure again into --out; the old results are replaced when the new run is complete or "
                            "has measured as many questions (an interrupted shorter run leaves them)")
    p.set_defaults(run=run, flags=FLAGS)
    register_serve(kinds)


def register_serve(kinds) -> None:
    from ..bench.serve import CONFIGS, DEFAULT_PRUNER, ServeBenchConfig

    d = ServeBenchConfig("")
    p = kinds.add_parser("serve", help="turbolm serve under 1..N concurrent streaming clients, in several server "
                                       "configurations: tokens/s, time to first token, inter-token latency, memory")
    p.add_argument("--questions", required=True, help="Spec-Bench jsonl: short first turns are the requests; "
                                                      "summarization / RAG turns build the long prompts")
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help="comma list of vanilla (one request at a time), batched (continuous batching), speculative "
                        "(+ --speculative for requests that arrive to an idle server), ftp (+ --pruner: FTP prefill) "
                        "(default: all)")
    p.add_argument("--clients", default=",".join(map(str, d.clients)),
                   help=f"concurrency levels, comma list (default: {','.join(map(str, d.clients))})")
    p.add_argument("--requests", type=int, default=d.requests,
                   help=f"requests per level: this many times the clients, in one queue (default: {d.requests})")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help=f"max_tokens per request (default: {d.max_tokens})")
    p.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens,
                   help=f"the short prompts: first turns of at most this many tokens (default: {d.max_prompt_tokens})")
    p.add_argument("--long-prompt-tokens", type=int, default=d.long_prompt_tokens,
                   help=f"length of the long prompts, sent one at a time for their time to first token (default: "
                        f"{d.long_prompt_tokens})")
    p.add_argument("--long-requests", type=int, default=d.long_requests,
                   help=f"how many long prompts (default: {d.long_requests}; 0: none)")
    p.add_argument("--max-batch", type=int, default=d.max_batch, help=f"the servers' --max-batch (default: {d.max_batch})")
    p.add_argument("--speculative", default=d.speculative, help=f"method of configuration speculative (default: "
                                                                f"{d.speculative})")
    p.add_argument("--pruner", default=DEFAULT_PRUNER, help="pruner of configuration ftp (default: the shipped 30%% one)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per server (default: torch's default)")
    add_model_args(p)
    p.add_argument("--out", default=d.out, help=f"output directory (default: {d.out}); the configurations it holds are "
                                                "kept (same settings) unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="measure every configuration again")
    p.set_defaults(run=run_serve, flags={"clients": "--clients", "configs": "--configs"})


def run_serve(args) -> int:
    from ..bench.serve import ServeBenchConfig, run_serve_bench

    try:
        clients = [int(c) for c in args.clients.split(",")]
    except ValueError:
        raise ParameterError(f"{{}} must be a comma list of counts, got {args.clients!r}", "clients") from None
    config = ServeBenchConfig(
        questions=args.questions, out=args.out, configs=[c.strip() for c in args.configs.split(",")], clients=clients,
        requests=args.requests, max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens,
        long_prompt_tokens=args.long_prompt_tokens, long_requests=args.long_requests, max_batch=args.max_batch,
        speculative=args.speculative, pruner=args.pruner, model=args.model, dtype=args.dtype, threads=args.threads,
        overwrite=args.overwrite,
        server_args=([] if args.fast_cpu == "auto" else ["--fast-cpu", args.fast_cpu])
        + ([] if args.device == "cpu" else ["--device", args.device]))
    with sigterm_as_interrupt():
        run_serve_bench(config, log=lambda m: print(m, file=sys.stderr, flush=True))
    print((Path(args.out) / "report.md").read_text())
    return 0


def run(args) -> int:
    from ..bench.specbench import SpecBenchConfig, run_spec_bench

    drafts = {}
    for d in args.draft:
        name, sep, path = d.partition("=")
        if not sep or not name or not path:
            raise ParameterError(f"{{}} {d!r}: expected NAME=DIR, e.g. {{}} jakiro=runs/my_jakiro", "drafts", "drafts")
        drafts[name.strip()] = path
    categories = [c.strip() for c in args.categories.split(",")] if args.categories else None
    manual = any(v is not None for v in (args.total_tokens, args.depth, args.top_k))
    config = SpecBenchConfig(
        questions=args.questions, out=args.out, methods=args.methods.split(","), model=args.model, device=args.device,
        dtype=args.dtype, max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
        limit=args.limit, categories=categories, drafts=drafts, total_tokens=args.total_tokens, depth=args.depth,
        top_k=args.top_k, hybrid_mode=args.hybrid_mode, warmup=args.warmup, fast_cpu=args.fast_cpu,
        per_category=args.per_category, retime=args.retime, resume=args.resume, overwrite=args.overwrite,
        tree=args.tree or ("fixed" if manual else "auto"), llama_cpp_gguf=args.llama_cpp_gguf,
    )
    with sigterm_as_interrupt():  # as Ctrl-C: the report covers the questions measured so far
        report = run_spec_bench(config, progress=True)
    if "kept_previous" in report:
        kept = report["kept_previous"]
        print(f"\nturbolm: interrupted after {report['questions_measured']} question(s); {args.out} keeps the previous "
              f"run ({kept['questions']} questions); the new results are in {kept['new_results']}", file=sys.stderr)
        return 130
    print((Path(args.out) / "report.md").read_text())
    if report["lossless"]["ok"] is False:
        print(f"turbolm: warning: {report['lossless']['ours_differing']} output(s) of turbolm's methods differ from "
              f"vanilla; see {args.out}/report.md", file=sys.stderr)
    if report["interrupted"]:
        print(f"\nturbolm: interrupted; the report in {args.out} covers {report['questions_measured']} question(s); "
              "continue with --resume", file=sys.stderr)
        return 130
    return 0
