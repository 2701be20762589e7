"""Files that are never half-written, and never trusted unread: atomic writes (a temporary file
beside the target, renamed into place), content checksums, validated safetensors reading (a
damaged file is a :class:`DataError` naming it, never a traceback), and the resumable training
state shared by the draft and router trainers (safetensors + JSON only)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import DataError, TurboLMError


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


def cache_root() -> Path:
    """``$TURBOLM_CACHE``, else ``$XDG_CACHE_HOME/turbolm``, else ``~/.cache/turbolm`` (without a
    home directory: a folder in the system's temporary directory)."""
    if os.environ.get("TURBOLM_CACHE"):
        return Path(os.environ["TURBOLM_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "turbolm"
    try:
        return Path.home() / ".cache" / "turbolm"
    except (RuntimeError, KeyError):  # no home directory (a bare container, a service account)
        return Path(tempfile.gettempdir()) / f"turbolm-cache-{os.getuid() if hasattr(os, 'getuid') else 'user'}"


def read_cache_json(path: str | os.PathLike) -> tuple[dict, str | None]:
    """A cache file's JSON object ({} if there is none) and, if it cannot be used, why: a cache
    is never trusted blindly and never stops a run (the caller measures again)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return {}, None
    except OSError as e:
        return {}, f"cannot read {path} ({e.strerror or e})"
    try:
        entry = json.loads(data)
    except (ValueError, RecursionError) as e:  # ValueError: not JSON, or not text
        return {}, f"{path} is damaged (not JSON: {e}), not used"
    if not isinstance(entry, dict):
        return {}, f"{path} is damaged (not a JSON object), not used"
    return entry, None


def write_cache_json(path: str | os.PathLike, obj: dict) -> str | None:
    """Write a cache file atomically; None, or why it could not be written (a read-only or
    misplaced cache costs the next run a measurement, never this run its result)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, obj, indent=None)
    except OSError as e:
        return f"cannot write {path} ({e.strerror or e})"
    return None


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a file's content (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _unreadable(path: Path, error: Exception, remedy: str) -> DataError:
    """The one-line error for a safetensors file that does not read (SafetensorError, OSError)."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    text = text.removeprefix("Error while deserializing header: ")
    if "not fully covered" in text:
        text = "truncated or damaged (its size does not match its header)"
    elif "header too" in text or "invalid header" in text or "invalid JSON" in text:
        text = f"not a safetensors file, or its header is damaged ({text})"
    return DataError(f"cannot read {path}: {text}" + (f"; {remedy}" if remedy else ""))


def open_safetensors(path: str | os.PathLike, remedy: str = ""):
    """A ``safe_open`` handle on ``path`` (memory-mapped; tensors are read on demand). Its header is
    checked against the file's size, so a missing, truncated or foreign file is a :class:`DataError`
    naming it; ``remedy`` (what to do) ends the message."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} is missing" + (f"; {remedy}" if remedy else ""))
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own SafetensorError (an Exception) for a damaged file
        raise _unreadable(path, e, remedy) from None


def load_safetensors(path: str | os.PathLike, remedy: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, read in full; a damaged file is a :class:`DataError`
    naming it (see :func:`open_safetensors`)."""
    with open_safetensors(path, remedy) as handle:
        try:
            return {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception as e:  # a header that passed the size check but describes impossible tensors
            raise _unreadable(Path(path), e, remedy) from None


def load_weights(module: torch.nn.Module, path: str | os.PathLike, remedy: str = "", convert=None) -> None:
    """Load ``path`` into ``module`` strictly: every parameter and buffer present with its shape,
    nothing extra, every floating-point value finite; otherwise a :class:`DataError` naming the
    file and the first difference. ``convert`` maps each loaded tensor before the checks."""
    state = load_safetensors(path, remedy)
    if convert is not None:
        state = {k: convert(v) for k, v in state.items()}
    own = module.state_dict()
    tail = f"; {remedy}" if remedy else ""
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    shapes = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        what = (f"lacks {missing[0]}" if missing else f"holds an unknown tensor {unexpected[0]}" if unexpected else
                f"has {shapes[0]} of shape {tuple(state[shapes[0]].shape)}, expected {tuple(own[shapes[0]].shape)}")
        more = len(missing) + len(unexpected) + len(shapes) - 1
        raise DataError(f"{path} does not match its config: it {what}" + (f" (and {more} more)" if more else "") + tail)
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise DataError(f"{path} holds NaN or infinite values in {bad} (a damaged file, or the weights of a run "
                        f"that diverged){tail}")
    module.load_state_dict(state, strict=True)


def save_training_state(out: Path, module: torch.nn.Module, optimizer, state: dict,
                        weights: str = "model.safetensors") -> None:
    """Write the resumable training state to a fresh directory, then point ``latest.json`` at it."""
    from safetensors.torch import save_file

    out = Path(out)
    d, n = out / f"state-{state['step']:07d}", 0
    while d.exists():  # saved again at the same step: never rewrite the directory latest.json may name
        d, n = out / f"state-{state['step']:07d}.{n + 1}", n + 1
    d.mkdir(parents=True)
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
    out = Path(out)
    try:
        d = out / json.loads((out / "latest.json").read_text())["state"]
        state = json.loads((d / "state.json").read_text())
        load_weights(module, d / state.pop("weights", weights))
        tensors = load_safetensors(d / "optimizer.safetensors")
    except (DataError, OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise TurboLMError(f"cannot resume from {out}: {e}") from None
    per_param: dict[int, dict] = {}
    for key, t in tensors.items():
        if key != "_empty":
            i, name = key.split(".", 1)
            per_param.setdefault(int(i), {})[name] = t
    optimizer.load_state_dict({"state": per_param, "param_groups": state.pop("param_groups")})
    return state


def settings_differences(saved: dict, current: dict) -> str:
    """The settings that differ between a saved run and this one, as ``name: old -> new``
    (comma-separated; values compared as JSON), for a refused resume."""
    saved, current = json.loads(json.dumps(saved, default=str)), json.loads(json.dumps(current, default=str))

    def show(d, k):
        return json.dumps(d[k])[:80] if k in d else "(none)"

    return ", ".join(f"{k}: {show(saved, k)} -> {show(current, k)}"
                     for k in sorted(set(saved) | set(current)) if saved.get(k, ...) != current.get(k, ...))
