"""What a measurement ran on: a speed number means nothing without the machine beside it."""

from __future__ import annotations

import os
import platform
import time


def cpuinfo_field(name: str) -> str:
    """The first value of ``name`` in /proc/cpuinfo (Linux: ``model name``, ``vendor_id``,
    ``flags``), or "" where the file or the field is missing."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return ""


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    return cpuinfo_field("model name") or platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages (Unix), or None where the OS does not say."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def cpu_snapshot() -> tuple[float, float, float] | None:
    """(wall seconds, CPU seconds every process has used, CPU seconds this process has used) on
    Linux (/proc/stat), else None. Two snapshots give how many CPUs *other* processes kept busy
    between them (``other_cpus_busy``) - unlike the load average, which lags by a minute and counts
    this process and whatever ran just before it."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(x) for x in fields[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    steal_and_guests = sum(ticks[7:]) if len(ticks) > 7 else 0  # steal, guest, guest_nice: not ours to judge
    hz = os.sysconf("SC_CLK_TCK")
    return time.monotonic(), (sum(ticks) - idle - steal_and_guests) / hz, time.process_time()


def other_cpus_busy(start: tuple[float, float, float] | None, end: tuple[float, float, float] | None) -> float | None:
    """CPUs that processes other than this one kept busy on average between two ``cpu_snapshot()``s."""
    if start is None or end is None or end[0] <= start[0]:
        return None
    return round(max((end[1] - start[1]) - (end[2] - start[2]), 0.0) / (end[0] - start[0]), 2)


#: other processes keeping more CPUs than this busy, on average, make a speed measurement unreliable
BUSY_CPUS = 0.5


class OtherLoad:
    """``with OtherLoad() as load: ...``, then ``load.cpus``: how many CPUs processes other than this
    one kept busy on average meanwhile (``other_cpus_busy``; None where the OS does not say)."""

    cpus: float | None = None

    def __enter__(self) -> OtherLoad:
        self._start, self.cpus = cpu_snapshot(), None
        return self

    def __exit__(self, *exc) -> None:
        self.cpus = other_cpus_busy(self._start, cpu_snapshot())


def too_busy(cpus: float | None, limit: float | None = BUSY_CPUS) -> bool:
    """Whether other processes kept more than ``limit`` CPUs busy (``OtherLoad.cpus``; never where
    the OS does not say or ``limit`` is None): a speed measurement taken meanwhile is not cached."""
    return cpus is not None and limit is not None and cpus > limit


def describe_machine() -> dict:
    """CPU, GPU, threads and library versions: what a speed number needs beside it
    (``models.describe_model`` adds the model's side)."""
    from importlib.metadata import PackageNotFoundError, version

    import torch
    import transformers

    try:
        turbolm_version = version("turbolm")
    except PackageNotFoundError:  # run from a source tree that was never installed
        turbolm_version = None

    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "turbolm": turbolm_version,
        "platform": platform.platform(),
    }


# --- memory bandwidth and the decoding bound ------------------------------------------------------
# Decoding one token reads every weight once; on a CPU that read, not arithmetic, sets the pace. So
# the machine's read bandwidth divided by the bytes a token reads bounds the tokens per second of
# vanilla decoding, and a measured speed says how close to that bound it runs.

PROBE_MB = 256
BANDWIDTH_DIR = "machine"  # under the cache root: one JSON file per probe key


def _probe_key(device: str, mb: int) -> str:
    import hashlib

    import torch

    gpu = torch.cuda.get_device_name(device) if device.startswith("cuda") else ""
    parts = ["bandwidth-1", cpu_model(), str(os.cpu_count()), torch.__version__, str(torch.get_num_threads()),
             device, gpu, str(mb)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def memory_bandwidth(mb: int = PROBE_MB, repeats: int = 5, device: str = "cpu", cache: bool = True,
                     busy_cpus: float | None = BUSY_CPUS) -> dict:
    """The read bandwidth of ``device``'s memory in GB/s (10^9 bytes): the fastest of ``repeats``
    sums of an ``mb``-MiB float32 tensor (far larger than the caches, so it comes from memory).
    ``{"gb_per_s", "probe_mb", "source": "measured" | "cached", "other_cpus_busy"}``. Cached per CPU,
    threads, torch version, device and probe size; not cached when other processes kept more than
    ``busy_cpus`` CPUs busy (None: cached all the same); a damaged or unwritable cache only costs a
    measurement."""
    import math

    import torch

    from .io import cache_root, read_cache_json, write_cache_json

    if mb < 1 or repeats < 1:
        raise ValueError(f"mb and repeats must be >= 1, got {mb} and {repeats}")
    device = str(torch.device(device))
    path = cache_root() / BANDWIDTH_DIR / f"bandwidth-{_probe_key(device, mb)}.json" if cache else None
    if path is not None:
        entry, _ = read_cache_json(path)
        gbs = entry.get("gb_per_s")
        if isinstance(gbs, (int, float)) and not isinstance(gbs, bool) and math.isfinite(gbs) and gbs > 0:
            return {"gb_per_s": float(gbs), "probe_mb": mb, "source": "cached", "other_cpus_busy": entry.get("other_cpus_busy")}
    x = torch.ones(mb * 2**18, dtype=torch.float32, device=device)  # mb MiB; ones() touches every page
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    best = float("inf")
    with OtherLoad() as load, torch.inference_mode():
        x.sum()
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            x.sum()
            sync()
            best = min(best, time.perf_counter() - start)
    del x
    out = {"gb_per_s": round(mb * 2**20 / max(best, 1e-9) / 1e9, 2), "probe_mb": mb, "source": "measured",
           "other_cpus_busy": load.cpus}
    if path is not None and not too_busy(load.cpus, busy_cpus):
        write_cache_json(path, {"gb_per_s": out["gb_per_s"], "other_cpus_busy": load.cpus})
    return out


def bytes_per_token(model) -> int:
    """The weight bytes one decoded token reads: every parameter once (a tied embedding / lm_head
    is one tensor), except that an input embedding not tied to the lm_head is read one row a token;
    a quantised weight (``--dtype int8`` / ``int4``) counts its values' bytes plus its scales."""
    from .quantize import quant_form

    params = {id(p): p for p in model.parameters()}
    total = 0
    for p in params.values():
        form = quant_form(p)
        total += p.numel() * p.element_size() if form is None else form.nbytes
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if embed is not None and getattr(embed, "weight", None) is not None and id(embed.weight) in params:
        w = embed.weight
        if head is None or getattr(head, "weight", None) is not w:
            total -= (w.shape[0] - 1) * w[0].numel() * w.element_size()
    return total


def time_greedy_decode(model, input_ids, tokens: int = 32) -> float:
    """Tokens per second of vanilla greedy decoding after a prefill of ``input_ids`` (a list of
    ids): ``tokens`` one-token forwards with a KV cache, an end-of-sequence token ignored."""
    import torch

    from .generation import forward, new_cache, synchronize

    device = model.device
    with torch.inference_mode():
        cache = new_cache(model)
        out = forward(model, torch.tensor([list(input_ids)], device=device), cache, logits_to_keep=1)
        tok = out.logits[0, -1].argmax()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(tokens):
            out = forward(model, tok.view(1, 1), cache)
            tok = out.logits[0, -1].argmax()
        synchronize(device)
        return tokens / (time.perf_counter() - start)


def decoding_bound(model, bandwidth_gb_per_s: float, measured_tokens_per_s: float | None = None) -> dict:
    """The memory-bandwidth limit of vanilla decoding for ``model`` and, given a measured speed,
    the fraction of it reached: ``{"bytes_per_token", "limit_tokens_per_s", "tokens_per_s",
    "fraction_of_limit"}``."""
    per_token = bytes_per_token(model)
    limit = bandwidth_gb_per_s * 1e9 / per_token if per_token else float("inf")
    out = {"bytes_per_token": per_token, "limit_tokens_per_s": round(limit, 2)}
    if measured_tokens_per_s is not None:
        out["tokens_per_s"] = round(measured_tokens_per_s, 2)
        out["fraction_of_limit"] = float(f"{measured_tokens_per_s / limit:.3g}") if limit else None
    return out


# --- threads --------------------------------------------------------------------------------------
# libgomp (PyTorch's OpenMP on Linux) lets the workers of a thread's parallel regions spin between
# regions only while it manages no more threads than there are CPUs. A thread that has run torch
# keeps its workers for as long as it lives; when another long-lived thread then runs the model (a
# server's scheduler), both teams count, and every parallel region has to wake sleeping workers:
# measured on a 2-core Xeon, a one-row linear layer 76 -> 190 us, a decoded token ~1.6x slower.

def in_passing_thread(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a thread of its own that ends with it: its result, or its
    exception raised here. Set a model up this way (load, time, build) when another thread will
    run it, so that the thread running it is the only one with OpenMP workers (see above)."""
    import threading

    box: dict = {}

    def target():
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    thread = threading.Thread(target=target, name="turbolm-setup", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]
