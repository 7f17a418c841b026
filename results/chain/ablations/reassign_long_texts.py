"""Reassign problems of k steps in longer texts: m * k distractor statements instead of the generator's k, as
a JSONL test file for ``tools/evaluate.py --test_file`` (does a model lose on long chains, or on long texts?).
  python reassign_long_texts.py <k> <m> <problems> <out.jsonl>     (README: k = 8, m = 1..4; k = 4, m = 4 and 8; k = 16, m = 1)
Drawn with the generator's ``distractor_scale`` (m uniform in 1..M), keeping the problems whose m is the one
asked for, so a file is the generator's own problems of that length."""
import json
import sys

import numpy as np

from tfmstep.data import chains


def problems(k: int, m: int, count: int, seed: int = 1234):
    rng = np.random.default_rng([seed, k, m])
    while count:
        text, answer = chains.generate_problem("reassign", k, rng, distractor_scale=m)
        if text.count(";") == (1 + m) * k:  # k chain statements + m * k distractors
            count -= 1
            yield {"input": text, "answer": answer, "steps": k}


if __name__ == "__main__":
    k, m, count, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    with open(out, "w") as f:
        for problem in problems(k, m, count):
            f.write(json.dumps(problem) + "\n")
