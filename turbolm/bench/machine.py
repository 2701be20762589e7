"""What a measurement ran on: a speed number means nothing without the machine beside it."""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages (Unix), or None where the OS does not say."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def describe_machine(model=None) -> dict:
    """CPU, GPU, threads, library versions; with ``model``, its name, dtype and device."""
    import torch
    import transformers

    from .. import __version__
    from ..fastpath import is_optimized

    info = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "turbolm": __version__,
        "platform": platform.platform(),
    }
    if model is not None:
        source = getattr(model, "turbolm_source", None)
        info.update(
            model=str(source.name) if source is not None else type(model).__name__,
            dtype=str(model.dtype).replace("torch.", ""),
            device=str(model.device),
            fast_cpu=is_optimized(model),
        )
        if model.device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(model.device)
    return info
