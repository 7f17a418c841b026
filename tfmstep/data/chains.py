"""Multi-step reasoning tasks whose difficulty knob is the chain length (number of hops).

Every task is written in one token format, so one model reads them all. A problem is a set of tokens;
token i has an own ``name``, the ``parent`` name it reads from, an ``op`` (the rule applied to the
parent's answer) and, for roots only, a given ``value``. The answer of token i is
``op_i(answer(parent_i))``, so a token at depth d (d hops from a root) needs d rule applications:

- ``lego``: LEGO-style group chain. Variables x_0..x_L, x_0 = c given, x_j = s * x_parent + a (mod p)
  with s in {+1, -1}; clauses shuffled; every variable is queried.
- ``running_sum``: running sum mod p (parity for p=2) over a sequence a_0..a_L, in order. No names: the
  parent of element j is element j-1, found through the model's relative-position bias.
- ``pointer``: pointer chasing in a random forest with distractor edges: every node points to its
  successor, a sink carries a given label (one of ``modulus``), and each node's answer is the label of
  the sink it reaches. The start node is L hops from its sink; distractor nodes hang off the main chain
  or start chains of their own that end in differently labelled sinks. (Answering the sink's *name*, one
  of ``num_names`` classes, trained far slower: 0.60 exact match after 3000 steps.)
- ``kinship``: relation composition in a random family tree: "person j is R of person parent(j)"; the
  answer of every person is their relation to the root person, i.e. R_j composed with the parent's
  answer. Relations compose like the symmetric group S3 (6 relations, not commutative: the order of the
  path matters, as in real kinship terms).

Labels are ``target`` (the answer class of every token) and ``depth`` (its hop count, -1 on padding).
The chain length of a problem is its largest depth. Names are drawn at random from ``num_names`` for each
problem, so every name is trained and nothing depends on where a token sits in the sequence.
"""

from __future__ import annotations

import itertools

import numpy as np
import tensorflow as tf

from tfmstep.errors import UserError

TASKS = ("lego", "running_sum", "pointer", "kinship")
FEATURES = ("name", "parent", "op", "value")
ROOT_OP = 1  # op id of a root token (its answer is its given value); 0 is padding

# S3 as permutations of (0, 1, 2); element 0 is the identity ("self").
S3 = tuple(itertools.permutations(range(3)))
S3_INDEX = {p: i for i, p in enumerate(S3)}


def s3_compose(a: int, b: int) -> int:
    """Index of the permutation a o b (apply b, then a)."""
    pa, pb = S3[a], S3[b]
    return S3_INDEX[tuple(pa[pb[i]] for i in range(3))]


S3_TABLE = np.array([[s3_compose(a, b) for b in range(6)] for a in range(6)], np.int64)


def tokens_for_length(task: str, length: int) -> int:
    """Tokens in one problem of chain length ``length`` (pointer/kinship add ``length`` distractors)."""
    return 2 * length + 1 if task in ("pointer", "kinship") else length + 1


def num_classes(task: str, modulus: int, num_names: int) -> int:
    return {"lego": modulus, "running_sum": modulus, "pointer": modulus, "kinship": len(S3)}[task]


def num_ops(task: str, modulus: int) -> int:
    return {"lego": 2 + 2 * modulus, "running_sum": 2 + modulus, "pointer": 3, "kinship": 2 + len(S3)}[task]


def validate_task(task: str, modulus: int, num_names: int, train_min_len: int, train_max_len: int,
                  test_max_len: int) -> None:
    """Raise a one-line UserError for a task that cannot be generated."""
    if task not in TASKS:
        raise UserError(f"unknown chain task {task!r}; choose one of {', '.join(TASKS)}")
    if train_min_len < 1:
        raise UserError(f"chain length must be >= 1, got train_min_len={train_min_len}")
    if train_max_len < train_min_len:
        raise UserError(f"train_max_len ({train_max_len}) must be >= train_min_len ({train_min_len})")
    if test_max_len < 1:
        raise UserError(f"chain length must be >= 1, got test_max_len={test_max_len}")
    if task in ("lego", "running_sum", "pointer") and modulus < 2:
        raise UserError(f"modulus must be >= 2 for task {task!r}, got {modulus}")
    longest = max(train_max_len, test_max_len)
    needed = tokens_for_length(task, longest)
    if task != "running_sum" and num_names < needed:
        raise UserError(f"num_names={num_names} is too small for task {task!r} at chain length {longest}: "
                        f"a problem has {needed} tokens, each needs its own name")


def _random_forest(length: int, extra: int, rng: np.random.Generator, new_root_prob: float):
    """Parents (index or -1) of a forest: a main path 0..length plus ``extra`` nodes of depth <= length.

    Node 0 is the main root and node ``length`` the deepest; extra nodes attach to a random earlier
    node of depth < length, or (with ``new_root_prob``) start a tree of their own.
    """
    parents = [-1] + list(range(length))
    depths = list(range(length + 1))
    for _ in range(extra):
        if rng.random() < new_root_prob:
            parents.append(-1)
            depths.append(0)
        else:
            candidates = [i for i, d in enumerate(depths) if d < length]
            j = candidates[rng.integers(len(candidates))]
            parents.append(j)
            depths.append(depths[j] + 1)
    return np.array(parents), np.array(depths)


def generate_problem(task: str, length: int, rng: np.random.Generator, modulus: int = 5,
                     num_names: int = 80) -> dict:
    """One problem of exactly ``length`` hops: dict of int arrays (one entry per token, unpadded)."""
    n = tokens_for_length(task, length)
    if task == "running_sum":
        parents, depths = np.arange(-1, n - 1), np.arange(n)
    elif task == "lego":
        parents, depths = np.arange(-1, n - 1), np.arange(n)
    else:
        parents, depths = _random_forest(length, length, rng,
                                         new_root_prob=0.3 if task == "pointer" else 0.0)
    answers = np.zeros(n, np.int64)
    ops = np.zeros(n, np.int64)
    values = np.zeros(n, np.int64)  # 0 = not given; else answer + 1
    names = np.zeros(n, np.int64)
    if task != "running_sum":
        names = rng.choice(np.arange(1, num_names + 1), size=n, replace=False)
    # Nodes in index order visit every parent before its children.
    for i in range(n):
        p = parents[i]
        if task == "lego":
            if p < 0:
                answers[i] = rng.integers(modulus)
            else:
                sign, add = rng.integers(2), rng.integers(modulus)
                ops[i] = 2 + sign * modulus + add
                answers[i] = ((-1 if sign else 1) * answers[p] + add) % modulus
        elif task == "running_sum":
            add = rng.integers(modulus)
            ops[i] = 2 + add
            answers[i] = add if p < 0 else (answers[p] + add) % modulus
        elif task == "pointer":
            ops[i] = 2
            answers[i] = rng.integers(modulus) if p < 0 else answers[p]
        else:  # kinship
            relation = rng.integers(len(S3))
            ops[i] = 2 + relation
            answers[i] = 0 if p < 0 else S3_TABLE[relation, answers[p]]
        if p < 0:
            ops[i] = ROOT_OP
            values[i] = answers[i] + 1
    parent_names = np.where(parents >= 0, names[np.maximum(parents, 0)], 0)
    if task == "running_sum":
        parent_names = np.zeros(n, np.int64)  # order is the only link
        order = np.arange(n)
    else:
        order = rng.permutation(n)  # shuffle the clauses
    return {"name": names[order], "parent": parent_names[order], "op": ops[order],
            "value": values[order], "target": answers[order], "depth": depths[order]}


def generate_batch(task: str, lengths, rng: np.random.Generator, pad_to: int, modulus: int = 5,
                   num_names: int = 80) -> dict:
    """Problems of the given lengths, padded to ``pad_to`` tokens (op 0, depth -1 on padding)."""
    batch = {k: np.zeros((len(lengths), pad_to), np.int32) for k in FEATURES + ("target",)}
    batch["depth"] = np.full((len(lengths), pad_to), -1, np.int32)
    for row, length in enumerate(lengths):
        problem = generate_problem(task, int(length), rng, modulus, num_names)
        for key, value in problem.items():
            batch[key][row, :len(value)] = value
    return batch


def _split(batch: dict):
    return ({k: batch[k] for k in FEATURES}, {"target": batch["target"], "depth": batch["depth"]})


_SPLIT_CODE = {"train": 0, "validation": 1, "test": 2}


def chain_dataset(task: str, split: str, batch_size: int, *, seed: int = 0, start_batch: int = 0,
                  train_min_len: int = 1, train_max_len: int = 8, test_max_len: int = 32,
                  modulus: int = 5, num_names: int = 80, eval_examples: int = 512) -> tf.data.Dataset:
    """(inputs, labels) batches. "train": infinite, lengths uniform in [train_min_len, train_max_len],
    batch k generated from the seed (seed, 0, k) alone. "validation": the train length range, finite.
    "test": lengths uniform in [1, test_max_len], finite."""
    if split not in _SPLIT_CODE:
        raise UserError(f"unknown split {split!r}; choose train, validation or test")
    low, high = (1, test_max_len) if split == "test" else (train_min_len, train_max_len)
    pad_to = tokens_for_length(task, high)

    def make(batch_index):
        rng = np.random.default_rng([seed, _SPLIT_CODE[split], int(batch_index)])
        lengths = rng.integers(low, high + 1, size=batch_size)
        batch = generate_batch(task, lengths, rng, pad_to, modulus, num_names)
        return tuple(batch[k] for k in FEATURES + ("target", "depth"))

    keys = FEATURES + ("target", "depth")
    if split == "train":
        def to_tensors(k):
            arrays = tf.numpy_function(make, [k], [tf.int32] * len(keys), stateful=False)
            batch = {}
            for key, array in zip(keys, arrays):
                array.set_shape((batch_size, pad_to))
                batch[key] = array
            return _split(batch)
        return (tf.data.Dataset.range(int(start_batch), 2**62)
                .map(to_tensors, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
                .prefetch(tf.data.AUTOTUNE))
    num_batches = max(1, eval_examples // batch_size)
    arrays = [make(b) for b in range(num_batches)]
    batch = {k: np.concatenate([a[i] for a in arrays]) for i, k in enumerate(keys)}
    return tf.data.Dataset.from_tensor_slices(_split(batch)).batch(batch_size, drop_remainder=True)


def fixed_length_batches(task: str, length: int, num_examples: int, batch_size: int, *, seed: int = 0,
                         modulus: int = 5, num_names: int = 80):
    """Numpy (inputs, labels) batches of problems of exactly ``length`` hops (for evaluation)."""
    rng = np.random.default_rng([seed, 3, length])
    out = []
    for start in range(0, num_examples, batch_size):
        size = min(batch_size, num_examples - start)
        batch = generate_batch(task, [length] * size, rng, tokens_for_length(task, length), modulus,
                               num_names)
        out.append(_split(batch))
    return out
