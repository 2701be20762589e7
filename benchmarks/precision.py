"""float32, bfloat16, int8 and int4 (weight-only, ``--dtype int8`` / ``int4``) side by side in one process: vanilla
decoding speed and how often each low-precision model's greedy answer equals float32's.

    python benchmarks/precision.py --questions ../shared/data/spec_bench/question.jsonl --per-category 1

Per question (first turn, chat template, greedy, ``--max-new-tokens``), every dtype answers in a
rotating order (machine drift hits all alike), each with the kernels ``--fast-cpu auto`` measures
for it. Prints the machine, tokens/s per dtype, the ratio to float32, and per low-precision dtype
how many answers are identical to float32's and the mean length of the common prefix. Quality on
text: ``turbolm eval --dtype int8 --tasks wikitext`` (perplexity).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from turbolm.bench.specbench import first_difference, load_questions, select_questions  # noqa: E402
from turbolm.core.chat import encode_chat  # noqa: E402
from turbolm.core.generation import SamplingParams, generate  # noqa: E402
from turbolm.core.kernels import apply_fast_cpu, table_of  # noqa: E402
from turbolm.core.machine import describe_machine  # noqa: E402
from turbolm.core.models import load_target  # noqa: E402


def common_prefix(a: list[int], b: list[int]) -> int:
    """Tokens two answers share before they part (the shorter's length if one is a prefix of the other)."""
    d = first_difference([a], [b])
    return min(len(a), len(b)) if d is None else d["position"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--questions", required=True)
    ap.add_argument("--per-category", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--dtypes", default="float32,bfloat16,int8,int4")
    ap.add_argument("--out", help="write the numbers as JSON here")
    args = ap.parse_args()

    dtypes = args.dtypes.split(",")
    models = {}
    for dt in dtypes:
        model, tokenizer = load_target(None, dtype=dt)
        apply_fast_cpu(model, "auto")
        models[dt] = model
        table = table_of(model)
        print(f"{dt}: kernels {table.kernels if table else 'plain'}", flush=True)
    questions = select_questions(load_questions(args.questions)[0], None, None, args.per_category)
    greedy = SamplingParams()
    rates: dict = {dt: [] for dt in dtypes}
    answers: dict = {dt: [] for dt in dtypes}
    for i, q in enumerate(questions):
        ids = encode_chat(tokenizer, [{"role": "user", "content": q.turns[0]}])
        order = dtypes[i % len(dtypes):] + dtypes[: i % len(dtypes)]
        for dt in order:
            start = time.perf_counter()
            r = generate(models[dt], tokenizer, ids, args.max_new_tokens, greedy)
            rates[dt].append(r.new_tokens / (time.perf_counter() - start))
            answers[dt].append(r.token_ids)
        print(f"question {q.question_id} ({q.category}): " + ", ".join(f"{dt} {rates[dt][-1]:.1f}" for dt in dtypes),
              flush=True)
    machine = describe_machine()
    result = {"machine": machine, "max_new_tokens": args.max_new_tokens, "questions": len(questions), "dtypes": {}}
    print(f"\n{machine.get('cpu')} ({machine.get('cpu_count')} logical CPUs), torch threads "
          f"{machine.get('torch_threads')}; {len(questions)} questions, {args.max_new_tokens} tokens, greedy")
    base = dtypes[0]
    print(f"| dtype | tokens/s (mean) | vs {base} | answers identical to {base} | mean common prefix (tokens) |")
    print("|---|---|---|---|---|")
    for dt in dtypes:
        ratio = statistics.mean(a / b for a, b in zip(rates[dt], rates[base]))
        same = sum(a == b for a, b in zip(answers[dt], answers[base]))
        prefix = statistics.mean(common_prefix(a, b) for a, b in zip(answers[dt], answers[base]))
        result["dtypes"][dt] = {"tokens_per_second": statistics.mean(rates[dt]), "ratio": ratio,
                                "identical": same, "mean_common_prefix": prefix}
        print(f"| {dt} | {statistics.mean(rates[dt]):.1f} | {ratio:.2f}x | {same}/{len(questions)} | {prefix:.1f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
