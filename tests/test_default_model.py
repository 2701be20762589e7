"""Tests on the real default model, SmolLM2-135M-Instruct (marked slow; CI runs them)."""

import json
import subprocess
import sys

import pytest
import torch

from turbolm import Conversation, encode_prompt, generate, load_target
from turbolm.core import models

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn.",
    "Give me three tips for writing clean Python code.",
]


def test_capital_of_france(default_model):
    model, tok = default_model
    res = generate(model, tok, encode_prompt(tok, PROMPTS[0]), max_new_tokens=32)
    assert "Paris" in res.text
    assert res.finish_reason == "eos" and res.token_ids[-1] == tok.eos_token_id


def test_greedy_equals_model_generate(default_model):
    model, tok = default_model
    for prompt in PROMPTS:
        ids = encode_prompt(tok, prompt)
        ours = generate(model, tok, ids, max_new_tokens=48)
        ref = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=48, do_sample=False)
        assert ours.token_ids == ref[0, len(ids):].tolist()


def test_multi_turn(default_model):
    model, tok = default_model
    conv = Conversation()
    first = generate(model, tok, conv.ask(tok, "What is the capital of France?"), max_new_tokens=24).text
    conv.answer(first)
    second_prompt = conv.ask(tok, "And of Italy?")
    assert first in tok.decode(second_prompt)
    assert "Rome" in generate(model, tok, second_prompt, max_new_tokens=24).text


def test_second_load_uses_the_cache(default_model, monkeypatch):
    def no_conversion(*a, **k):
        raise AssertionError("the GGUF was converted again instead of read from the cache")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    model, _ = load_target()
    assert model.turbolm_source.kind == "default"
    assert models._cache_is_complete(models.gguf_cache_dir(models.default_gguf_path()))


def test_cli_generate_json():
    p = subprocess.run([sys.executable, "-m", "turbolm.cli", "generate", "--prompt", "What is the capital of France?", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert "Paris" in d["text"]
    assert d["new_tokens"] == len(d["token_ids"]) == d["target_forwards"] and d["tau"] == 1.0
