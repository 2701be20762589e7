"""Files that are never half-written: atomic writes (a temporary file beside the target, renamed
into place), content checksums, and the resumable training state shared by the draft and router
trainers (safetensors + JSON only)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import TurboLMError


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path`` (``.NAME.XXXX.tmp``), then
    rename it into place: readers see the old file or the new one, never a part."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's (and safetensors') 0600 would outlive the rename
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda p: Path(p).write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, obj, indent: int | None = 1) -> None:
    write_text(path, json.dumps(obj, indent=indent, default=str))


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a file's content (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def save_training_state(out: Path, module: torch.nn.Module, optimizer, state: dict,
                        weights: str = "model.safetensors") -> None:
    """Write the resumable training state to a fresh directory, then point ``latest.json`` at it."""
    from safetensors.torch import save_file

    out = Path(out)
    d = out / f"state-{state['step']:07d}"
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, str(d / weights))
    opt = optimizer.state_dict()
    tensors = {f"{i}.{k}": torch.as_tensor(v).detach().contiguous().cpu()
               for i, s in opt["state"].items() for k, v in s.items()}
    save_file(tensors or {"_empty": torch.zeros(1)}, str(d / "optimizer.safetensors"))
    (d / "state.json").write_text(json.dumps({**state, "param_groups": opt["param_groups"], "weights": weights}, indent=1))
    write_json(out / "latest.json", {"state": d.name, "step": state["step"]})
    for old in out.glob("state-*"):
        if old != d:
            shutil.rmtree(old, ignore_errors=True)


def load_training_state(out: Path, module: torch.nn.Module, optimizer, weights: str = "model.safetensors") -> dict:
    """Restore what :func:`save_training_state` wrote; returns its ``state`` dict."""
    from safetensors.torch import load_file

    out = Path(out)
    try:
        d = out / json.loads((out / "latest.json").read_text())["state"]
        state = json.loads((d / "state.json").read_text())
        module.load_state_dict(load_file(str(d / state.pop("weights", weights))), strict=True)
        tensors = load_file(str(d / "optimizer.safetensors"))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise TurboLMError(f"cannot resume from {out}: {e}") from None
    per_param: dict[int, dict] = {}
    for key, t in tensors.items():
        if key != "_empty":
            i, name = key.split(".", 1)
            per_param.setdefault(int(i), {})[name] = t
    optimizer.load_state_dict({"state": per_param, "param_groups": state.pop("param_groups")})
    return state
