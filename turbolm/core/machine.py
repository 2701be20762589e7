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
