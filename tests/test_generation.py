import collections

import pytest
import torch

from turbolm import SamplingParams, TurboLMError, encode_prompt, generate, load_target
from turbolm.core.generation import OutputTracker, logits_to_probs, next_token

PROMPTS = ["The capital of France is", "Write a short poem about the sea.", "def add(a, b):"]


def hf_greedy(model, ids, n):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_greedy_equals_model_generate(tiny_dirs, arch):
    model, tok = load_target(tiny_dirs[arch])
    for prompt in PROMPTS:
        ids = encode_prompt(tok, prompt)
        ours = generate(model, tok, ids, max_new_tokens=40)
        assert ours.token_ids == hf_greedy(model, ids, 40)
        assert ours.target_forwards == ours.new_tokens  # one forward per token
        assert ours.tau == 1.0


def test_eos_ends_output_and_is_kept(tiny_dir):
    model, tok = load_target(tiny_dir)
    ids = encode_prompt(tok, PROMPTS[0])
    free = generate(model, tok, ids, max_new_tokens=20).token_ids
    eos = free[5]
    model.generation_config.eos_token_id = [eos, 10**6]  # every EOS id of the config counts
    res = generate(model, tok, ids, max_new_tokens=20)
    assert res.token_ids == free[: free.index(eos) + 1]
    assert res.finish_reason == "eos"
    assert res.token_ids == hf_greedy(model, ids, 20)


def test_max_new_tokens_and_stats(tiny):
    model, tok = tiny
    res = generate(model, tok, encode_prompt(tok, PROMPTS[1]), max_new_tokens=7)
    assert res.new_tokens == 7 and res.finish_reason == "length"
    d = res.to_dict()
    for key in ("text", "token_ids", "new_tokens", "seconds", "target_forwards", "tau"):
        assert key in d
    assert d["prompt_tokens"] == len(encode_prompt(tok, PROMPTS[1]))


def test_prompt_longer_than_context_is_a_clear_error(tiny):
    model, tok = tiny
    with pytest.raises(TurboLMError, match="context is 512"):
        generate(model, tok, [5] * 600, max_new_tokens=4)
    # A prompt that fits gets only the room that is left.
    res = generate(model, tok, [5] * 509, max_new_tokens=50)
    assert res.new_tokens <= 3


def test_stop_string_streaming_and_text(tiny):
    model, tok = tiny
    ids = encode_prompt(tok, PROMPTS[1])
    full = generate(model, tok, ids, max_new_tokens=30)
    assert len(full.text) > 6
    stop = full.text[3:6]
    chunks = []
    res = generate(model, tok, ids, max_new_tokens=30, stop=[stop], on_text=chunks.append)
    assert res.finish_reason == "stop"
    assert res.text == full.text[: full.text.index(stop)]
    assert "".join(chunks) == res.text
    assert res.token_ids == full.token_ids[: res.new_tokens]


class CharTokenizer:
    """One character per token id (ord), id 0 = EOS; enough to test the tracker exactly."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i != 0)


def ids(text):
    return [ord(c) for c in text]


def test_tracker_holds_back_possible_stop_prefix():
    chunks = []
    t = OutputTracker(CharTokenizer(), eos_ids=[0], max_new_tokens=100, stop=["<END>"], on_text=chunks.append)
    t.push(ids("abc<EN"))
    assert "".join(chunks) == "abc"  # "<EN" could still become "<END>"
    t.push(ids("x"))
    assert "".join(chunks) == "abc<ENx"
    assert not t.push(ids("y<E"))
    assert t.push(ids("ND>zzz"))
    assert t.text == "abc<ENxy" and "".join(chunks) == t.text and t.finish_reason == "stop"


def test_tracker_never_keeps_tokens_past_eos_or_limit():
    t = OutputTracker(CharTokenizer(), eos_ids=[0], max_new_tokens=100)
    assert t.push(ids("ab") + [0] + ids("cd"))  # a speculative step may accept past EOS
    assert t.token_ids == ids("ab") + [0] and t.text == "ab" and t.finish_reason == "eos"
    t = OutputTracker(CharTokenizer(), eos_ids=[0], max_new_tokens=3)
    assert t.push(ids("abcdef"))
    assert t.token_ids == ids("abc") and t.finish_reason == "length"


def test_logits_processing_matches_transformers():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    for t, k, p in [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.8), (0.5, 10, 0.9)]:
        ref = TemperatureLogitsWarper(t)(None, logits.clone())
        if k:
            ref = TopKLogitsWarper(k)(None, ref)
        if p < 1:
            ref = TopPLogitsWarper(p)(None, ref)
        ours = logits_to_probs(logits, SamplingParams(temperature=t, top_k=k, top_p=p))
        torch.testing.assert_close(ours, ref.softmax(-1))


def test_sampling_follows_the_distribution():
    torch.manual_seed(1)
    logits = torch.randn(8) * 2
    params = SamplingParams(temperature=0.8, top_k=6, seed=123)
    probs = logits_to_probs(logits, params)
    g = params.generator("cpu")
    n = 20000
    counts = collections.Counter(next_token(logits, params, g) for _ in range(n))
    assert set(counts) <= set(torch.nonzero(probs).flatten().tolist())
    chi2 = sum((counts.get(i, 0) - n * p) ** 2 / (n * p) for i, p in enumerate(probs.tolist()) if p > 0)
    assert chi2 < 20.5  # chi-square, 5 degrees of freedom, p = 0.001


def test_sampling_seed_reproducible(tiny):
    model, tok = tiny
    ids_ = encode_prompt(tok, PROMPTS[0])
    a = generate(model, tok, ids_, max_new_tokens=15, sampling=SamplingParams(temperature=1.0, top_p=0.9, seed=7))
    b = generate(model, tok, ids_, max_new_tokens=15, sampling=SamplingParams(temperature=1.0, top_p=0.9, seed=7))
    assert a.token_ids == b.token_ids


def test_bad_sampling_params():
    for kw in ({"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -2}):
        with pytest.raises(TurboLMError):
            SamplingParams(**kw)
