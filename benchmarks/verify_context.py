"""How a tree verification's cost grows with the context: `--tree auto` times verification after a
192-token cache (``sizing.time_verification``); real answers run at hundreds of tokens of context.
Prints, for each cache length, the one-token step and the verification of n chain tokens (ms, the
fastest of a few), with the machine; writes them as JSON.

  python benchmarks/verify_context.py --out runs/verify_context.json [--model DIR] [--prefixes 16 192 512 1024]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from turbolm import load_target
from turbolm.core.kernels import apply_fast_cpu
from turbolm.core.machine import describe_machine
from turbolm.speculative.sizing import time_step, time_verification


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory or .gguf (default: the embedded default model)")
    ap.add_argument("--prefixes", type=int, nargs="+", default=[16, 192, 512, 1024])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 5, 9, 13, 17, 25, 33, 65])
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    model, _ = load_target(a.model)
    apply_fast_cpu(model, "auto")
    result = {"machine": describe_machine(), "threads": torch.get_num_threads(), "ms": {}}
    print(json.dumps(result["machine"]))
    for prefix in a.prefixes:
        step = time_step(model, prefix=prefix, repeats=7)
        verify = time_verification(model, tuple(a.sizes), prefix=prefix, repeats=5)
        row = {"step": round(step * 1e3, 1), **{str(n): round(v * 1e3, 1) for n, v in verify.items()}}
        result["ms"][prefix] = row
        print(f"cache {prefix:5d}: step {row['step']} ms; verify " + ", ".join(f"{n}: {row[str(n)]}" for n in a.sizes),
              flush=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
