"""``turbolm bench serve``: load test of ``turbolm serve`` in server configurations, side by side.

Each configuration starts its own ``turbolm serve`` process (same model, dtype and threads) and
is driven by ``c`` concurrent streaming clients (the real ``openai`` client, greedy chat
requests on Spec-Bench first turns), for each ``c`` in ``clients``: ``c * requests`` requests in
one queue, each client sending the next one as soon as its last has ended (as vLLM's
``benchmark_serving --max-concurrency`` does). Measured per level: aggregate tokens/s (completion
tokens over the level's wall time), time to first token and inter-token latency (p50 / p99, as
the client sees the streamed chunks) and the server's peak memory. Then the long prompts (several
Spec-Bench summarization / RAG turns joined to ``long_prompt_tokens``), one request at a time,
with every configuration's server up and taking turns: their time to first token, where FTP
prefill pays.

Configurations (``CONFIGS``): ``vanilla`` serves one request at a time (``--max-batch 1``: a
server without batching), ``batched`` decodes up to ``max_batch`` requests together,
``speculative`` adds ``--speculative`` for requests that arrive to an idle server, ``ftp`` adds
``--pruner`` (the prompt prefilled with token skipping). Greedy answers of vanilla, batched and
speculative must be identical (lossless; counted); ftp's are vanilla's after the pruned prefill,
so they differ by design.

Results go to ``out``: one JSON file per configuration as it completes (a re-run with the same
settings measures only the missing ones unless ``overwrite``), ``long.json`` (measured again
when the configurations change), and ``report.json``, ``report.md`` and ``serve.png`` over
every configuration measured there.
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
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..core.errors import ParameterError, TurboLMError
from ..core.io import write_json, write_text
from ..core.machine import describe_machine, load_average

CONFIGS = ("vanilla", "batched", "speculative", "ftp")
DEFAULT_PRUNER = str(Path(__file__).resolve().parents[1] / "checkpoints" / "ftp-smollm2-135m-s30")
LONG_CATEGORIES = ("summarization", "rag")


@dataclass
class ServeBenchConfig:
    questions: str
    out: str = "runs/serve_bench"
    configs: Sequence[str] = CONFIGS
    clients: Sequence[int] = (1, 4, 16)
    requests: int = 4  # per client and level: c * requests in all
    max_tokens: int = 64
    max_prompt_tokens: int = 160  # the short prompts: first turns of at most this many tokens
    long_prompt_tokens: int = 2048
    long_requests: int = 6
    long_max_tokens: int = 16
    max_batch: int = 16
    speculative: str = "hybrid"
    pruner: str = DEFAULT_PRUNER
    model: str | None = None
    dtype: str = "float32"
    threads: int | None = None
    overwrite: bool = False
    server_args: Sequence[str] = field(default_factory=tuple)

    def check(self) -> ServeBenchConfig:
        unknown = [c for c in self.configs if c not in CONFIGS]
        if unknown or not self.configs:
            raise ParameterError(f"{{}}: unknown {', '.join(map(repr, unknown)) or 'empty list'}; choose from "
                                 f"{', '.join(CONFIGS)}", "configs")
        for name in ("requests", "max_tokens", "max_prompt_tokens", "max_batch"):
            if getattr(self, name) < 1:
                raise ParameterError(f"{{}} must be >= 1, got {getattr(self, name)}", name)
        if not self.clients or min(self.clients) < 1:
            raise ParameterError(f"{{}} must be counts >= 1, got {list(self.clients)}", "clients")
        if self.long_requests < 0 or self.long_prompt_tokens < 1 or self.long_max_tokens < 1:
            raise ParameterError("{} must be >= 0 and {} / {} >= 1", "long_requests", "long_prompt_tokens",
                                 "long_max_tokens")
        if self.threads is not None and self.threads < 1:
            raise ParameterError(f"{{}} must be >= 1, got {self.threads}", "threads")
        return self

    def server_flags(self, config: str) -> list[str]:
        """The ``turbolm serve`` command line of ``config``."""
        flags = ["--port", "0", "--dtype", self.dtype, "--max-queue", str(max(self.clients) * 2 + 8)]
        flags += ["--model", self.model] if self.model else []
        flags += ["--max-batch", "1" if config == "vanilla" else str(self.max_batch)]
        flags += ["--speculative", self.speculative] if config == "speculative" else []
        flags += ["--pruner", self.pruner] if config == "ftp" else []
        return flags + list(self.server_args)


# -- prompts -----------------------------------------------------------------------------------

def prompts(config: ServeBenchConfig, tokenizer) -> tuple[list[str], list[str]]:
    """The short prompts (first turns of at most ``max_prompt_tokens`` chat tokens, spread over the
    categories) and the long ones (summarization / RAG turns joined until ``long_prompt_tokens``)."""
    from ..core.chat import encode_chat
    from .specbench import load_questions

    questions, _ = load_questions(config.questions)

    def length(text: str) -> int:
        return len(encode_chat(tokenizer, [{"role": "user", "content": text}]))

    short = [q.turns[0] for q in questions if length(q.turns[0]) <= config.max_prompt_tokens]
    n = max(config.clients) * config.requests
    if not short:
        raise TurboLMError(f"{config.questions} has no first turn of at most {config.max_prompt_tokens} tokens")
    short = short[::max(1, len(short) // n)][:n]  # spread over the file's categories
    pieces = [t for q in questions if q.category in LONG_CATEGORIES for t in q.turns]
    long: list[str] = []
    if config.long_requests and not pieces:
        raise TurboLMError(f"{config.questions} has no {' or '.join(LONG_CATEGORIES)} question to build long prompts")
    ask = "\n\nSummarize the texts above in three sentences."
    room = config.long_prompt_tokens - length(ask)  # what the texts may take beside the chat template
    start = 0
    while len(long) < config.long_requests:
        text, i = "", start
        while length(text) < config.long_prompt_tokens and i < start + len(pieces):
            text += pieces[i % len(pieces)] + "\n\n"
            i += 1
        long.append(tokenizer.decode(tokenizer(text.strip(), add_special_tokens=False)["input_ids"][:max(room, 1)]) + ask)  # cut to the length
        start = i
    return short, long


# -- one server --------------------------------------------------------------------------------

class Server:
    """``turbolm serve`` in a child process, up and answering; ``stop()`` ends it (SIGTERM). As a
    context manager it stops at the end of the block, at once (SIGKILL) if the block raised."""

    def __init__(self, flags: list[str], threads: int | None, log: Callable[[str], None]):
        env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
        self.proc = subprocess.Popen([sys.executable, "-m", "turbolm", "serve", *flags], stderr=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, text=True, env=env)
        lines = []
        for line in self.proc.stderr:
            lines.append(line.rstrip())
            if line.startswith("turbolm serve:"):
                self.banner = line.strip()
                self.url = re.search(r"http://\S+:\d+", line).group(0)
                break
        else:
            code = self.proc.wait()
            raise TurboLMError(f"turbolm serve {' '.join(flags)} ended (exit {code}): " + " | ".join(lines[-3:]))
        log(f"# {self.banner}")
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()  # keep the pipe moving

    def peak_mb(self) -> int | None:
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                return int(f.read().split("VmHWM:")[1].split()[0]) // 1024
        except (OSError, IndexError, ValueError):
            return None

    def stop(self, now: bool = False) -> None:
        """SIGTERM (the server finishes what is in flight), or with ``now`` SIGKILL: an interrupted
        benchmark wants no more answers, and the clients waiting for them fail at once."""
        if self.proc.poll() is not None:
            return
        if not now:
            self.proc.terminate()
            try:
                self.proc.wait(60)
                return
            except subprocess.TimeoutExpired:
                pass
        self.proc.kill()
        self.proc.wait()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, kind, *exc) -> None:
        self.stop(now=kind is not None)


def _quantile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    return statistics.quantiles(xs, n=100, method="inclusive")[round(q * 100) - 1] if len(xs) > 1 else xs[0]


def _stats(name: str, xs: list[float], scale: float = 1.0) -> dict:
    return {f"{name}_p50": None if not xs else round(statistics.median(xs) * scale, 4),
            f"{name}_p99": None if not xs else round(_quantile(xs, 0.99) * scale, 4)}


def _ask(client, model: str, text: str, max_tokens: int) -> dict:
    """One streamed greedy chat request: its text, completion tokens and chunk arrival times."""
    start, times, parts, usage = time.perf_counter(), [], [], None
    for chunk in client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                                temperature=0, max_tokens=max_tokens, stream=True,
                                                stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.perf_counter())
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    return {"text": "".join(parts), "tokens": usage.completion_tokens if usage else None, "start": start,
            "times": times}


def _connect(server: Server):
    """An ``openai`` client of ``server`` and the model id it serves, after one warm-up request."""
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key=os.environ.get("TURBOLM_API_KEY", "none"),
                           max_retries=0, timeout=3600)
    model = client.models.list().data[0].id
    _ask(client, model, "Hi", 4)
    return client, model


def run_levels(name: str, config: ServeBenchConfig, short: list[str], log: Callable[[str], None]) -> dict:
    """Every concurrency level on one fresh server of configuration ``name``."""
    with Server(config.server_flags(name), config.threads, log) as server:
        client, model = _connect(server)
        levels, answers, changed = [], {}, 0
        for c in config.clients:
            work = [k % len(short) for k in range(c * config.requests)]
            load = load_average()
            start = time.perf_counter()
            pool = ThreadPoolExecutor(c)  # c clients taking the next request from one queue as they finish
            try:
                results = list(pool.map(lambda i: (i, _ask(client, model, short[i], config.max_tokens)), work))
            finally:
                pool.shutdown(wait=False, cancel_futures=True)  # on an interrupt, the server goes first (below)
            wall = time.perf_counter() - start
            for i, r in results:
                first = answers.setdefault(str(i), r["text"])
                changed += first != r["text"]  # the same prompt answered otherwise at another level
            tokens = sum(r["tokens"] or 0 for _, r in results)
            level = {"clients": c, "requests": len(results), "tokens": tokens, "seconds": round(wall, 3),
                     "tokens_per_second": round(tokens / wall, 2),
                     **_stats("ttft_s", [r["times"][0] - r["start"] for _, r in results if r["times"]]),
                     **_stats("itl_ms", [b - a for _, r in results for a, b in zip(r["times"], r["times"][1:])], 1000),
                     "peak_mb": server.peak_mb(), "load_average_before": load}
            levels.append(level)
            log(f"  {name}: {c} client(s): {level['tokens_per_second']:.1f} tokens/s, TTFT p50 {level['ttft_s_p50']} s, "
                f"ITL p50 {level['itl_ms_p50']} ms ({len(results)} requests, {tokens} tokens, {wall:.1f} s)")
        return {"config": name, "server": server.banner, "flags": config.server_flags(name), "levels": levels,
                "answers": answers, "answers_changed_across_levels": changed, "peak_mb": server.peak_mb()}


def run_long(names: Sequence[str], config: ServeBenchConfig, long: list[str], log: Callable[[str], None]) -> dict:
    """Time to first token of each long prompt on every configuration, one request at a time, the
    servers all up and taking turns (the order rotating per prompt): side by side in one period."""
    with ExitStack() as stack:
        servers = [stack.enter_context(Server(config.server_flags(name), config.threads, log)) for name in names]
        clients = [_connect(server) for server in servers]
        ttft: dict[str, list] = {name: [] for name in names}
        for k, text in enumerate(long):
            for j in range(len(names)):
                i = (j + k) % len(names)
                r = _ask(*clients[i], text, config.long_max_tokens)
                ttft[names[i]].append(round(r["times"][0] - r["start"], 4) if r["times"] else None)
        log("  long prompts, TTFT p50: " + ", ".join(
            f"{n} {statistics.median([t for t in ts if t is not None]):.2f} s" for n, ts in ttft.items() if any(ts)))
        return {"configs": list(names), "ttft_s": ttft}


# -- the run -----------------------------------------------------------------------------------

def run_serve_bench(config: ServeBenchConfig, log: Callable[[str], None] = print) -> dict:
    """Measure every configuration (the ones ``out`` already holds are kept unless ``overwrite``),
    then the long prompts on all of them; write the report; return it."""
    from ..core.chat import encode_chat
    from ..core.models import load_target

    config.check()
    out = Path(config.out)
    settings = {k: v for k, v in asdict(config).items() if k not in ("out", "overwrite", "configs")}
    settings = json.loads(json.dumps(settings))
    previous = out / "settings.json"
    if previous.is_file() and not config.overwrite and json.loads(previous.read_text()) != settings:
        raise TurboLMError(f"{out} holds a run with other settings; give --overwrite or another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json(previous, settings)
    _, tokenizer = load_target(config.model)
    short, long = prompts(config, tokenizer)
    lengths = [len(encode_chat(tokenizer, [{"role": "user", "content": t}])) for t in long]
    log(f"# {len(short)} short prompts; {len(long)} long prompts of {', '.join(map(str, lengths))} tokens")
    for name in config.configs:
        path = out / f"{name}.json"
        if path.is_file() and not config.overwrite:
            log(f"# {name}: kept from {path}")
            continue
        write_json(path, run_levels(name, config, short, log))
    # the report: every configuration measured in ``out`` with these settings, asked this time or before
    results = {n: json.loads((out / f"{n}.json").read_text()) for n in CONFIGS if (out / f"{n}.json").is_file()}
    long_path = out / "long.json"
    measured = json.loads(long_path.read_text()) if long_path.is_file() else None
    if long and (config.overwrite or measured is None or set(measured["configs"]) != set(results)):
        measured = run_long(list(results), config, long, log)
        write_json(long_path, measured)
    machine = describe_machine()
    if config.threads:
        machine["torch_threads"] = config.threads
    report = {"config": settings, "machine": machine, "long_prompt_tokens": lengths, "results": results,
              "long": measured if long else None, "lossless": _lossless(results)}
    write_json(out / "report.json", report)
    plots = plot(report, out)
    write_text(out / "report.md", markdown(report, plots))
    return report


def _lossless(results: dict) -> dict:
    """Greedy answers of batched and speculative against vanilla's (else batched's), prompt by prompt."""
    base_name = "vanilla" if "vanilla" in results else "batched"
    base = results.get(base_name, {}).get("answers", {})
    out = {}
    for name in ("batched", "speculative"):
        if name in results and name != base_name:
            theirs = results[name]["answers"]
            common = [k for k in base if k in theirs]
            out[name] = {"compared": len(common), "differing": sum(theirs[k] != base[k] for k in common)}
    return out


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown(report: dict, plots: list[str]) -> str:
    c, m, results = report["config"], report["machine"], report["results"]
    lines = ["# turbolm serve under load", "",
             f"- machine: {m['cpu']} ({m['cpu_count']} logical CPUs), GPU: {m['gpu'] or 'none'}, "
             f"torch threads per server: {m['torch_threads']}",
             f"- software: torch {m['torch']}, transformers {m['transformers']}, turbolm {m['turbolm']}",
             f"- model: {c['model'] or 'the default model'}, dtype {c['dtype']}; greedy chat requests, streamed, "
             f"max_tokens {c['max_tokens']}; {c['requests']} x clients requests per level in one queue, each client "
             "sending the next when its last ended; "
             f"short prompts: Spec-Bench first turns of <= {c['max_prompt_tokens']} tokens",
             "- one `turbolm serve` process per configuration: " + "; ".join(
                 f"{n}: `{' '.join(r['flags'])}`" for n, r in results.items()), "",
             "| configuration | clients | tokens/s | vs 1 client | TTFT p50 (s) | TTFT p99 (s) | ITL p50 (ms) | "
             "ITL p99 (ms) | peak MB |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        one = next((lv["tokens_per_second"] for lv in r["levels"] if lv["clients"] == 1), None)
        for lv in r["levels"]:
            ratio = f"{lv['tokens_per_second'] / one:.2f}x" if one else "-"
            lines.append(f"| {name} | {lv['clients']} | {lv['tokens_per_second']:.1f} | {ratio} | "
                         f"{_fmt(lv['ttft_s_p50'], '.2f')} | {_fmt(lv['ttft_s_p99'], '.2f')} | "
                         f"{_fmt(lv['itl_ms_p50'], '.0f')} | {_fmt(lv['itl_ms_p99'], '.0f')} | {_fmt(lv['peak_mb'], 'd')} |")
    longs = {n: [t for t in ts if t is not None] for n, ts in (report["long"] or {}).get("ttft_s", {}).items()}
    if longs:
        base = statistics.median(longs["batched"]) if longs.get("batched") else None
        lines += ["", f"Long prompts ({', '.join(map(str, report['long_prompt_tokens']))} tokens; Spec-Bench "
                  "summarization / RAG turns joined), one request at a time, every configuration's server up and "
                  "taking turns (order rotating per prompt):", "",
                  "| configuration | TTFT p50 (s) | each (s) | vs batched |", "|---|---|---|---|"]
        for name, ts in longs.items():
            med = statistics.median(ts) if ts else None
            ratio = f"{base / med:.2f}x lower" if base and med and name != "batched" else "-"
            lines.append(f"| {name} | {_fmt(med, '.2f')} | {', '.join(f'{t:.2f}' for t in ts)} | {ratio} |")
    if report["lossless"]:
        lines += ["", "Greedy answers identical to " + ("vanilla's" if "vanilla" in results else "batched's") + ": "
                  + "; ".join(f"{n}: {v['compared'] - v['differing']} of {v['compared']} prompts"
                              for n, v in report["lossless"].items())]
    lines += ["", "Answers that changed between levels of one configuration (should be 0): " + ", ".join(
        f"{n} {r['answers_changed_across_levels']}" for n, r in results.items())]
    lines += [""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def plot(report: dict, out: Path) -> list[str]:
    """serve.png: aggregate tokens/s and TTFT p50 against concurrent clients, per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    for name, r in report["results"].items():
        xs = [lv["clients"] for lv in r["levels"]]
        a.plot(xs, [lv["tokens_per_second"] for lv in r["levels"]], marker="o", label=name)
        b.plot(xs, [lv["ttft_s_p50"] for lv in r["levels"]], marker="o", label=name)
    for ax, label in ((a, "aggregate tokens/s"), (b, "time to first token, p50 (s)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    a.legend(fontsize="small")
    fig.suptitle(f"turbolm serve, {report['machine']['cpu']}, {report['machine']['torch_threads']} thread(s)",
                 fontsize="medium")
    fig.tight_layout()
    fig.savefig(out / "serve.png", dpi=120)
    plt.close(fig)
    return ["serve.png"]
