"""The shipped drafts on the real default model (slow; CI runs it): they load, they are
accepted (tau well above 1), and greedy output is identical to vanilla."""

import pytest

from turbolm import encode_prompt, generate
from turbolm.speculative import SpeculativeGenerator, TreeConfig
from turbolm.speculative.draft.model import load_draft, shipped_draft
from turbolm.speculative.proposers.jakiro import JakiroProposer

pytestmark = pytest.mark.slow

PROMPTS = [
    "Give three tips for staying healthy.",
    "Translate 'Good morning, how are you?' into French.",
    "Explain what a binary search is.",
]


@pytest.mark.parametrize("arch, mode", [("jakiro", "mixture"), ("jakiro", "decoupled"), ("eagle2", None)])
def test_shipped_draft_is_lossless_and_accepted(default_model, arch, mode):
    model, tok = default_model
    draft = load_draft(shipped_draft(arch), model, overrides={"candidate_mode": mode} if mode else None)
    gen = SpeculativeGenerator(model, tok, JakiroProposer(draft, model, TreeConfig(total_tokens=16, depth=4, top_k=4)))
    taus = []
    for prompt in PROMPTS:
        ids = encode_prompt(tok, prompt)
        res = gen.generate(ids, max_new_tokens=64)
        assert res.token_ids == generate(model, tok, ids, max_new_tokens=64).token_ids
        taus.append(res.tau)
    assert sum(taus) / len(taus) > 1.5, taus


def test_demo_on_the_default_model(capsys):
    """`make demo`'s command: hybrid (prompt lookup + the shipped Jakiro draft), stored acceptance statistics, tree sized for
    this machine, fast CPU kernels where they help; every answer identical to vanilla's."""
    from turbolm.cli import main

    assert (shipped_draft("jakiro") / "acceptance.json").is_file()
    rc = main(["demo", "--max-new-tokens", "48"])
    out, err = capsys.readouterr()
    assert rc == 0 and "tree auto:" in err and "measuring this draft's acceptance" not in err
    table = out[out.index("| prompt |"):].splitlines()
    assert len(table) == 6 and all(line.endswith("| yes |") for line in table[2:]), table
