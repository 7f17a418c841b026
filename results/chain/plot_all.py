"""One figure of every chain task's accuracy-vs-length curve, from the reports tools/evaluate.py wrote.

    python results/chain/plot_all.py [--out results/chain/curves.png]

Reads results/chain/<task>.json (each written by ``tools/evaluate.py --output_dir=results/chain
--name=<task>``) and draws exact match against chain length per task: the looped model, the same with 2x the
loops forced, and the stacked baseline where one was evaluated. The per-task figures (<task>.png) also have
the halting curves; this one puts the six side by side.
"""

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tfmstep import fileio  # noqa: E402
from tfmstep.models.chain_transformer.evaluate import plot_accuracy  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TASKS = ("parity", "pointer", "registers", "lego", "kinship", "reassign")
# What guessing scores: the answer's classes (registers: three digits at once; lego, reassign: values mod 5,
# the recipes' modulus).
CHANCE = {"parity": 1 / 2, "pointer": 1 / 2, "registers": 1 / 1000, "lego": 1 / 5, "kinship": 1 / 6,
          "reassign": 1 / 5}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(HERE, "curves.png"))
    args = parser.parse_args()
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), sharey=True)
    for ax, task in zip(axes.flat, TASKS):
        with open(os.path.join(HERE, f"{task}.json")) as f:
            report = json.load(f)
        plot_accuracy(ax, report, chance=CHANCE[task])
        trained = max(run["train_lengths"][1] for run in report["runs"].values())
        ax.set_title(f"{task} (trained k <= {trained}; red: chance)")
    for ax in axes[:, 0]:
        ax.set_ylabel("full-answer exact match")
    fig.tight_layout()
    fileio.atomic_save_figure(fig, args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
