"""How much of the target's sampling distribution do the trained drafts cover at the first tree level?

At temperature T a draft token is accepted with the target's probability of it (our rule:
recursive rejection over the draft's deterministic candidates, so the k candidates of a node
accept with the target mass of those k tokens). Standard speculative sampling instead *samples*
a candidate from the draft's own distribution q and accepts it with min(1, p/q): probability
sum_x min(p(x), q(x)), the overlap of the two distributions - higher than any fixed candidates
when the draft is well calibrated. This measures both on the draft's first level (the root's
children) while the draft decodes Spec-Bench first turns at temperature T (issue 15, the T = 1
goal): the mean overlap, and the target mass of the draft's top-1 and top-k candidates.

    python benchmarks/sampling_overlap.py --per-category 1 --max-new-tokens 64 \\
        --out benchmarks/results_spec_cpu/sampling_overlap.json

Nothing here is timed (it can share the machine). Writes its JSON atomically.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from turbolm.core.io import write_json  # noqa: E402


def main() -> int:
    from turbolm import load_target
    from turbolm.core.chat import encode_prompt
    from turbolm.core.generation import SamplingParams, logits_to_probs
    from turbolm.core.machine import cpu_model
    from turbolm.speculative import DecoderSpec, build_decoder
    from turbolm.speculative.proposers import jakiro

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--questions", default="../shared/data/spec_bench/question.jsonl")
    ap.add_argument("--per-category", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=4, help="candidates per node to compare with (default 4)")
    ap.add_argument("--methods", default="jakiro,eagle2",
                    help="trained drafts: jakiro, eagle2 (the shipped ones), or METHOD=DIR for another checkpoint")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    model, tokenizer = load_target(None)
    sampling = SamplingParams(temperature=a.temperature, seed=a.seed)
    questions, seen = [], {}
    for line in Path(a.questions).read_text(encoding="utf-8").splitlines():
        q = json.loads(line)
        if seen.get(q["category"], 0) < a.per_category:
            seen[q["category"]] = seen.get(q["category"], 0) + 1
            questions.append(q)
    result = {"temperature": a.temperature, "top_k": a.top_k, "questions": len(questions),
              "max_new_tokens": a.max_new_tokens, "machine": cpu_model(), "torch": torch.__version__, "methods": {}}
    for entry in a.methods.split(","):
        method, _, draft = entry.partition("=")
        decoder = build_decoder(model, tokenizer, DecoderSpec(method, draft=draft or None, total_tokens=a.top_k, depth=1,
                                                              top_k=a.top_k))
        proposer, rows, root = decoder.proposer, [], {}
        build = jakiro.build_dynamic_tree

        def keep_root(root_token, root_logprobs, expand, config, max_depth):
            root["q"] = root_logprobs.float().softmax(-1)  # the draft's level-1 distribution (T = 1)
            return build(root_token, root_logprobs, expand, config, max_depth)

        def verified(tree, logits):
            p = logits_to_probs(logits[0], sampling)
            q = logits_to_probs(root["q"].log(), sampling)  # the draft's own distribution at this T, top-k, top-p
            top = q.topk(a.top_k).indices
            rows.append([float(torch.minimum(p, q).sum()), float(p[top[0]]), float(p[top].sum()), float(p.max())])

        jakiro.build_dynamic_tree, proposer.verified = keep_root, verified
        try:
            for q in questions:
                decoder.generate(encode_prompt(tokenizer, q["turns"][0]), max_new_tokens=a.max_new_tokens,
                                 sampling=sampling)
        finally:
            jakiro.build_dynamic_tree = build
            del proposer.verified
        mean = torch.tensor(rows).mean(0).tolist()
        result["methods"][entry] = {"steps": len(rows), "overlap_sum_min_p_q": mean[0], "target_mass_draft_top1": mean[1],
                                     f"target_mass_draft_top{a.top_k}": mean[2], "target_max_prob": mean[3]}
        print(entry, json.dumps(result["methods"][entry]), flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(a.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
