"""Each problem of k = K queried at chain depths d (the same text, "?<the chain's name at depth d>"), answered
after exactly n iterations (no halting): when the answer of a depth-d query appears tells how many lookups an
iteration makes. Lego (no negation, as the recipe) or kinship.
  python query_over_loops.py <workdir> <K> <problems> <depths> <loops> [lego|kinship]
  (results/chain/README.md: lego 16 128 1,2,4,8,12,16 2,3,5,9,13,17,20,30,60; kinship 12 128 1,4,8,12 2,5,7,9,11,13,16,30)"""
import sys
import numpy as np
import tensorflow as tf
from tfmstep import saving
from tfmstep.data import chains

workdir, task, K, P = sys.argv[1], sys.argv[6] if len(sys.argv) > 6 else "lego", int(sys.argv[2]), int(sys.argv[3])
depths = [int(x) for x in sys.argv[4].split(",")]
loops = [int(x) for x in sys.argv[5].split(",")]
model, config, _ = saving.load_trained(workdir)
c = model.config
rng = np.random.default_rng(11)
texts = {d: [] for d in depths}
truth = {d: [] for d in depths}
for _ in range(P):
    text, answer = chains.generate_problem(task, K, rng, negation_rate=0 if task == "lego" else None)
    body, query = text.rsplit("?", 1)
    clauses = [x for x in body.split(";") if x]
    parent = {x.split("=")[0]: x.split("=")[1][1 if task == "lego" else 2] for x in clauses if not x.split("=")[1].isdigit()}
    chain = [query]
    while chain[-1] in parent:
        chain.append(parent[chain[-1]])
    chain = chain[::-1]
    for d in depths:
        t = body + "?" + chain[d]
        texts[d].append(t)
        truth[d].append(chains.encode(chains.solve(task, t)[0], "answer")[0])
width = max(len(t) for t in texts[depths[0]]) + c.answers
print(f"{task} K={K}, {P} problems, query at chain depth d, exactly n iterations; {workdir}")
print("depth  " + "  ".join(f"n={n:3d}" for n in loops))
for d in depths:
    tokens = tf.constant(np.array([chains.pad_problem(chains.problem_ids(t, c.answers), width, c.answers)
                                   for t in texts[d]], np.int32))
    row = []
    for n in loops:
        out = model({"tokens": tokens}, training=False, num_loops=n, use_halting=False)
        row.append((np.argmax(out["logits"].numpy(), -1)[:, 0] == np.array(truth[d])).mean())
    print(f"{d:5d}  " + "  ".join(f"{a:.3f}" for a in row), flush=True)
