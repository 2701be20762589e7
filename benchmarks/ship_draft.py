"""Stage a draft continued with `turbolm draft train --init PREVIOUS` for shipping (issue 15).

Writes OUT with the run's weights in float16, its log and loss plot, and a ``training.json`` that
records the run's settings, its held-out agreement, the previous draft's agreement on the *same*
held-out samples (evaluated here), and the previous draft's own ``training.json`` (the whole
history). Then calibrate OUT (``turbolm draft calibrate --draft OUT``) and copy it over the shipped
checkpoint. What this session did for both shipped drafts:

    python benchmarks/ship_draft.py --run runs/cont2/jakiro --previous turbolm/checkpoints/jakiro-smollm2-135m \\
        --out runs/ship2/jakiro --git 2ebaa9f --data-note "4,064 samples of the target's own answers ..."

A run trained elsewhere (a GPU lease brings back the weights and logs, not the training state, and
its data path is that machine's): give its settings with --recipe (a JSON of `TrainConfig`
fields) and evaluate on this machine's preparation of the same held-out samples with --eval-data
(the recipe's `eval_samples` last samples of those directories); both drafts are then scored here.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from turbolm.core.machine import describe_machine
from turbolm.core.models import model_identity
from turbolm.speculative.draft.model import load_draft
from turbolm.speculative.draft.train import TrainConfig, evaluate, sample_split, target_and_data


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a finished `turbolm draft train` output directory")
    ap.add_argument("--previous", required=True, help="the checkpoint the run started from (--init)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--git", required=True, help="the commit that holds the previous checkpoint")
    ap.add_argument("--data-note", required=True, help="where the training data came from (one sentence)")
    ap.add_argument("--recipe", help="the run's TrainConfig as JSON, for a run whose training state is not here")
    ap.add_argument("--trained-on", help="the machine the run trained on, in words (default: this one)")
    ap.add_argument("--eval-data", nargs="+", help="prepared directories whose last samples are the run's held-out ones")
    a = ap.parse_args()
    run, previous, out = Path(a.run), Path(a.previous), Path(a.out)
    if a.recipe:
        recipe, seconds = json.loads(Path(a.recipe).read_text()), None
    else:
        state = json.loads((run / json.loads((run / "latest.json").read_text())["state"] / "state.json").read_text())
        recipe, seconds = state["config"], state["seconds"]
    evals = [r for r in map(json.loads, (run / "train_log.jsonl").read_text().splitlines()) if "eval" in r]
    if not evals:
        raise SystemExit(f"{run} has no held-out evaluation: finish the run first")

    cfg = TrainConfig(**recipe)
    if a.eval_data:  # the same held-out samples, prepared on this machine, with the default target
        cfg = replace(cfg, data=a.eval_data, target=None, max_samples=0)
    target, dataset, embed, head = target_and_data(cfg, torch.device("cpu"), False)
    held_out = sample_split(cfg, len(dataset))[1]
    before = evaluate(load_draft(previous, target).float(), embed, head.weight, dataset, held_out, recipe["eval_depth"])
    draft = load_draft(run, target)
    here = evaluate(draft.float(), embed, head.weight, dataset, held_out, recipe["eval_depth"]) if a.eval_data else None

    # The staged draft names the target it was checked against here: a run trained elsewhere recorded
    # that machine's copy (a bf16 target on a GPU matches only through the embedding probe).
    draft.config.target = model_identity(target)
    draft.save(out, dtype=torch.float16)
    for name in ("train_log.jsonl", "loss.png"):
        if (run / name).is_file():
            shutil.copy(run / name, out / name)
    history = json.loads((previous / "training.json").read_text())
    training = {
        "recipe": recipe,
        "train_minutes": round(seconds / 60, 1) if seconds is not None else None,
        "machine": a.trained_on or describe_machine(),
        "data": a.data_note,
        "continued_from": {"checkpoint": f"the previous {previous} (git {a.git})", "its_training": history},
        "held_out_agreement": evals[-1]["eval"],
        **({"held_out_agreement_here": {**here, "note": "this draft on this machine's preparation of the held-out "
                                        "samples (the same features as 'before')"}} if here else {}),
        "held_out_agreement_before": {**before, "note": "the previous shipped draft on the same held-out samples"},
        "note": history.get("note", "weights stored in float16"),
    }
    (out / "training.json").write_text(json.dumps(training, indent=1))
    print(out, "held-out agreement", json.dumps((here or evals[-1]["eval"])["agree"]), "before", json.dumps(before["agree"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
