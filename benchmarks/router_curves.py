"""Held-out KL against training steps for router runs, with the static router's level:
    python benchmarks/router_curves.py OUT.png STATIC_KL LABEL=train_log.jsonl [LABEL=train_log.jsonl ...]"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    out, static = sys.argv[1], float(sys.argv[2])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for spec in sys.argv[3:]:
        label, path = spec.split("=", 1)
        rows = [json.loads(line) for line in open(path) if "heldout_kl" in line]
        ax.plot([0] + [r["step"] for r in rows], [static] + [r["heldout_kl"] for r in rows], marker="o", label=label)
    ax.axhline(static, color="grey", linestyle="--", label="static router")
    ax.axhline(static * 0.9, color="grey", linestyle=":", label="goal: 10% below static")
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out KL(dense || pruned)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


if __name__ == "__main__":
    main()
