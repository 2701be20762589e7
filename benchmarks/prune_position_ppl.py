"""Where in a window token skipping hurts: perplexity per quarter of each window, dense against
token routers (issue 18). A prefill pruner only needs the last positions' predictions; a
perplexity over every position also scores the skipped tokens' own predictions.

  python benchmarks/prune_position_ppl.py --text ../shared/data/text/enwiki_sample_8mb.jsonl \
      --spec static:0.3 --spec random:0.3 --spec ftp:turbolm/checkpoints/ftp-smollm2-135m-s30

--text: JSON Lines with a "text" field, or a plain text file. Windows of --window tokens start
--offset tokens into the text, one after another.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from turbolm import load_target
from turbolm.core.machine import describe_machine
from turbolm.pruning.factory import PrunerSpec, build_pruned


def windows(tokenizer, path: Path, n: int, size: int, offset: int) -> torch.Tensor:
    if path.suffix == ".jsonl":
        text = "\n".join(json.loads(line).get("text", "") for line in path.read_text().splitlines()[:2000])
    else:
        text = path.read_text()
    ids = tokenizer(text[: (offset + n * size) * 8], add_special_tokens=False)["input_ids"]
    if len(ids) < offset + n * size:
        raise SystemExit(f"{path} gives {len(ids)} tokens; need {offset + n * size}")
    return torch.tensor(ids[offset : offset + n * size]).view(n, size)


@torch.no_grad()
def nll(model, ids: torch.Tensor, pruned=None) -> torch.Tensor:
    """Negative log-likelihood of every next token, (windows, size - 1)."""
    if pruned is not None:
        pruned.attach()
    try:
        logits = model(input_ids=ids, use_cache=False).logits.float()
    finally:
        if pruned is not None:
            pruned.detach()
    return -logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]


def spec_of(text: str) -> PrunerSpec:
    kind, _, arg = text.partition(":")
    if kind == "ftp":
        return PrunerSpec(method="ftp", checkpoint=arg)
    return PrunerSpec(method=kind, sparsity=float(arg))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("--spec", action="append", required=True, help="static:S | random:S | ftp:CHECKPOINT")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--offset", type=int, default=5000)
    a = ap.parse_args()
    model, tok = load_target()
    ids = windows(tok, a.text, a.windows, a.window, a.offset)
    print(f"{describe_machine()}; {a.windows} windows of {a.window} tokens from {a.text}, offset {a.offset}")
    rows = [("dense", nll(model, ids))]
    rows += [(s, nll(model, ids, build_pruned(model, tok, spec_of(s)))) for s in a.spec]
    q = (a.window - 1) // 4
    print("| model | perplexity | 1st quarter | 2nd | 3rd | 4th |\n|---|---|---|---|---|---|")
    for name, loss in rows:
        parts = [math.exp(loss[:, i * q : (i + 1) * q].mean()) for i in range(4)]
        print(f"| {name} | {math.exp(loss.mean()):.4g} | " + " | ".join(f"{p:.4g}" for p in parts) + " |")


if __name__ == "__main__":
    main()
