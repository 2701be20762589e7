"""Losslessness of the speculative engine on tiny random models (greedy: exact; sampling: statistical)."""

import collections
import math

import pytest
import torch

from conftest import CORPUS, make_model_dir
from turbolm import SamplingParams, TurboLMError, encode_prompt, generate, load_target
from turbolm.speculative import ModelProposer, PromptLookupProposer, SpeculativeGenerator, TreeConfig
from turbolm.speculative import engine as engine_module
from turbolm.speculative.draft.model import DraftConfig, DraftModel
from turbolm.speculative.proposers.hybrid import HybridProposer
from turbolm.speculative.proposers.jakiro import JakiroProposer
from turbolm.speculative.proposers.small_model import truncated_draft

PROMPTS = [
    "The capital of France is Paris. The capital of",
    "Write a short poem about the sea.",
    "def add(a, b):",
    "Hello world! Numbers: 0 1 2 3",
    "Speculative decoding drafts tokens",
] + [CORPUS[i][: 10 + 3 * i] for i in range(5)] + [f"Question {i}: repeat after me: sea sky stars sea sky" for i in range(10)]
assert len(PROMPTS) == 20


def noisy_copy(directory, scale):
    """The target with noise on its weights: a draft that agrees with it part of the time."""
    model, _ = load_target(directory)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std())
    return model


def hybrid(target, mode: str, arch: str) -> HybridProposer:
    """Prompt lookup with a random trained-draft-shaped draft (Jakiro or EAGLE-2)."""
    torch.manual_seed(0)
    draft = DraftModel(DraftConfig.for_target(target, arch=arch)).eval()
    return HybridProposer(JakiroProposer(draft, target, TreeConfig(total_tokens=8, depth=3, top_k=3)), mode=mode)


@pytest.fixture(scope="module")
def setups(tiny_dirs, tmp_path_factory):
    """Per architecture: target, tokenizer, and proposers with no / partial / full acceptance, prompt
    lookup, and prompt lookup with a draft (hybrid: merged trees with a Jakiro draft, chosen trees
    with an EAGLE-2 one)."""
    out = {}
    dirs = dict(tiny_dirs)
    # Sliding-window variants: a window shorter than prompt + output exercises the windowed masks.
    dirs["mistral-window"] = make_model_dir(tmp_path_factory.mktemp("mw"), "mistral", sliding_window=24)
    dirs["qwen2-mixed-window"] = make_model_dir(
        tmp_path_factory.mktemp("qw"), "qwen2", use_sliding_window=True, sliding_window=24, max_window_layers=1
    )
    for arch in ("gemma2", "gemma3"):
        dirs[arch] = make_model_dir(tmp_path_factory.mktemp(arch), arch)
    for name, d in dirs.items():
        arch = name.split("-")[0]
        target, tok = load_target(d)
        other, _ = load_target(make_model_dir(tmp_path_factory.mktemp(f"{name}-other"), arch, seed=1))
        out[name] = (target, tok, {
            "none": ModelProposer(other, tok),
            "partial": ModelProposer(noisy_copy(d, 0.07), tok, TreeConfig(total_tokens=12, depth=4, top_k=3)),
            "full": ModelProposer(target, tok, TreeConfig(total_tokens=8, depth=6, top_k=1)),
            "prompt-lookup": PromptLookupProposer(TreeConfig(total_tokens=8, depth=5, top_k=2)),
            "hybrid-merge": hybrid(target, "merge", "jakiro"),
            "hybrid-choose": hybrid(target, "choose", "eagle2"),
        })
    return out


# ~8-12 s each with their 12 prompts: the three full-prompt architectures, Gemma-2 and the mixed
# sliding/full Qwen2 run with the slow tests (make test-fast keeps one sliding-window model and Gemma-3)
FULL = pytest.mark.slow


@pytest.mark.parametrize("name", [pytest.param("llama", marks=FULL), pytest.param("qwen2", marks=FULL),
                                  pytest.param("mistral", marks=FULL), "mistral-window",
                                  pytest.param("qwen2-mixed-window", marks=FULL), pytest.param("gemma2", marks=FULL),
                                  "gemma3"])
def test_greedy_is_identical_to_vanilla(setups, name):
    target, tok, proposers = setups[name]
    prompts = PROMPTS if name in ("llama", "qwen2", "mistral") else PROMPTS[:6]
    taus = collections.defaultdict(list)
    for prompt in prompts:
        ids = encode_prompt(tok, prompt)
        ref = generate(target, tok, ids, max_new_tokens=64)
        for kind, proposer in proposers.items():
            res = SpeculativeGenerator(target, tok, proposer).generate(ids, max_new_tokens=64)
            assert res.token_ids == ref.token_ids, f"{name} / {kind} diverged on {prompt!r}"
            assert res.finish_reason == ref.finish_reason
            taus[kind].append(res.tau)
    mean = {k: sum(v) / len(v) for k, v in taus.items()}
    # The three draft regimes really are different: otherwise the test proves less than it claims.
    assert mean["none"] < 1.3 and 1.3 < mean["partial"] < mean["full"], mean
    assert mean["full"] > 4


@pytest.mark.parametrize("name", ["qwen2-mixed-window", "gemma2", "gemma3"])
def test_windowed_vanilla_matches_model_generate(setups, name):
    target, tok, _ = setups[name]
    ids = encode_prompt(tok, PROMPTS[0])
    ref = target.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=64, do_sample=False)
    assert generate(target, tok, ids, max_new_tokens=64).token_ids == ref[0, len(ids):].tolist()


def test_eos_inside_an_accepted_path(setups):
    target, tok, proposers = setups["llama"]
    ids = encode_prompt(tok, PROMPTS[1])
    free = generate(target, tok, ids, max_new_tokens=30).token_ids
    eos = free[9]
    saved = target.generation_config.eos_token_id
    try:
        target.generation_config.eos_token_id = eos
        ref = generate(target, tok, ids, max_new_tokens=30)
        res = SpeculativeGenerator(target, tok, proposers["full"]).generate(ids, max_new_tokens=30)
    finally:
        target.generation_config.eos_token_id = saved
    assert res.token_ids == ref.token_ids and res.finish_reason == "eos" and res.token_ids[-1] == eos
    assert res.tau > 1  # the self-draft proposed past the EOS, and nothing past it was emitted


@pytest.mark.parametrize("n", [1, 2, 5, 13])
def test_max_new_tokens_exact(setups, n):
    target, tok, proposers = setups["llama"]
    ids = encode_prompt(tok, PROMPTS[0])
    res = SpeculativeGenerator(target, tok, proposers["full"]).generate(ids, max_new_tokens=n)
    assert res.token_ids == generate(target, tok, ids, max_new_tokens=n).token_ids and res.new_tokens == n


def test_stop_strings_and_streaming(setups):
    target, tok, proposers = setups["llama"]
    ids = encode_prompt(tok, PROMPTS[1])
    full = generate(target, tok, ids, max_new_tokens=40)
    stop = full.text[5:8]
    ref = generate(target, tok, ids, max_new_tokens=40, stop=[stop])
    gen = SpeculativeGenerator(target, tok, proposers["full"])
    chunks = list(gen.stream(ids, max_new_tokens=40, stop=[stop]))
    assert "".join(chunks) == ref.text == gen.result.text and gen.result.finish_reason == "stop"
    assert gen.result.token_ids == ref.token_ids


def test_context_limit_stops_cleanly(setups):
    target, tok, proposers = setups["llama"]  # context 512
    ids = [5] * 500
    ref = generate(target, tok, ids, max_new_tokens=64)
    res = SpeculativeGenerator(target, tok, proposers["full"]).generate(ids, max_new_tokens=64)
    assert res.token_ids == ref.token_ids and res.new_tokens <= 12
    with pytest.raises(TurboLMError, match="context"):
        SpeculativeGenerator(target, tok, proposers["full"]).generate([5] * 512, max_new_tokens=4)


def test_statistics(setups):
    target, tok, proposers = setups["llama"]
    res = SpeculativeGenerator(target, tok, proposers["partial"]).generate(encode_prompt(tok, PROMPTS[2]), max_new_tokens=40)
    s = res.stats
    hist = {int(k): v for k, v in s["tokens_per_step_histogram"].items()}
    assert sum(hist.values()) == s["steps"] == res.target_forwards - 1
    assert sum(k * v for k, v in hist.items()) >= res.new_tokens - 1  # the last step may be cut short
    assert s["draft_seconds"] > 0 and s["verify_seconds"] > 0


def test_vocabulary_mismatch_is_a_clear_error(tiny_dir, tmp_path):
    target, tok = load_target(tiny_dir)
    other, _ = load_target(make_model_dir(tmp_path, "llama", vocab_size=1000))
    with pytest.raises(TurboLMError, match="vocabulary"):
        SpeculativeGenerator(target, tok, ModelProposer(other))


def test_truncated_draft_shares_weights(tiny_dir):
    target, tok = load_target(tiny_dir)
    draft = truncated_draft(target, 1)
    assert len(draft.model.layers) == 1 and len(target.model.layers) == 2
    assert draft.lm_head.weight is target.lm_head.weight
    with pytest.raises(TurboLMError):
        truncated_draft(target, 2)
    ids = encode_prompt(tok, PROMPTS[0])
    res = SpeculativeGenerator(target, tok, ModelProposer(draft, tok)).generate(ids, max_new_tokens=30)
    assert res.token_ids == generate(target, tok, ids, max_new_tokens=30).token_ids


# --- sampling: the distribution of the first generated tokens -----------------------------------


def chi2_homogeneity(a: collections.Counter, b: collections.Counter, min_expected=5.0):
    """Two-sample chi-square statistic and degrees of freedom, rare categories pooled."""
    na, nb = sum(a.values()), sum(b.values())
    cats, pooled_a, pooled_b = [], 0, 0
    for key in set(a) | set(b):
        tot = a[key] + b[key]
        if tot * min(na, nb) / (na + nb) >= min_expected:
            cats.append((a[key], b[key]))
        else:
            pooled_a, pooled_b = pooled_a + a[key], pooled_b + b[key]
    if pooled_a + pooled_b:
        cats.append((pooled_a, pooled_b))
    stat = 0.0
    for ca, cb in cats:
        tot = ca + cb
        for obs, n in ((ca, na), (cb, nb)):
            exp = tot * n / (na + nb)
            stat += (obs - exp) ** 2 / exp
    return stat, len(cats) - 1


def chi2_critical(df, z=3.09):  # Wilson-Hilferty approximation of the p = 0.001 quantile
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def token_pairs(decode, n_runs):
    """Counters of (1st, 2nd) and (2nd, 3rd) generated tokens over seeded runs.

    The 1st token comes from the prefill; the 2nd and 3rd go through the acceptance rule
    (a tree of depth 2 drafted after the 1st).
    """
    first, second = collections.Counter(), collections.Counter()
    for seed in range(n_runs):
        ids = decode(seed)
        first[tuple(ids[0:2])] += 1
        second[tuple(ids[1:3])] += 1
    return first, second


@pytest.fixture(scope="module")
def sampling_setup(setups):
    target, tok, proposers = setups["llama"]
    ids = encode_prompt(tok, "Hello")
    params = dict(temperature=0.5, top_k=8, top_p=0.95)  # all three filters of the target distribution
    vanilla = token_pairs(
        lambda s: generate(target, tok, ids, max_new_tokens=4, sampling=SamplingParams(seed=10**6 + s, **params)).token_ids, 2000)
    spec = SpeculativeGenerator(target, tok, proposers["partial"])

    def run_spec():
        return token_pairs(
            lambda s: spec.generate(ids, max_new_tokens=4, sampling=SamplingParams(seed=s, **params)).token_ids, 2000)

    return vanilla, run_spec


@pytest.mark.slow  # ~14 s: thousands of sampled steps (tests/test_verify.py checks the rule itself, fast)
def test_speculative_sampling_keeps_the_target_distribution(sampling_setup):
    vanilla, run_spec = sampling_setup
    for ours, theirs in zip(run_spec(), vanilla):
        stat, df = chi2_homogeneity(theirs, ours)
        assert df >= 5 and stat < chi2_critical(df), (stat, df)


@pytest.fixture(scope="module")
def bigram_sampling(near_bigram):
    """Vanilla sampling counters on the near-bigram target (tests/conftest.py), whose draft is often
    accepted: the hybrid sampling tests then exercise the acceptance rule, not only the residual."""
    target, tok, draft = near_bigram
    ids = encode_prompt(tok, "Hello")
    params = dict(temperature=0.5, top_k=8, top_p=0.95)
    vanilla = token_pairs(
        lambda s: generate(target, tok, ids, max_new_tokens=4, sampling=SamplingParams(seed=10**6 + s, **params)).token_ids,
        2000)
    return target, tok, draft, ids, params, vanilla


@pytest.mark.slow  # ~15 s each
@pytest.mark.parametrize("mode", ["merge", "choose"])
def test_hybrid_sampling_keeps_the_target_distribution(bigram_sampling, mode):
    """Prompt lookup with a draft, merged or chosen per step, samples exactly as the target does:
    the tree depends on earlier steps' outcomes (choose), never on the step being verified."""
    target, tok, draft, ids, params, vanilla = bigram_sampling
    proposer = HybridProposer(JakiroProposer(draft, target, TreeConfig(total_tokens=8, depth=3, top_k=3)), mode=mode)
    spec = SpeculativeGenerator(target, tok, proposer)
    taus = []

    def decode(seed):
        result = spec.generate(ids, max_new_tokens=4, sampling=SamplingParams(seed=seed, **params))
        taus.append(result.tau)
        return result.token_ids

    for ours, theirs in zip(token_pairs(decode, 2000), vanilla):
        stat, df = chi2_homogeneity(theirs, ours)
        assert df >= 5 and stat < chi2_critical(df), (stat, df)
    assert sum(taus) / len(taus) > 1.2  # drafted tokens were accepted: the rule was exercised


@pytest.mark.slow  # ~14 s
def test_sampling_test_fails_for_a_wrong_acceptance_rule(sampling_setup, monkeypatch):
    def wrong(tree, target_probs, generator=None):
        # Accepts the draft's first candidate too often: uses p(x) / q(x) with a wrong q = 0.5.
        p = target_probs(0)
        kids = tree.children[0]
        if kids and torch.rand((), generator=generator) < min(1.0, float(p[tree.tokens[kids[0]]]) / 0.5):
            return [kids[0]], int(torch.multinomial(target_probs(kids[0]), 1, generator=generator))
        return [], int(torch.multinomial(p, 1, generator=generator))

    vanilla, run_spec = sampling_setup
    monkeypatch.setattr(engine_module, "accept_sampling", wrong)
    stat, df = chi2_homogeneity(vanilla[0], run_spec()[0])
    assert stat > chi2_critical(df), (stat, df)
