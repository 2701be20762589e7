"""The speculation gate (``--adaptive``): plain steps where speculation is measured not to pay,
speculation where it does, and the output stays the target's own whichever steps it takes."""

import random

import pytest

from turbolm import encode_prompt, generate
from turbolm.core.errors import ParameterError
from turbolm.speculative import PromptLookupProposer, SpeculativeGenerator, TreeConfig
from turbolm.speculative.gate import SpeculationGate
from turbolm.speculative.proposers.hybrid import HybridProposer
from turbolm.speculative.proposers.jakiro import JakiroProposer

PROMPTS = ["Write a short poem about the sea.", "The capital of France is", "def add(a, b):"]


def simulate(gate: SpeculationGate, spec_tokens, spec_seconds: float, plain_seconds: float, steps: int,
             nodes=lambda i: 4) -> list[bool]:
    """Run the gate on made-up step outcomes: step i proposes ``nodes(i)`` nodes; verified, they
    commit ``spec_tokens(i)`` tokens in ``spec_seconds``; a plain step commits 1 in ``plain_seconds``."""
    choices = []
    for i in range(steps):
        s = gate.verify(nodes(i))
        choices.append(s)
        gate.record(nodes(i) if s else 0, spec_tokens(i) if s else 1, spec_seconds if s else plain_seconds)
    return choices


def test_gate_speculates_where_it_pays():
    # 2.5 tokens per 80 ms against 1 per 50 ms: speculation, but the plain cost is re-measured now and then
    choices = simulate(SpeculationGate(), lambda i: 2.5, 0.080, 0.050, 400)
    assert sum(choices) > 0.95 * len(choices)  # one plain step in replain + 1 = 33
    assert not all(choices)


def test_gate_steps_plainly_where_speculation_does_not_pay():
    # 1.2 tokens per 80 ms against 1 per 50 ms: plain steps, probes of speculation ever rarer
    gate = SpeculationGate(interval=2, max_interval=16)
    choices = simulate(gate, lambda i: 1.2, 0.080, 0.050, 400)
    assert sum(choices[50:]) < 0.08 * 350
    assert gate.arms[4].interval == 16
    assert gate.stats() == {"adaptive": {"speculative_steps": sum(choices), "plain_steps": 400 - sum(choices)}}


def test_gate_comes_back_when_the_text_becomes_draftable():
    gate = SpeculationGate(interval=2, max_interval=16)
    choices = simulate(gate, lambda i: 1.0, 0.080, 0.050, 200)
    assert sum(choices[100:]) < 10
    later = simulate(gate, lambda i: 4.0, 0.080, 0.050, 100)  # every probe from now on commits 4 tokens
    first = later.index(True)
    assert first <= 16 and sum(later[first:]) > 0.9 * len(later[first:])


def test_gate_start_forgets_the_previous_text():
    gate = SpeculationGate()
    simulate(gate, lambda i: 1.0, 0.080, 0.050, 100)
    gate.start()
    assert gate.verify(4) and gate.spec_steps == 0 and gate.plain_seconds is None and list(gate.arms) == [4]


@pytest.mark.parametrize("kwargs", [{"warmup": 0}, {"interval": 0}, {"max_interval": -1}, {"replain": 0},
                                    {"smoothing": 0.0}, {"smoothing": 1.5}])
def test_gate_settings_are_checked(kwargs):
    with pytest.raises(ParameterError, match=next(iter(kwargs))):
        SpeculationGate(**kwargs)


def test_gate_tells_tree_sizes_apart():
    """Big trees (say, with n-gram nodes merged in) that pay and small ones that do not: the gate
    verifies the first kind and steps plainly instead of the second."""
    gate = SpeculationGate()
    big = lambda i: 12 if i % 3 == 0 else 2  # noqa: E731
    choices = simulate(gate, lambda i: 5.0 if big(i) == 12 else 1.1, 0.080, 0.050, 600, nodes=big)
    verified_big = [c for i, c in enumerate(choices) if big(i) == 12][30:]
    verified_small = [c for i, c in enumerate(choices) if big(i) == 2][30:]
    assert sum(verified_big) > 0.9 * len(verified_big) and sum(verified_small) < 0.2 * len(verified_small)


class CoinGate(SpeculationGate):
    """Verifies on a seeded coin flip: mixes plain and speculative steps in every order."""

    def __init__(self, seed: int):
        super().__init__()
        self.rng = random.Random(seed)

    def verify(self, nodes: int) -> bool:
        return self.rng.random() < 0.5


def test_mixed_plain_and_speculative_steps_stay_lossless(near_bigram):
    """Plain steps (the root alone) between speculative ones: the draft catches up on every skipped
    position (Jakiro's features, the n-gram index) and greedy output stays vanilla's."""
    target, tok, draft = near_bigram
    tree = TreeConfig(total_tokens=8, depth=3, top_k=3)
    proposers = {
        "jakiro": JakiroProposer(draft, target, tree),
        "hybrid-merge": HybridProposer(JakiroProposer(draft, target, tree), mode="merge"),
        "hybrid-choose": HybridProposer(JakiroProposer(draft, target, tree), mode="choose"),
        "prompt-lookup": PromptLookupProposer(TreeConfig(total_tokens=8, depth=5, top_k=2)),
    }
    for seed, prompt in enumerate(PROMPTS):
        ids = encode_prompt(tok, prompt)
        ref = generate(target, tok, ids, max_new_tokens=48)
        for kind, proposer in proposers.items():
            gate = CoinGate(seed)
            res = SpeculativeGenerator(target, tok, proposer, adaptive=gate).generate(ids, max_new_tokens=48)
            assert res.token_ids == ref.token_ids, f"{kind} diverged on {prompt!r}"
            counts = res.stats["adaptive"]
            assert counts["plain_steps"] > 0 and counts["speculative_steps"] > 0
            assert counts["plain_steps"] + counts["speculative_steps"] == res.stats["steps"]
            if kind != "prompt-lookup":
                assert res.tau > 1.2, (kind, res.tau)  # speculative steps were accepted after plain ones


def test_adaptive_decoder_from_a_spec(near_bigram):
    """``DecoderSpec(adaptive=True)`` (``--adaptive``) builds a gated decoder; output is vanilla's."""
    from turbolm.speculative import DecoderSpec, build_decoder

    target, tok, _ = near_bigram
    decoder = build_decoder(target, tok, DecoderSpec("prompt-lookup", adaptive=True))
    ids = encode_prompt(tok, PROMPTS[0])
    res = decoder.generate(ids, max_new_tokens=40)
    assert res.token_ids == generate(target, tok, ids, max_new_tokens=40).token_ids
    assert sum(res.stats["adaptive"].values()) == res.stats["steps"]
    with pytest.raises(ParameterError, match="adaptive"):
        DecoderSpec("none", adaptive=True).check()
