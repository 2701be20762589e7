"""CPU forward time over a few new tokens, with a KV cache, on the default model: plain PyTorch
vs the fast paths (turbolm.core.kernels and the alternatives it was chosen over).

Each forward runs ``n`` new tokens after a cached prompt (``--prompt-tokens``, 200), as a
decoding step (n = 1) or a tree verification (n > 1) does, then the cache is cropped back.
The options are measured interleaved (every option once per round, rounds repeated) so that
load from other processes hits them alike; the table shows medians in ms.

  python benchmarks/cpu_forward.py                  # the table (~2 minutes on 2 idle cores; much
                                                    # longer if other jobs load them: see the 2-thread rows)
  python benchmarks/cpu_forward.py --json           # the same as one JSON object
  python benchmarks/cpu_forward.py --compile        # also torch.compile (slow to compile)

Options: ``baseline`` (fp32, F.linear), ``fastpath`` (optimize_for_small_batches with every fast
kernel: ``--fast-cpu on``), ``auto`` (the kernel table measured on this machine: ``--fast-cpu auto``; ``auto apart``: the same
without computing sibling layers as one product),
``transposed`` (every linear as ``(W @ x.T).T`` for <= 16 rows), ``bf16`` (bf16 weights) and
``bf16 fastpath`` / ``bf16 auto``, the baseline and fastpath at 1 thread (if torch uses more; ``--no-one-thread`` skips them); ``max|dlogit|`` is the
largest logit difference from the baseline over all row counts and ``argmax`` whether every
row's argmax agrees with it.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from turbolm import load_target
from turbolm.core.generation import forward, new_cache
from turbolm.core.kernels import linear as fast_linear
from turbolm.core.kernels import optimize_for_small_batches, table_of
from turbolm.speculative.cache import truncate

ROWS = (1, 2, 4, 8, 16, 32, 64)


class TransposedLinear(nn.Linear):
    """The issue's first trick, for comparison: ``(W @ x.T).T`` for few fp32 rows."""

    def forward(self, x):
        rows = x.numel() // x.shape[-1]
        if rows > 16 or x.dtype is not torch.float32 or torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        y = torch.mm(self.weight, x.reshape(rows, -1).t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], -1)


def transposed(model):
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__class__ = TransposedLinear
    return model


def cpu_name() -> str:
    from turbolm.core.machine import cpu_model

    return cpu_model()


def machine() -> dict:
    return {
        "cpu": cpu_name(),
        "logical_cpus": torch.multiprocessing.cpu_count() if hasattr(torch, "multiprocessing") else None,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "python": platform.python_version(),
    }


def median_ms(xs) -> float:
    return statistics.median(xs) * 1000


def time_forwards(options: dict, prompt: torch.Tensor, rows, repeats: int, threads: int):
    """{option: {n: median ms}} and {option: (max |dlogit| vs baseline, argmax all equal)}."""
    caches = {}
    with torch.inference_mode():
        for model, _ in options.values():
            if id(model) not in caches:
                cache = new_cache(model)
                forward(model, prompt, cache)
                caches[id(model)] = cache
        p = prompt.shape[1]
        gen = torch.Generator().manual_seed(0)
        times = {name: {n: [] for n in rows} for name in options}
        error = {name: [0.0, True] for name in options}
        for n in rows:
            ids = torch.randint(0, 1000, (1, n), generator=gen)
            ref = None
            for r in range(repeats + 1):  # round 0 warms up and checks the logits
                for name, (model, nthreads) in options.items():
                    torch.set_num_threads(nthreads or threads)
                    cache = caches[id(model)]
                    t0 = time.perf_counter()
                    logits = forward(model, ids, cache).logits[0].float()
                    dt = time.perf_counter() - t0
                    truncate(cache, p)
                    if r == 0:
                        if ref is None:
                            ref = logits
                        error[name][0] = max(error[name][0], float((logits - ref).abs().max()))
                        error[name][1] &= bool((logits.argmax(-1) == ref.argmax(-1)).all())
                    else:
                        times[name][n].append(dt)
        torch.set_num_threads(threads)
    return {name: {n: median_ms(v) for n, v in t.items()} for name, t in times.items()}, error


def time_lm_head(weight: torch.Tensor, rows, repeats: int):
    """The lm_head product alone: {variant: {n: median ms}}."""
    wb = weight.bfloat16()
    variants = {
        "F.linear": lambda x: F.linear(x, weight),
        "(W@x.T).T": lambda x: torch.mm(weight, x.t()).t(),
        "fastpath.linear": lambda x: fast_linear(x, weight, force=True),
        "bf16 F.linear": lambda x: F.linear(x.bfloat16(), wb),
    }
    times = {k: {n: [] for n in rows} for k in variants}
    with torch.inference_mode():
        for n in rows:
            x = torch.randn(n, weight.shape[1])
            for f in variants.values():
                f(x)
            for _ in range(repeats):
                for k, f in variants.items():
                    t0 = time.perf_counter()
                    f(x)
                    times[k][n].append(time.perf_counter() - t0)
    return {k: {n: median_ms(v) for n, v in t.items()} for k, t in times.items()}


def compile_option(model, prompt, rows):
    """A torch.compile'd copy (dynamic shapes) and its compile cost: first call per row count."""
    compiled = copy.deepcopy(model)
    compiled.forward = torch.compile(compiled.forward, dynamic=True)
    cost = {}
    with torch.inference_mode():
        cache = new_cache(compiled)
        t0 = time.perf_counter()
        forward(compiled, prompt, cache)
        cost["prefill"] = time.perf_counter() - t0
        p = prompt.shape[1]
        for n in rows:
            t0 = time.perf_counter()
            forward(compiled, torch.zeros(1, n, dtype=torch.long), cache)
            cost[n] = time.perf_counter() - t0
            truncate(cache, p)
    return compiled, cost


def print_table(title, table, extra=None):
    rows = list(next(iter(table.values())))
    print(f"\n{title}")
    head = f"{'':>18}" + "".join(f"{n:>8}" for n in rows) + ("   max|dlogit|  argmax" if extra else "")
    print(head)
    for name, t in table.items():
        line = f"{name:>18}" + "".join(f"{t[n]:8.1f}" for n in rows)
        if extra:
            err, same = extra[name]
            line += f"   {err:11.2e}  {'same' if same else 'DIFFERS'}"
        print(line)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="another model (directory or .gguf) than the default")
    ap.add_argument("--rows", type=int, nargs="+", default=list(ROWS))
    ap.add_argument("--prompt-tokens", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-one-thread", action="store_true", help="skip the 1-thread rows")
    ap.add_argument("--no-bf16", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also torch.compile(dynamic=True) (minutes)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    threads = torch.get_num_threads()
    base, _ = load_target(args.model)
    prompt = torch.randint(0, 1000, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(1))
    options = {"baseline": (base, None)}
    # Deep copies that share the weights (no copy) but swap the linear layers' class.
    shared = {id(t): t for t in list(base.parameters()) + list(base.buffers())}
    options["fastpath"] = (optimize_for_small_batches(copy.deepcopy(base, dict(shared)), force=True), None)
    options["auto"] = (optimize_for_small_batches(copy.deepcopy(base, dict(shared)), mode="auto"), None)
    options["auto apart"] = (optimize_for_small_batches(copy.deepcopy(base, dict(shared)), mode="auto", join=False), None)
    options["transposed"] = (transposed(copy.deepcopy(base, dict(shared))), None)
    if not args.no_bf16:
        bf16 = copy.deepcopy(base).to(torch.bfloat16)
        bf16_shared = {id(t): t for t in list(bf16.parameters()) + list(bf16.buffers())}
        options["bf16"] = (bf16, None)
        options["bf16 fastpath"] = (optimize_for_small_batches(copy.deepcopy(bf16, dict(bf16_shared)), force=True), None)
        options["bf16 auto"] = (optimize_for_small_batches(copy.deepcopy(bf16, dict(bf16_shared)), mode="auto"), None)
    if not args.no_one_thread and threads > 1:
        options["baseline 1 thread"] = (base, 1)
        options["fastpath 1 thread"] = (options["fastpath"][0], 1)
    compile_cost = None
    if args.compile:
        compiled, compile_cost = compile_option(optimize_for_small_batches(copy.deepcopy(base, dict(shared)), force=True), prompt, args.rows)
        options["fastpath+compile"] = (compiled, None)

    t0 = time.perf_counter()
    table, error = time_forwards(options, prompt, args.rows, args.repeats, threads)
    lm_head = time_lm_head(base.get_output_embeddings().weight.detach(), args.rows, max(args.repeats, 5))
    result = {
        "machine": machine(),
        "model": f"{base.turbolm_source.name} (fp32)",
        "prompt_tokens": args.prompt_tokens,
        "repeats": args.repeats,
        "forward_ms": table,
        "max_abs_logit_diff_vs_baseline": {k: v[0] for k, v in error.items()},
        "argmax_same_as_baseline": {k: v[1] for k, v in error.items()},
        "lm_head_ms": lm_head,
        "kernel_tables": {name: table_of(model).to_dict() for name, (model, _) in options.items() if "auto" in name},
        "compile_seconds": {str(k): v for k, v in compile_cost.items()} if compile_cost else None,
        "seconds": time.perf_counter() - t0,
    }
    if args.json:
        json.dump(result, sys.stdout, indent=1)
        print()
        return
    m = result["machine"]
    print(f"{m['cpu']}, {m['logical_cpus']} logical CPUs, {m['torch_threads']} torch threads, torch {m['torch']} "
          f"({m['cpu_capability']}, oneDNN {'yes' if m['mkldnn'] else 'no'})")
    print_table(f"Forward of n new tokens after a {args.prompt_tokens}-token cache, median ms of {args.repeats} (n:)",
                table, error)
    print_table("lm_head alone (49152 x 576) on n rows, median ms (n:)", lm_head)
    for name, t in result["kernel_tables"].items():
        print(f"\n{name}: kernels chosen ({t['source']}) for rows {t['rows']}")
        for group, row in t["kernels"].items():
            print(f"  {group:>8}: {' '.join(row)}")
    if compile_cost:
        print("\ntorch.compile first-call seconds: " + ", ".join(f"{k}: {v:.1f}" for k, v in compile_cost.items()))


if __name__ == "__main__":
    main()
