"""Lego or reassign problems of k steps in longer texts: m times the generator's distractor clauses, as a JSONL
test file for ``tools/evaluate.py --test_file`` (does a model lose on long chains, or on long texts?).
  python long_texts.py <task> <k> <m> <problems> <out.jsonl> [<lego negation rate, e.g. 0 as its recipe>]
  (results/chain/README.md: reassign k = 8, m = 1..4; k = 4, m = 4 and 8; k = 16, m = 1;
   lego with negation rate 0: k = 4, m = 1, 3, 6; k = 8, m = 1..4; k = 16, m = 1)
Drawn with the generator's ``distractor_scale`` (m uniform in 1..M), keeping the problems whose m is the one
asked for, so a file is the generator's own problems of that length."""
import json
import math
import sys

import numpy as np

from tfmstep.data import chains

# Clauses (";"-ended) in a problem of k steps with m times the distractors.
CLAUSES = {"reassign": lambda k, m: (1 + m) * k, "lego": lambda k, m: k + 1 + m * math.ceil(k / 2)}


def problems(task: str, k: int, m: int, count: int, negation_rate: float | None = None, seed: int = 1234):
    rng = np.random.default_rng([seed, k, m])
    while count:
        text, answer = chains.generate_problem(task, k, rng, distractor_scale=m, negation_rate=negation_rate)
        if text.count(";") == CLAUSES[task](k, m):
            count -= 1
            yield {"input": text, "answer": answer, "steps": k}


if __name__ == "__main__":
    task, k, m, count, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    negation_rate = float(sys.argv[6]) if len(sys.argv) > 6 else None
    with open(out, "w") as f:
        for problem in problems(task, k, m, count, negation_rate):
            f.write(json.dumps(problem) + "\n")
