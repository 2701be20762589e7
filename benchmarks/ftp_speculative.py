"""FTP prefill + speculative decoding, side by side in one process, on long prompts.

    python benchmarks/ftp_speculative.py --per-category 5            # summarization + RAG, 128 new tokens
    python benchmarks/ftp_speculative.py --method hybrid --pruner turbolm/checkpoints/ftp-smollm2-135m-s40

Per question (first turn, chat template, greedy), four configurations run back to back in a
rotating order (machine drift hits all alike): dense vanilla, FTP only (pruned prefill, then
vanilla decoding), speculative only, and both (pruned prefill, then speculative decoding; what
`turbolm generate --pruner P --speculative M` does). Records time to first token (the prefill),
end-to-end seconds, tokens/s and tau, and checks losslessness on the way: speculative answers
must equal vanilla's with the same prefill (dense or pruned). The speculative decoder (with
``--tree auto``) is built once, on the dense model, before any pruning. Resumable: records go
to OUT/records.jsonl as they come; a rerun skips what is there. OUT/report.md is the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from turbolm.bench.specbench import load_questions, select_questions  # noqa: E402
from turbolm.core.chat import encode_chat  # noqa: E402
from turbolm.core.io import write_text  # noqa: E402
from turbolm.core.kernels import apply_fast_cpu  # noqa: E402
from turbolm.core.machine import describe_machine  # noqa: E402
from turbolm.core.models import describe_model, load_target  # noqa: E402
from turbolm.pruning import PrunerSpec, build_pruned  # noqa: E402
from turbolm.speculative import DecoderSpec, build_decoder  # noqa: E402

CONFIGS = ("dense vanilla", "FTP only", "speculative only", "FTP + speculative")
PLACEHOLDERS = "FTP + speculative, placeholders"  # --placeholders: the same with the prompt's cache uncompacted


def run_one(config: str, ids, decoders, pruned, max_new_tokens: int) -> dict:
    decoder = decoders["spec"] if "speculative" in config else decoders["vanilla"]
    pruned.patch.compact_prompt = config != PLACEHOLDERS
    with pruned if config.startswith("FTP") else nullcontext():
        pruned.patch.reset_stats()
        r = decoder.generate(ids, max_new_tokens=max_new_tokens)
    rec = {"config": config, "prompt_tokens": len(ids), "new_tokens": r.new_tokens, "ttft": round(r.prefill_seconds, 4),
           "seconds": round(r.seconds, 4), "tau": round(r.tau, 3) if "speculative" in config else 1.0,
           "token_ids": r.token_ids}
    if config.startswith("FTP"):
        rec["prefill_sparsity"] = round(pruned.stats.prefill_sparsity, 4)
    return rec


def repeated_share(ids: list[int], n: int = 4) -> float:
    """The share of an answer's token n-grams that repeat an earlier one (0: none). Speculative decoding
    (prompt lookup above all) drafts repetitive text well, so an answer that turns repetitive after a
    pruned prefill gets faster to decode without the method being faster: this column shows it."""
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def report(records: list[dict], header: dict) -> str:
    lines = ["# FTP prefill + speculative decoding on long prompts", "",
             "Machine: " + json.dumps(header["machine"]), "",
             "Settings: " + json.dumps(header["settings"]), "",
             "Per configuration, means over the questions (every configuration answered every question):",
             "time to first token (TTFT, the prefill), end-to-end seconds, new tokens, tokens/s (sum of tokens",
             "over sum of seconds), tau, the share of repeated 4-grams in the answers (the dense model's own",
             "answers are the reference: a pruned prefill that makes the answers more repetitive makes them",
             "easier to draft); the last columns are the ratios to speculative only (> 1: faster).", ""]
    by_cat: dict = {}
    for r in records:
        by_cat.setdefault(r["category"], []).append(r)
    for cat, rs in [*by_cat.items(), ("all", records)]:
        lines += [f"## {cat} ({len({r['question_id'] for r in rs})} questions)", "",
                  "| configuration | TTFT s | end-to-end s | new tokens | tokens/s | tau | repeated 4-grams "
                  "| TTFT ratio | end-to-end ratio |",
                  "|---|---|---|---|---|---|---|---|---|"]
        base = [r for r in rs if r["config"] == "speculative only"]
        b_ttft = statistics.mean(r["ttft"] for r in base)
        b_e2e = statistics.mean(r["seconds"] for r in base)
        for c in [c for c in (*CONFIGS, PLACEHOLDERS) if any(r["config"] == c for r in rs)]:
            cr = [r for r in rs if r["config"] == c]
            ttft, e2e = statistics.mean(r["ttft"] for r in cr), statistics.mean(r["seconds"] for r in cr)
            toks = sum(r["new_tokens"] for r in cr)
            tau = statistics.mean(r["tau"] for r in cr)
            repeated = statistics.mean(repeated_share(r["token_ids"]) for r in cr)
            lines.append(f"| {c} | {ttft:.3f} | {e2e:.2f} | {toks / len(cr):.0f} | {toks / sum(r['seconds'] for r in cr):.1f} "
                         f"| {tau:.2f} | {repeated:.2f} | {b_ttft / ttft:.2f}x | {b_e2e / e2e:.2f}x |")
        lines.append("")
    same = sum(r["lossless"] for r in records if "speculative" in r["config"])
    n = sum(1 for r in records if "speculative" in r["config"])
    ftp = [r for r in records if r["config"] == "FTP only"]
    changed = sum(r["differs_from_dense"] for r in ftp)
    lines += [f"Lossless: {same} of {n} speculative answers equal vanilla decoding's after the same prefill"
              + (" (with placeholders: after the compacted prefill)" if any(r["config"] == PLACEHOLDERS for r in records)
                 else "") + ".",
              f"The pruned prefill changed {changed} of {len(ftp)} answers (against the dense model's).", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--questions", default="../shared/data/spec_bench/question.jsonl")
    ap.add_argument("--categories", default="summarization,rag")
    ap.add_argument("--per-category", type=int, default=5)
    ap.add_argument("--pruner", default="turbolm/checkpoints/ftp-smollm2-135m-s30")
    ap.add_argument("--method", default="prompt-lookup", help="the speculative method (prompt-lookup, jakiro, hybrid, ...)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--placeholders", action="store_true",
                    help=f"a fifth configuration, {PLACEHOLDERS!r}: the pruned prompt's cache with an entry per "
                         "position, the skipped ones masked (the form before it was held compacted; an A/B)")
    ap.add_argument("--out", default="runs/ftp_speculative")
    args = ap.parse_args()

    model, tokenizer = load_target(None, dtype=args.dtype)
    apply_fast_cpu(model, "auto")
    decoders = {"vanilla": build_decoder(model, tokenizer, DecoderSpec("none")),
                "spec": build_decoder(model, tokenizer, DecoderSpec(args.method), log=lambda m: print(m, file=sys.stderr))}
    if decoders["spec"].tree_choice is not None:
        print(decoders["spec"].tree_choice.explain(), file=sys.stderr)
    pruned = build_pruned(model, tokenizer, PrunerSpec(checkpoint=args.pruner, prefill_only=True))
    header = {"machine": {**describe_machine(), **describe_model(model)},
              "settings": {"pruner": args.pruner, "method": args.method, "max_new_tokens": args.max_new_tokens,
                           "dtype": args.dtype, "placeholders": args.placeholders, "categories": args.categories, "per_category": args.per_category,
                           "greedy": True, "tree": vars(decoders["spec"].tree).copy() if hasattr(decoders["spec"], "tree") else None}}
    print(json.dumps(header), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "records.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    done = {(r["question_id"], r["config"]) for r in records}
    questions = select_questions(load_questions(args.questions)[0], args.categories.split(","), None, args.per_category)
    ids0 = encode_chat(tokenizer, [{"role": "user", "content": questions[0].turns[0]}])
    configs = CONFIGS + (PLACEHOLDERS,) * args.placeholders
    for c in configs:  # warm-up, untimed
        run_one(c, ids0[:256], decoders, pruned, 8)
    for i, q in enumerate(questions):
        ids = encode_chat(tokenizer, [{"role": "user", "content": q.turns[0]}])
        order = configs[i % len(configs):] + configs[:i % len(configs)]
        got = {r["config"]: r for r in records if r["question_id"] == q.question_id}
        for c in order:
            if (q.question_id, c) in done:
                continue
            got[c] = rec = {"question_id": q.question_id, "category": q.category, **run_one(c, ids, decoders, pruned,
                                                                                             args.max_new_tokens)}
            print(f"{q.category} {q.question_id} {c}: {rec['prompt_tokens']} prompt tokens, TTFT {rec['ttft']:.3f} s, "
                  f"{rec['new_tokens']} tokens in {rec['seconds']:.2f} s, tau {rec['tau']:.2f}", flush=True)
        for c, r in got.items():  # losslessness and the pruning's effect, once all four are in
            r["lossless"] = r["token_ids"] == got["FTP only" if c.startswith("FTP") else "dense vanilla"]["token_ids"]
            r["differs_from_dense"] = r["token_ids"] != got["dense vanilla"]["token_ids"]
        with path.open("a") as f:
            for c in order:
                if (q.question_id, c) not in done:
                    f.write(json.dumps(got[c]) + "\n")
        records = [r for r in records if r["question_id"] != q.question_id] + list(got.values())
        done |= {(q.question_id, c) for c in configs}
    text = report(records, header)
    write_text(out / "report.md", text)
    write_text(out / "header.json", json.dumps(header, indent=1))
    print(text)


if __name__ == "__main__":
    main()
