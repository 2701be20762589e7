"""Checks every speculative-decoding and draft-training path on one device with tiny random
models (no data, no download), before spending accelerator time on the real model.

  python benchmarks/device_check.py --device cuda --dtype bfloat16

Each check prints OK or FAIL with the error and the run goes on; the exit status is the number
of failed checks. Greedy checks compare token ids with vanilla decoding on the same device.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import make_model_dir  # noqa: E402  (the test suite's tiny random models)
from turbolm import SamplingParams, encode_prompt, generate, load_target  # noqa: E402
from turbolm.speculative import SpeculativeGenerator, TreeConfig  # noqa: E402
from turbolm.speculative.draft.model import DraftConfig, DraftModel, load_draft  # noqa: E402
from turbolm.speculative.proposers.jakiro import JakiroProposer  # noqa: E402
from turbolm.speculative.proposers.prompt_lookup import PromptLookupProposer  # noqa: E402
from turbolm.speculative.proposers.small_model import ModelProposer, truncated_draft  # noqa: E402

PROMPTS = ["The capital of France is", "def add(a, b):", "Write a short poem about the sea"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--archs", default="llama,qwen2,gemma2")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="turbolm-device-check-"))
    failed = []

    def check(name, fn):
        try:
            detail = fn()
            print(f"OK   {name}" + (f"  {detail}" if detail else ""), flush=True)
        except Exception:  # a check harness: report and go on
            failed.append(name)
            print(f"FAIL {name}\n{traceback.format_exc()}", flush=True)

    for arch in args.archs.split(","):
        src = make_model_dir(work / arch, arch)
        target, tok = load_target(src, dtype=args.dtype, device=args.device)
        drafts = {
            "prompt-lookup": lambda: PromptLookupProposer(),
            "model": lambda: ModelProposer(truncated_draft(target, 1), tok),
        }
        for kind in ("jakiro", "eagle2"):
            d = DraftModel(DraftConfig.for_target(target, arch=kind, draft_vocab_size=64 if kind == "eagle2" else 0))
            d.save(work / f"{arch}-{kind}")
            drafts[kind] = lambda p=work / f"{arch}-{kind}": JakiroProposer(load_draft(p, target), target, TreeConfig(12, 4, 3))

        def greedy(make):
            def run():
                gen = SpeculativeGenerator(target, tok, make())
                for p in PROMPTS:
                    ids = encode_prompt(tok, p)
                    ref = generate(target, tok, ids, max_new_tokens=24)
                    res = gen.generate(ids, max_new_tokens=24)
                    assert res.token_ids == ref.token_ids, (p, res.token_ids, ref.token_ids)
                return f"tau {res.tau:.2f}"
            return run

        def sampled(make):
            def run():
                gen = SpeculativeGenerator(target, tok, make())
                res = gen.generate(encode_prompt(tok, PROMPTS[0]), max_new_tokens=16,
                                   sampling=SamplingParams(temperature=0.8, top_p=0.9, seed=0))
                assert res.new_tokens > 0
            return run

        for name, make in drafts.items():
            check(f"{arch} {args.dtype} greedy {name} == vanilla", greedy(make))
            check(f"{arch} {args.dtype} sampling {name}", sampled(make))

    def prepare_and_train():
        from turbolm.speculative.draft.data import prepare_features
        from turbolm.speculative.draft.train import TrainConfig, train

        src = work / "llama"
        data = work / "rows.json"
        data.write_text(json.dumps([{"instruction": p, "input": "", "output": "Paris is the capital."} for p in PROMPTS * 4]))
        prepare_features(str(src), data, work / "prep", regenerate=True, regen_max_new_tokens=16, batch_size=4,
                         device=args.device, progress=False)
        out = train(TrainConfig(data=str(work / "prep"), out=str(work / "trained"), target=str(src), epochs=1,
                                batch_size=2, eval_samples=2, draft_vocab_size=32), progress=False)
        assert out["finished"]
        return f"{out['step']} steps on {'cuda' if torch.cuda.is_available() else 'cpu'}"

    check("draft prepare --regenerate + train (accelerate)", prepare_and_train)
    print(f"{len(failed)} failed: {failed}" if failed else "all device checks passed")
    return len(failed)


if __name__ == "__main__":
    sys.exit(main())
