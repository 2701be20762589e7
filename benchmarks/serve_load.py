"""Load test of `turbolm serve` (a separate process, default model): c concurrent streaming clients,
2 chat requests each (Spec-Bench first turns of at most 120 tokens, greedy, max_tokens 64), with the
real `openai` client. Prints per concurrency level: aggregate tokens/s, time to first token p50 / p99
(s), inter-token latency p50 / p99 (ms), the server's peak memory (MB) and the load average; then
the speculation counters from /metrics and whether every prompt's answer was the same at every level.

    OMP_NUM_THREADS=1 LEVELS=1,4,8,16 python benchmarks/serve_load.py [extra turbolm serve flags]

The numbers in docs/serving.md came from this script (the CPU is printed by `turbolm info`).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai

from turbolm import load_target
from turbolm.core.chat import encode_chat

LEVELS = [int(x) for x in os.environ.get("LEVELS", "1,4,8,16").split(",")]
MAX_TOKENS = int(os.environ.get("MAX_TOKENS", 64))
QUESTIONS = os.environ.get("QUESTIONS", "../shared/data/spec_bench/question.jsonl")


def start_server(extra: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "turbolm", "serve", "--port", "0", "--max-batch", "16", *extra],
                            stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    while "turbolm serve:" not in line:
        if not line:
            raise SystemExit(f"the server ended (exit {proc.wait()})")
        sys.stderr.write(line)
        line = proc.stderr.readline()
    print("#", line.strip(), flush=True)
    url = re.search(r"http://\S+:\d+", line).group(0)
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)


def quantile(xs: list[float], p: int) -> float:
    return statistics.quantiles(xs, n=100)[p - 1] if len(xs) > 1 else xs[0]


def main() -> None:
    _, tok = load_target(None)
    with open(QUESTIONS, encoding="utf-8") as f:
        qs = [json.loads(line)["turns"][0] for line in f]
    qs = [q for q in qs if len(encode_chat(tok, [{"role": "user", "content": q}])) <= 120][::7][:32]
    proc, url = start_server(sys.argv[1:])
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=3600)
    name = client.models.list().data[0].id
    client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}], temperature=0, max_tokens=4)

    def one(i: int):
        start, times, parts, usage = time.perf_counter(), [], [], None
        for chunk in client.chat.completions.create(model=name, messages=[{"role": "user", "content": qs[i]}],
                                                    temperature=0, max_tokens=MAX_TOKENS, stream=True,
                                                    stream_options={"include_usage": True}):
            if chunk.choices and chunk.choices[0].delta.content:
                times.append(time.perf_counter())
                parts.append(chunk.choices[0].delta.content)
            if chunk.usage:
                usage = chunk.usage
        return i, "".join(parts), usage.completion_tokens, start, times

    def peak_mb() -> int:
        with open(f"/proc/{proc.pid}/status") as f:
            return int(f.read().split("VmHWM:")[1].split()[0]) // 1024

    outputs: dict = {}
    print(f"# load average {os.getloadavg()[0]:.2f}, {len(qs)} prompts", flush=True)
    print("| clients | tokens/s | TTFT p50 (s) | TTFT p99 (s) | ITL p50 (ms) | ITL p99 (ms) | peak MB | load |")
    print("|---|---|---|---|---|---|---|---|")
    for conc in LEVELS:
        start = time.perf_counter()
        with ThreadPoolExecutor(conc) as pool:
            res = [x for rs in pool.map(lambda j: [one((j * 2 + r) % len(qs)) for r in range(2)], range(conc))
                   for x in rs]
        wall = time.perf_counter() - start
        tokens = sum(r[2] for r in res)
        ttft = [r[4][0] - r[3] for r in res if r[4]]
        itl = [b - a for r in res for a, b in zip(r[4], r[4][1:])]
        for i, text, *_ in res:
            outputs.setdefault(i, []).append(text)
        print(f"| {conc} | {tokens / wall:.1f} | {statistics.median(ttft):.2f} | {quantile(ttft, 99):.2f} | "
              f"{statistics.median(itl) * 1000:.0f} | {quantile(itl, 99) * 1000:.0f} | {peak_mb()} | "
              f"{os.getloadavg()[0]:.1f} |  ({len(res)} requests, {tokens} tokens, {wall:.1f} s)", flush=True)
    metrics = httpx.get(url + "/metrics").text
    print("\n".join(line for line in metrics.splitlines()
                    if line.startswith(("turbolm:spec_decode_num", "turbolm:spec_decode_requests", "turbolm:batch_size"))))
    repeated = [v for v in outputs.values() if len(v) > 1]
    print(f"outputs identical across levels: {sum(len(set(v)) == 1 for v in repeated)} of {len(repeated)} prompts "
          "run at more than one level")
    proc.terminate()
    print("exit", proc.wait())


if __name__ == "__main__":
    main()
