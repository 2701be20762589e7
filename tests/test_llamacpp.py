"""llama.cpp as a Spec-Bench method (turbolm.bench.llamacpp): the adapter's logic against a fake
``llama_cpp`` module that behaves like llama-cpp-python's ``Llama.generate`` (the token loop, the
rollback after a rejected draft), the missing-package error through the command line, and one
slow test on the real llama.cpp with the default GGUF."""

from __future__ import annotations

import json
import os
import sys
import types

import numpy as np
import pytest
from hostile import ROOT, Case, assert_clean_error, run_cli_cases

from turbolm import TurboLMError
from turbolm.bench import SpecBenchConfig, run_spec_bench
from turbolm.bench.llamacpp import PROMPT_LOOKUP_TOKENS, LlamaCppDecoder, build_llama_cpp, import_llama_cpp
from turbolm.cli import main
from turbolm.core.generation import SamplingParams, tau_of
from turbolm.core.models import ModelSource

CYCLE = [10, 11, 12, 13, 14]


def cycle_model(prefix: list[int]) -> int:
    """The fake's "network": the next token of a fixed cycle after the last one (10 after anything else)."""
    last = prefix[-1]
    return CYCLE[(CYCLE.index(last) + 1) % len(CYCLE)] if last in CYCLE else CYCLE[0]


class FakeLlama:
    """llama-cpp-python's ``Llama`` as far as the adapter uses it; ``generate`` is its token loop."""

    next_token = staticmethod(cycle_model)
    tokenize_shift = 0  # != 0: a GGUF whose tokenizer disagrees with the model's
    instances: list[FakeLlama] = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.draft_model = kwargs.get("draft_model")
        self.metadata = {"general.file_type": "3"}  # LlamaFileType.MOSTLY_Q4_1
        self.n_tokens = 0
        self.ids: list[int] = []  # the tokens in the KV cache
        self.generate_calls: list[dict] = []
        self.evals: list[list[int]] = []
        self.seed = kwargs.get("seed")
        FakeLlama.instances.append(self)

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        assert not add_bos and special
        return [t + self.tokenize_shift for t in self.hf_tokenizer(text.decode("utf-8"), add_special_tokens=False)["input_ids"]]

    def reset(self):
        self.n_tokens = 0

    def set_seed(self, seed):
        self.seed = seed

    def eval(self, tokens):
        self.evals.append(list(tokens))
        del self.ids[self.n_tokens:]
        self.ids.extend(tokens)
        self.n_tokens += len(tokens)

    def generate(self, tokens, reset=True, **settings):
        self.generate_calls.append({"tokens": list(tokens), "reset": reset, "n_tokens": self.n_tokens, **settings})
        assert self.n_tokens == 0, "the adapter resets before every call"
        tokens = list(tokens)
        sample_idx = self.n_tokens + len(tokens) - 1
        while True:
            self.eval(tokens)
            while sample_idx < self.n_tokens:
                token = self.next_token(self.ids[: sample_idx + 1])
                sample_idx += 1
                yield token
                tokens = [token]
                if sample_idx < self.n_tokens and token != self.ids[sample_idx]:  # a rejected draft
                    self.n_tokens = sample_idx
                    del self.ids[sample_idx:]
                    break
            if self.draft_model is not None:
                drafts = self.draft_model(np.array(self.ids[: self.n_tokens] + tokens, dtype=np.intc))
                tokens.extend(int(t) for t in drafts)


class FakePromptLookup:
    def __init__(self, max_ngram_size: int = 2, num_pred_tokens: int = 10):
        self.num_pred_tokens = num_pred_tokens

    def __call__(self, input_ids):
        ids = list(input_ids)
        for i in range(len(ids) - 2, -1, -1):  # the latest earlier occurrence of the last token
            if ids[i] == ids[-1]:
                return np.array(ids[i + 1: i + 1 + self.num_pred_tokens][: len(ids) - 1 - i], dtype=np.intc)
        return np.array([], dtype=np.intc)


@pytest.fixture
def fake_llama_cpp(monkeypatch, tiny):
    module = types.ModuleType("llama_cpp")
    module.Llama = FakeLlama
    module.__version__ = "0.0-fake"
    speculative = types.ModuleType("llama_cpp.llama_speculative")
    speculative.LlamaPromptLookupDecoding = FakePromptLookup
    module.llama_speculative = speculative
    monkeypatch.setitem(sys.modules, "llama_cpp", module)
    monkeypatch.setitem(sys.modules, "llama_cpp.llama_speculative", speculative)
    monkeypatch.setattr(FakeLlama, "instances", [])
    monkeypatch.setattr(FakeLlama, "hf_tokenizer", tiny[1], raising=False)
    return module


@pytest.fixture
def gguf(tmp_path):
    path = tmp_path / "model-Q4_1.gguf"
    path.write_bytes(b"GGUF")  # only the fake reads it
    return path


def decoder(tiny, gguf, lookup=None, eos=(2,)) -> LlamaCppDecoder:
    return LlamaCppDecoder(gguf, tiny[1], set(eos), n_ctx=64, prompt_lookup_tokens=lookup, threads=3)


GREEDY = SamplingParams()


def test_feeds_the_exact_ids_greedily_and_stops_at_max_new_tokens(fake_llama_cpp, tiny, gguf):
    d = decoder(tiny, gguf)
    llm = FakeLlama.instances[-1]
    assert llm.kwargs["model_path"] == str(gguf) and llm.kwargs["n_threads"] == 3 and llm.kwargs["n_threads_batch"] == 3
    assert llm.kwargs["logits_all"] is False and llm.kwargs["draft_model"] is None and llm.kwargs["n_ctx"] == 64
    ids = [1, 5, 6, 7, 13]
    r = d.generate(ids, 7, GREEDY)
    call = llm.generate_calls[-1]
    assert call["tokens"] == ids and call["temp"] == 0.0 and call["top_k"] == 1 and call["repeat_penalty"] == 1.0
    assert call["min_p"] == 0.0 and call["top_p"] == 1.0
    assert r.token_ids == [14, 10, 11, 12, 13, 14, 10] and r.finish_reason == "length" and r.prompt_tokens == 5
    # one forward per token (the prefill gives the first): no forward after the last token taken
    assert r.target_forwards == 7 == len(llm.evals) and llm.evals[0] == ids and tau_of([r]) == 1.0
    assert r.stats == {"method": "llama-cpp", "tokens_per_step_histogram": {"1": 6}}
    assert r.text == tiny[1].decode(r.token_ids, skip_special_tokens=True) and r.seconds >= r.prefill_seconds >= 0

    r2 = d.generate(ids, 7, GREEDY)  # a second call prefills again (reset), from the same ids
    assert r2.token_ids == r.token_ids and llm.evals[7] == ids


def test_stops_at_eos_and_keeps_it(fake_llama_cpp, tiny, gguf, monkeypatch):
    monkeypatch.setattr(FakeLlama, "next_token", staticmethod(lambda prefix: 2 if len(prefix) >= 6 else 20 + len(prefix)))
    r = decoder(tiny, gguf).generate([1, 5, 6], 50, GREEDY)
    assert r.token_ids == [23, 24, 25, 2] and r.finish_reason == "eos" and r.target_forwards == 4


def test_budget_is_what_fits_in_the_context(fake_llama_cpp, tiny, gguf):
    d = decoder(tiny, gguf)
    assert d.generate(list(range(3, 63)), 50, GREEDY).new_tokens == 4  # n_ctx 64 - 60 prompt tokens
    with pytest.raises(TurboLMError, match="prompt has 64 tokens but llama.cpp's context is 64"):
        d.generate(list(range(64)), 5, GREEDY)


def test_prompt_lookup_commits_several_tokens_per_forward_and_keeps_the_output(fake_llama_cpp, tiny, gguf):
    plain = decoder(tiny, gguf).generate([1, 5, 6], 40, GREEDY)
    d = decoder(tiny, gguf, lookup=PROMPT_LOOKUP_TOKENS)
    llm = FakeLlama.instances[-1]
    assert llm.kwargs["draft_model"].num_pred_tokens == PROMPT_LOOKUP_TOKENS and llm.kwargs["logits_all"] is True
    r = d.generate([1, 5, 6], 40, GREEDY)
    assert r.token_ids == plain.token_ids and r.stats["method"] == "llama-cpp-prompt-lookup"
    hist = {int(k): c for k, c in r.stats["tokens_per_step_histogram"].items()}
    assert sum(k * c for k, c in hist.items()) + 1 == r.new_tokens  # the prefill gives the first token
    assert sum(hist.values()) + 1 == r.target_forwards == len(llm.evals)
    assert r.target_forwards < plain.target_forwards and max(hist) > 1 and tau_of([r]) > 2


def test_sampling_passes_temperature_and_seed(fake_llama_cpp, tiny, gguf):
    d = decoder(tiny, gguf)
    d.generate([1, 5], 3, SamplingParams(temperature=0.7, top_p=0.9, top_k=5, seed=11))
    llm = FakeLlama.instances[-1]
    call = llm.generate_calls[-1]
    assert (call["temp"], call["top_p"], call["top_k"], llm.seed) == (0.7, 0.9, 5, 11)


def test_a_gguf_with_another_tokenizer_is_refused(fake_llama_cpp, tiny, gguf, monkeypatch):
    monkeypatch.setattr(FakeLlama, "tokenize_shift", 1)
    with pytest.raises(TurboLMError, match="tokenizer of model-Q4_1.gguf does not match the model's .* at token 0"):
        decoder(tiny, gguf)


def test_which_gguf(fake_llama_cpp, tiny, gguf, monkeypatch):
    model, tok = tiny
    with pytest.raises(TurboLMError, match="is a Hugging Face directory: give a GGUF of the same model with llama_cpp_gguf"):
        build_llama_cpp("llama-cpp", model, tok, {2})
    with pytest.raises(TurboLMError, match="llama_cpp_gguf .*nope.gguf: not a .gguf file"):
        build_llama_cpp("llama-cpp", model, tok, {2}, gguf.parent / "nope.gguf")
    monkeypatch.setattr(model, "turbolm_source", ModelSource("gguf", gguf, "model-Q4_1"))
    d = build_llama_cpp("llama-cpp-prompt-lookup", model, tok, {2})  # the model's own GGUF file
    assert d.info["gguf"] == str(gguf) and d.info["weights"] == "Q4_1" and d.info["prompt_lookup_tokens"] == 10
    assert d.n_ctx == min(model.config.max_position_embeddings, 8192)


def test_spec_bench_with_llama_cpp(fake_llama_cpp, tiny, gguf, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(json.dumps(q) for q in [
        {"question_id": 1, "category": "writing", "turns": ["Write a poem about the sea.", "Now about the sky."]},
        {"question_id": 2, "category": "qa", "turns": ["What is the capital of France?"]}]) + "\n")
    out = tmp_path / "run"
    report = run_spec_bench(SpecBenchConfig(
        questions=str(questions), out=str(out), methods=["vanilla", "llama-cpp", "llama-cpp-prompt-lookup"],
        max_new_tokens=6, warmup=0, llama_cpp_gguf=str(gguf)), target=tiny)
    methods = report["methods"]
    assert list(methods) == ["vanilla", "llama-cpp", "llama-cpp-prompt-lookup"]
    assert not methods["llama-cpp"]["ours"] and methods["llama-cpp"]["overall"]["differ"] == 2  # the fake's outputs
    assert report["lossless"] == {"checked": True, "ours_differing": 0, "ok": True}
    assert report["outside"]["llama-cpp"]["weights"] == "Q4_1" and report["config"]["llama_cpp_gguf"] == str(gguf)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    for r in rows:
        if r["method"].startswith("llama-cpp"):
            assert r["new_tokens"] == sum(map(len, r["token_ids"])) == 6 * r["turns"]
            assert sum(r["accepted_length_histogram"].values()) + r["turns"] == r["target_forwards"]
    # the second turn continues llama.cpp's own first answer
    second = FakeLlama.instances[0].generate_calls[1]["tokens"]
    first_answer = next(r for r in rows if r["method"] == "llama-cpp" and r["question_id"] == 1)["token_ids"][0]
    assert tiny[1].decode(first_answer, skip_special_tokens=True) in tiny[1].decode(second)
    md = (out / "report.md").read_text()
    assert "quantised Q4_1 weights" in md and "its time includes its prefill" in md
    line = next(x for x in md.splitlines() if x.startswith("- llama-cpp: question 1, turn 1, first at token 0"))
    assert "logit(vanilla's) - logit(its token)" in line  # how near a tie the first difference was
    assert line.endswith("(llama.cpp on quantised Q4_1 weights, not turbolm's)")


def test_errors_in_process(fake_llama_cpp, tiny_dir, tmp_path, capsys):
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "category": "qa", "turns": ["Hi?"]}) + "\n")
    base = ["bench", "spec", "--questions", str(questions), "--model", str(tiny_dir), "--out", str(tmp_path / "o")]
    assert main(base + ["--methods", "vanilla,llama-cpp"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Hugging Face directory: give a GGUF of the same model with --llama-cpp-gguf" in err
    assert main(base + ["--methods", "vanilla,llama-cpp-lookup"]) == 2
    assert "unknown method llama-cpp-lookup" in capsys.readouterr().err


@pytest.mark.slow  # a fresh interpreter (~6 s): with the slow tests, to keep make test-fast short
def test_missing_package_through_the_cli(tmp_path):
    shadow = tmp_path / "shadow" / "llama_cpp"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'llama_cpp'\", name='llama_cpp')\n")
    env = {"PYTHONPATH": f"{shadow.parent}{os.pathsep}{ROOT}"}
    base = ["bench", "spec", "--questions", "q.jsonl", "--out", str(tmp_path / "o")]
    missing, stray = run_cli_cases([Case(base + ["--methods", "vanilla,llama-cpp-prompt-lookup"]),
                                    Case(base + ["--methods", "vanilla", "--llama-cpp-gguf", "m.gguf"])], tmp_path, env=env)
    assert_clean_error(missing, "llama-cpp-python (not installed)", "pip install 'turbolm[llamacpp]'",
                       'CMAKE_ARGS="-DGGML_NATIVE=OFF')
    assert_clean_error(stray, "--llama-cpp-gguf given but no llama.cpp method", "--methods")


def test_import_error_of_a_broken_build(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import raises ImportError
    with pytest.raises(TurboLMError, match="need llama-cpp-python .*pip install 'turbolm\\[llamacpp\\]'"):
        import_llama_cpp()


@pytest.mark.slow
def test_real_llama_cpp_agrees_with_vanilla_on_the_default_gguf(default_model):
    pytest.importorskip("llama_cpp")
    from turbolm.core.chat import encode_prompt
    from turbolm.core.generation import eos_token_ids, generate

    model, tok = default_model
    ids = encode_prompt(tok, "Name three primary colours, then explain what a rainbow is.")
    vanilla = generate(model, tok, ids, max_new_tokens=16)
    for name in ("llama-cpp", "llama-cpp-prompt-lookup"):
        d = build_llama_cpp(name, model, tok, eos_token_ids(model, tok))  # checks the tokenizers agree
        assert d.info["weights"] == "Q4_1"
        r = d.generate(ids, 16, GREEDY)
        assert r.new_tokens == len(vanilla.token_ids) or r.finish_reason == "eos", name
        # the same Q4_1 weights (turbolm dequantises them): the first tokens agree, most of the rest too
        assert r.token_ids[:4] == vanilla.token_ids[:4], (name, r.token_ids, vanilla.token_ids)
        same = sum(a == b for a, b in zip(r.token_ids, vanilla.token_ids))
        assert same >= len(vanilla.token_ids) // 2, (name, r.token_ids, vanilla.token_ids)
        assert r.target_forwards <= r.new_tokens
