"""Multi-step reasoning problems as plain text, whose difficulty knob is the chain length k.

A problem is a line of text and a short answer, as a user would have it; the model reads it through a
character tokenizer and has to find the structure itself. ``k`` is the number of reasoning steps a
solver needs (each one applies a rule to the result of the step before: y_n = f(y_{n-1})); generators
know it, and training may use it, but nothing at inference does. Six task families:

- ``lego``: shuffled clauses of a group chain mod ``modulus``: ``b=-a+2;a=3;d=+a+1;c=+b+0;?c`` -> ``4``
  (x = sign * parent + addend), plus k/2 distractor clauses (``d``) off the chain. Clauses are shuffled,
  so the order must be found by name.
- ``parity``: running parity of a bit string: ``10110?`` -> ``1`` (k = number of bits).
- ``pointer``: pointer chasing against a decoy: ``a>b;d>e;b=3;e=1;?a`` -> ``3``: the label of the sink the
  queried node reaches in k hops; a second chain, as long while the 52 names last, ends in another label.
- ``kinship``: relation composition in a family tree: ``b=4(a);a=0;c=2(b);?c`` -> the relation of c to
  the root a, where the six relations compose like the (non-commutative) group S3, so path order matters.
- ``registers`` (a state of several tokens): three registers run a program of k instructions in order:
  ``351:A+B;C=A;B-7;=`` -> ``888`` (every register's final value, mod 10).
- ``reassign`` (a dependency that is computed, not given): a program that reassigns a few variables:
  ``a=4;b=a+2;a=b-1;c=3;?a`` -> ``0`` (values mod ``modulus``, as lego's). Which earlier statement a read
  refers to is the most recent assignment of that name, which depends on everything in between.

Every generator is checked against ``solve``, an independent slow parser/interpreter of the text.
Names are drawn at random for each problem from 52 letters, so nothing depends on a particular name.
``file`` tasks read JSONL lines ``{"input": ..., "answer": ..., "steps": k}`` (steps optional).
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import string

import numpy as np
import tensorflow as tf

from tfmstep.errors import UserError

TASKS = ("lego", "parity", "pointer", "kinship", "registers", "reassign")
FILE_TASK = "file"
NAMES = string.ascii_lowercase + string.ascii_uppercase  # 52 single-character names
ANSWER_LENGTH = {"lego": 1, "parity": 1, "pointer": 1, "kinship": 1, "registers": 3, "reassign": 1}
KINSHIP_RELATIONS = 6  # elements of S3, written 0..5; 0 is "self" (the identity)
REGISTERS = "ABC"
DISTRACTOR_SCALE_TASKS = ("lego", "reassign")  # generators whose distractor count takes a multiple
LEGO_NEGATION_RATE = 0.5  # lego's default share of negated clauses ("b=-a+1")
REASSIGN_VARIABLES = 4  # names per reassign problem: each is reassigned ~k/2 times
REGISTERS_COPY_RATE = 1 / 3  # registers' default share of copies ("C=A", "B=7") among instructions

# ---------------------------------------------------------------------------------------------------------
# Tokenizer. A character tokenizer over printable ASCII: one fixed vocabulary for every built-in task and
# for user files, so a trained model can read any of them. Written here (not keras-hub's
# UnicodeCodepointTokenizer) because it reserves ids for the answer slots and must round-trip exactly
# with the in-graph version the export uses (``CHARSET`` gathered by id).

PAD = 0
MAX_ANSWER_LENGTH = 8  # answer-slot ids 1..8: slot i is the i-th answer position
CHARSET = string.printable[:95]  # digits, letters, punctuation, space (no tabs or newlines)
FIRST_CHAR_ID = 1 + MAX_ANSWER_LENGTH
VOCAB_SIZE = FIRST_CHAR_ID + len(CHARSET)
_CHAR_ID = {c: FIRST_CHAR_ID + i for i, c in enumerate(CHARSET)}


def encode(text: str, where: str = "input") -> list[int]:
    """Character ids of ``text``; characters outside printable ASCII are an error naming ``where``."""
    try:
        return [_CHAR_ID[c] for c in text]
    except KeyError as e:
        raise UserError(f"{where}: character {e.args[0]!r} is not in the tokenizer's vocabulary "
                        f"(printable ASCII)") from None


def decode(ids) -> str:
    """Text of character ids; padding and answer slots are dropped (an answer shorter than its slots is
    padded with PAD)."""
    return "".join(CHARSET[i - FIRST_CHAR_ID] for i in np.asarray(ids).ravel().tolist()
                   if i >= FIRST_CHAR_ID)


def answer_slots(length: int) -> list[int]:
    return list(range(1, length + 1))


class CharTokenizer:
    """A problem's text -> one id per character (the built-in tasks' tokenizer, and the default)."""

    def encode(self, text: str, where: str = "input") -> list[int]:
        return encode(text, where)


CHARS = CharTokenizer()


class PieceTokenizer:
    """A problem's text -> SentencePiece pieces of a vocabulary trained on a task file (ids VOCAB_SIZE +
    piece id, after PAD, the answer slots and the characters). Answers stay characters: the text must be
    printable ASCII all the same. ``sentencepiece``: a ``tfmstep.data.text.SentencePieceTokenizer``."""

    def __init__(self, sentencepiece):
        self.sentencepiece = sentencepiece

    def encode(self, text: str, where: str = "input") -> list[int]:
        encode(text, where)  # the printable-ASCII check, with its message
        return (self.sentencepiece.encode(text.encode("utf-8")) + VOCAB_SIZE).tolist()


def encode_answer(answer: str, length: int, where: str = "answer") -> list[int]:
    ids = encode(answer, where)
    if not ids:
        raise UserError(f"{where}: empty answer")
    if len(ids) > length:
        raise UserError(f"{where}: answer {answer!r} has {len(ids)} characters, more than the model's "
                        f"{length} answer slots (set --config=answer_length)")
    return ids + [PAD] * (length - len(ids))


# ---------------------------------------------------------------------------------------------------------
# Generators: one problem of exactly k steps -> (text, answer, k).


def _names(rng, count):
    if count > len(NAMES):
        raise UserError(f"a problem needs {count} distinct names, more than the {len(NAMES)} available")
    return [NAMES[i] for i in rng.choice(len(NAMES), size=count, replace=False)]


def _distractor_multiple(rng, distractor_scale):
    # m uniform in 1..M; M = 1 draws nothing, so the generators' default problems stay as they were.
    return 1 if distractor_scale == 1 else int(rng.integers(1, distractor_scale + 1))


def _lego(k, rng, modulus, negation_rate=LEGO_NEGATION_RATE, distractor_scale=1):
    # The chain 0..k, then distractor clauses hanging off any earlier name (as kinship's relatives): without
    # them every clause is on the queried chain, and with no negated clause the answer is the sum of every
    # number in the text mod 5 -- a model trained so answered an inner node's query with the chain end's
    # value (0.19 right, 0.96 "the end's value" at k = 4), having learned no lookup at all.
    scale = _distractor_multiple(rng, distractor_scale)
    names = _names(rng, names_needed("lego", k, scale))
    values = [int(rng.integers(modulus))]
    clauses = [f"{names[0]}={values[0]};"]
    for i in range(1, len(names)):
        parent = i - 1 if i <= k else int(rng.integers(i))
        sign = int(rng.random() < negation_rate)
        add = int(rng.integers(modulus))
        values.append(((-values[parent] if sign else values[parent]) + add) % modulus)
        clauses.append(f"{names[i]}={'+-'[sign]}{names[parent]}+{add};")
    rng.shuffle(clauses)
    return "".join(clauses) + f"?{names[k]}", str(values[k])


def _parity(k, rng, modulus):
    bits = rng.integers(2, size=k)
    return "".join(map(str, bits)) + "?", str(int(bits.sum()) % 2)


def _distractors(k):
    return math.ceil(k / 2)


def _pointer_decoy_length(k):
    # As long as the real chain while names last (k <= 25), then whatever the 52 names leave.
    return max(0, min(k, len(NAMES) - k - 2))


def _pointer(k, rng, modulus):
    # Two chains, each ending in its own labelled sink and, while names last, equally long: which sink is the
    # answer depends only on which chain the query starts, so nothing short of following it gets above 1/2.
    # (An earlier version hung short distractors off the chain; "the first sink any clause points to" then
    # scored 0.93 at k = 8, and a model that learned that was at chance against an equal decoy.)
    names = _names(rng, names_needed("pointer", k))
    label, decoy_label = (int(v) for v in rng.choice(modulus, size=2, replace=False))
    clauses = []
    for chain, value in ((names[:k + 1], label), (names[k + 1:], decoy_label)):
        clauses += [f"{a}>{b};" for a, b in zip(chain, chain[1:])] + [f"{chain[-1]}={value};"]
    rng.shuffle(clauses)
    return "".join(clauses) + f"?{names[0]}", str(label)


def _kinship(k, rng, modulus):
    names = _names(rng, names_needed("kinship", k))
    relation_to_root = [0]
    clauses = [f"{names[0]}=0;"]
    for i in range(1, len(names)):
        # The main line 0..k, then distractor relatives hanging off any earlier person.
        parent = i - 1 if i <= k else int(rng.integers(i))
        relation = int(rng.integers(KINSHIP_RELATIONS))
        relation_to_root.append(int(S3_TABLE[relation, relation_to_root[parent]]))
        clauses.append(f"{names[i]}={relation}({names[parent]});")
    rng.shuffle(clauses)
    return "".join(clauses) + f"?{names[k]}", str(relation_to_root[k])


def _registers_problem(k, rng, modulus, copy_rate=REGISTERS_COPY_RATE):
    start = [int(v) for v in rng.integers(10, size=len(REGISTERS))]
    state = list(start)
    instructions = []
    for _ in range(k):
        dst = int(rng.integers(len(REGISTERS)))
        if copy_rate == REGISTERS_COPY_RATE:
            op = "+-="[int(rng.integers(3))]  # the default's own draw, so seeded problems stay as they were
        else:
            op = "+-="[int(rng.choice(3, p=[(1 - copy_rate) / 2, (1 - copy_rate) / 2, copy_rate]))]
        if rng.random() < 0.5:
            src_name = REGISTERS[int(rng.integers(len(REGISTERS)))]
            src = state[REGISTERS.index(src_name)]
        else:
            src = int(rng.integers(10))
            src_name = str(src)
        state[dst] = {"+": (state[dst] + src) % 10, "-": (state[dst] - src) % 10, "=": src}[op]
        instructions.append(f"{REGISTERS[dst]}{op}{src_name};")
    return "".join(map(str, start)) + ":" + "".join(instructions) + "=", "".join(map(str, state))


def _reassign(k, rng, modulus, distractor_scale=1):
    names = _names(rng, REASSIGN_VARIABLES)
    # k distractors over k+1 gaps, or m * k with m drawn from 1..distractor_scale (a longer text, same k)
    scale = _distractor_multiple(rng, distractor_scale)
    gaps = np.bincount(rng.integers(k + 1, size=scale * k), minlength=k + 1)
    values: dict[str, int] = {}
    statements = []

    def assign(target, source):
        if source is None or source not in values:
            value = int(rng.integers(modulus))
            statements.append(f"{target}={value};")
        else:
            add, sign = int(rng.integers(modulus)), int(rng.integers(2))
            value = (values[source] + (-add if sign else add)) % modulus
            statements.append(f"{target}={source}{'+-'[sign]}{add};")
        values[target] = value

    def distract(live):
        for _ in range(gaps[len(chain)]):
            target = [n for n in names if n != live][rng.integers(len(names) - (live is not None))]
            defined = list(values)
            source = defined[rng.integers(len(defined))] if defined and rng.random() < 0.7 else None
            assign(target, source)

    chain: list[str] = []
    live = None
    for _ in range(k):
        distract(live)
        target = names[rng.integers(len(names))]
        assign(target, live)  # the first statement of the chain is a constant (live is None)
        chain.append(target)
        live = target
    distract(live)
    return "".join(statements) + f"?{live}", str(values[live])


_GENERATORS = {"lego": _lego, "parity": _parity, "pointer": _pointer, "kinship": _kinship,
               "registers": _registers_problem, "reassign": _reassign}


def generate_problem(task: str, k: int, rng: np.random.Generator, modulus: int = 5,
                     negation_rate: float | None = None, copy_rate: float | None = None,
                     distractor_scale: int | None = None) -> tuple[str, str]:
    """(text, answer) of one problem of exactly ``k`` steps. ``negation_rate`` (lego only): the share of
    negated clauses (None: the generator's own, one half); ``copy_rate`` (registers only): the share of
    copy instructions (None: the generator's own, one third); ``distractor_scale`` M (lego, reassign): m times
    the generator's distractor clauses, m uniform in 1..M (None: once) -- a longer text, the same chain."""
    if k < min_chain_length(task):
        raise UserError(f"task {task!r} has no problems of {k} steps (fewest: {min_chain_length(task)})")
    options = {}
    for option, value, owners in (("negation_rate", negation_rate, ("lego",)),
                                  ("copy_rate", copy_rate, ("registers",)),
                                  ("distractor_scale", distractor_scale, DISTRACTOR_SCALE_TASKS)):
        if value is not None:
            if task not in owners:
                raise UserError(f"{option} applies to task {' and '.join(map(repr, owners))} only, not {task!r}")
            options[option] = value
    return _GENERATORS[task](int(k), rng, modulus, **options)


def min_chain_length(task: str) -> int:
    """The fewest steps a generator can pose: 0 (the lookup or the start state alone) except for reassign,
    whose query reads a statement the chain itself made."""
    return 1 if task == "reassign" else 0


def names_needed(task: str, k: int, distractor_scale: int = 1) -> int | None:
    """Distinct names a problem of ``k`` steps uses, with ``distractor_scale`` times lego's distractors (None:
    the task has no named clauses)."""
    return {"lego": k + 1 + distractor_scale * _distractors(k), "pointer": k + _pointer_decoy_length(k) + 2,
            "kinship": k + 1 + _distractors(k)}.get(task)


def max_chain_length(task: str) -> int | None:
    """The longest chain a generator can name (52 single-letter names), or None if unbounded."""
    if names_needed(task, 0) is None:
        return None
    return max(k for k in range(len(NAMES)) if names_needed(task, k) <= len(NAMES))


def max_text_length(task: str, k: int, distractor_scale: int = 1) -> int:
    """An upper bound on the characters of a problem of ``k`` steps (the padded length of a batch)."""
    extra = _distractors(k)
    return {"lego": 4 + 7 * (k + distractor_scale * extra) + 2, "parity": k + 1,
            "pointer": 4 * (k + _pointer_decoy_length(k) + 2) + 2,
            "kinship": 4 + 7 * (k + extra) + 2, "registers": 5 + 4 * k,
            "reassign": (1 + distractor_scale) * k * 6 + 2}[task]


# S3 as permutations of (0, 1, 2); element 0 is the identity.
def _s3():
    perms = tuple(itertools.permutations(range(3)))
    index = {p: i for i, p in enumerate(perms)}
    return np.array([[index[tuple(perms[a][perms[b][i]] for i in range(3))] for b in range(6)]
                     for a in range(6)], np.int64)


S3_TABLE = _s3()  # S3_TABLE[a, b] = a o b (apply b, then a)


# ---------------------------------------------------------------------------------------------------------
# Reference solver: parses the text and runs it the slow, obvious way; returns (answer, steps).


def solve(task: str, text: str, modulus: int = 5) -> tuple[str, int]:
    if task == "parity":
        bits = text.rstrip("?")
        return str(sum(int(b) for b in bits) % 2), len(bits)
    if task == "registers":
        start, program = text.rstrip("=").split(":")
        state, steps = [int(c) for c in start], 0
        for ins in filter(None, program.split(";")):
            dst, op, src = REGISTERS.index(ins[0]), ins[1], ins[2]
            value = state[REGISTERS.index(src)] if src in REGISTERS else int(src)
            state[dst] = {"+": (state[dst] + value) % 10, "-": (state[dst] - value) % 10, "=": value}[op]
            steps += 1
        return "".join(map(str, state)), steps
    body, query = text.rsplit("?", 1)
    clauses = [c for c in body.split(";") if c]
    if task == "reassign":
        values, depth = {}, {}
        for clause in clauses:
            target, rhs = clause.split("=")
            if rhs.isdigit():
                values[target], depth[target] = int(rhs), 1
            else:
                source, sign, add = rhs[0], rhs[1], int(rhs[2:])
                values[target] = (values[source] + (add if sign == "+" else -add)) % modulus
                depth[target] = depth[source] + 1
        return str(values[query]), depth[query]
    rules = {}
    for clause in clauses:
        if task == "pointer" and ">" in clause:
            node, target = clause.split(">")
            rules[node] = ("edge", target)
        else:
            node, rhs = clause.split("=")
            rules[node] = ("rule", rhs)

    def value_of(node):  # -> (value, steps from a root)
        kind, rhs = rules[node]
        if task == "pointer":
            if kind == "edge":
                value, steps = value_of(rhs)
                return value, steps + 1
            return int(rhs), 0
        if rhs.isdigit():
            return int(rhs), 0
        if task == "lego":
            sign, parent, add = rhs[0], rhs[1], int(rhs.split("+")[-1])
            value, steps = value_of(parent)
            return ((-value if sign == "-" else value) + add) % modulus, steps + 1
        relation, parent = int(rhs[0]), rhs[2]  # kinship: "R(p)"
        value, steps = value_of(parent)
        return int(S3_TABLE[relation, value]), steps + 1

    value, steps = value_of(query)
    return str(value), steps


# ---------------------------------------------------------------------------------------------------------
# Batches: tokens [B, T] (the text, then the answer slots, then PAD), labels {answers [B, A], steps [B]}.


def problem_ids(text: str, answer_length: int, where: str = "input", tokenizer=CHARS) -> list[int]:
    """The problem's ids, then its answer slots (not padded)."""
    return tokenizer.encode(text, where) + answer_slots(answer_length)


def check_problem_length(ids: list, limit: int, answer_length: int, where: str = "input") -> None:
    if len(ids) > limit:
        raise UserError(f"{where}: {len(ids)} tokens (text + {answer_length} answer slots) is longer "
                        f"than the model's limit of {limit} tokens (set --config=max_tokens)")


def pad_problem(ids: list, pad_to: int, answer_length: int, where: str = "input") -> list[int]:
    check_problem_length(ids, pad_to, answer_length, where)
    return ids + [PAD] * (pad_to - len(ids))


def make_batch(problems, answer_length: int, pad_to: int | None = None, tokenizer=CHARS) -> tuple[dict, dict]:
    """problems: [(text, answer, steps)] -> numpy ({"tokens"}, {"answers", "steps"}); ``pad_to`` None:
    padded to the longest problem, each one tokenised once."""
    rows = [problem_ids(t, answer_length, tokenizer=tokenizer) for t, _, _ in problems]
    if pad_to is None:
        pad_to = max(len(row) for row in rows)
    tokens = np.array([pad_problem(row, pad_to, answer_length) for row in rows], np.int32)
    answers = np.array([encode_answer(a, answer_length) for _, a, _ in problems], np.int32)
    steps = np.array([s for _, _, s in problems], np.int32)
    return {"tokens": tokens}, {"answers": answers, "steps": steps}


def generate_batch(task, lengths, rng, answer_length, pad_to, modulus=5, negation_rate=None, copy_rate=None,
                   distractor_scale=None):
    return make_batch([(*generate_problem(task, k, rng, modulus, negation_rate, copy_rate, distractor_scale), int(k))
                       for k in lengths], answer_length, pad_to)


def fixed_length_batches(task: str, k: int, num_examples: int, batch_size: int, *, answer_length: int,
                         seed: int = 0, modulus: int = 5, negation_rate: float | None = None):
    """Numpy (inputs, labels) batches of problems of exactly ``k`` steps (for evaluation)."""
    rng = np.random.default_rng([seed, 3, k])
    pad_to = max_text_length(task, k) + answer_length
    return [generate_batch(task, [k] * min(batch_size, num_examples - start), rng, answer_length, pad_to,
                           modulus, negation_rate)
            for start in range(0, num_examples, batch_size)]


_SPLIT_CODE = {"train": 0, "validation": 1, "test": 2}


def length_grid(longest: int, buckets: int) -> list[int]:
    """The padded lengths of ``buckets`` length buckets: evenly spaced up to ``longest``."""
    if buckets < 1:
        raise UserError(f"length_buckets must be >= 1, got {buckets}")
    return sorted({math.ceil(longest * (i + 1) / buckets) for i in range(buckets)})


def generated_dataset(task: str, split: str, batch_size: int, *, seed: int = 0, start_batch: int = 0,
                      train_min_len: int = 1, train_max_len: int = 8, test_max_len: int = 32,
                      modulus: int = 5, answer_length: int = 1, eval_examples: int = 512,
                      curriculum_batches: int = 0, curriculum_stages: tuple = (),
                      negation_curriculum_batches: int = 0,
                      negation_rate: float | None = None,
                      train_copy_rate: float | None = None,
                      train_distractor_scale: int | None = None,
                      length_buckets: int = 1) -> tf.data.Dataset:
    """"train": infinite, k uniform in [train_min_len, train_max_len] -- over the first
    ``curriculum_batches`` batches the upper end rises linearly from train_min_len, so the one-step
    lookup is learned on short chains first; or, with ``curriculum_stages`` ((top, batches), ...), it is
    each stage's top for that stage's batches, and a stage's batches are padded to its own top (a few
    shapes, short early problems cost little); lego with ``negation_curriculum_batches`` N: no negated
    clauses in the first N/2 batches, then their share rises linearly to ``negation_rate`` (None: the
    generator's own) by batch N; registers with ``train_copy_rate``: that share of copy instructions in
    training problems only, so validation and test stay the generator's own; lego and reassign with
    ``train_distractor_scale`` M: m times the distractor clauses (m uniform in 1..M) in training problems only --,
    batch b generated from the seed (seed, 0, b) alone
    (exact resume). With ``length_buckets`` N > 1, training batches come in groups of N within a stage:
    a group's problems are drawn together (from the seed and the group's first batch), sorted by length
    and cut into N batches, served in a shuffled order, each padded to the shortest length that holds it
    among N evenly spaced ones up to the longest training text's and its stage's own -- so a batch of
    short problems is not padded to the longest (a few shapes in all, each compiled once).
    "validation": the train range, finite. "test": k uniform in [1, test_max_len], finite. Without
    stages, every batch of a split is padded to one length (or to its bucket's)."""
    if split not in _SPLIT_CODE:
        raise UserError(f"unknown split {split!r}; choose train, validation or test")
    low, high = (1, test_max_len) if split == "test" else (train_min_len, train_max_len)
    if split == "validation":
        low = max(1, low)  # zero-step problems only help training; what is reported starts at k = 1
    distractor_scale = train_distractor_scale if split == "train" else None
    pad_to = max_text_length(task, high, distractor_scale or 1) + answer_length
    staged = split == "train" and bool(curriculum_stages)
    stage_ends = np.cumsum([batches for _, batches in curriculum_stages], dtype=np.int64)

    grid = length_grid(pad_to, length_buckets)  # one grid for every stage, so stages share compiled shapes
    bucketed = split == "train" and length_buckets > 1
    copy_rate = train_copy_rate if split == "train" else None

    def schedule(batch_index):
        """(top k, padded length, negation rate, first batch of its stage, end of its stage or None)."""
        top, padded, first, end = high, pad_to, 0, None
        if staged:
            stage = int(np.searchsorted(stage_ends, batch_index, side="right"))
            first = int(stage_ends[stage - 1]) if stage else 0
            if stage < len(curriculum_stages):
                top, end = curriculum_stages[stage][0], int(stage_ends[stage])
                padded = max_text_length(task, top, distractor_scale or 1) + answer_length
        elif split == "train" and batch_index < curriculum_batches:
            top = min(high, low + int((high - low + 1) * batch_index / curriculum_batches))
        rate = negation_rate
        if split == "train" and batch_index < negation_curriculum_batches:
            half = negation_curriculum_batches / 2
            full = LEGO_NEGATION_RATE if negation_rate is None else negation_rate
            rate = full * max(0.0, (batch_index - half) / half)
        return top, padded, rate, first, end

    def as_arrays(inputs, labels):
        return inputs["tokens"], labels["answers"], labels["steps"]

    @functools.lru_cache(maxsize=2 * length_buckets)  # a group serves its batches from one draw
    def group(start):
        top, padded, rate, _, end = schedule(start)
        size = length_buckets if end is None else min(length_buckets, end - start)
        rng = np.random.default_rng([seed, _SPLIT_CODE[split], start, length_buckets])
        problems = [(*generate_problem(task, k, rng, modulus, rate, copy_rate, distractor_scale), int(k))
                    for k in rng.integers(low, top + 1, size=size * batch_size)]
        lengths = np.array([len(problem_ids(text, answer_length)) for text, _, _ in problems])
        by_length = np.argsort(lengths, kind="stable")
        buckets = [b for b in grid if b < padded] + [padded]
        batches = []
        for j in rng.permutation(size):
            rows = by_length[j * batch_size:(j + 1) * batch_size]
            longest = int(lengths[rows].max())
            batches.append(as_arrays(*make_batch([problems[r] for r in rows], answer_length,
                                                 next(b for b in buckets if b >= longest))))
        return batches

    def make(batch_index):
        batch_index = int(batch_index)
        if bucketed:
            first = schedule(batch_index)[3]
            start = first + (batch_index - first) // length_buckets * length_buckets
            return group(start)[batch_index - start]
        rng = np.random.default_rng([seed, _SPLIT_CODE[split], batch_index])
        top, padded, rate, _, _ = schedule(batch_index)
        return as_arrays(*generate_batch(task, rng.integers(low, top + 1, size=batch_size), rng,
                                         answer_length, padded, modulus, rate, copy_rate, distractor_scale))

    if split == "train":
        def to_tensors(b):
            tokens, answers, steps = tf.numpy_function(make, [b], [tf.int32] * 3, stateful=False)
            tokens.set_shape((batch_size, None if staged or bucketed else pad_to))
            answers.set_shape((batch_size, answer_length))
            steps.set_shape((batch_size,))
            return {"tokens": tokens}, {"answers": answers, "steps": steps}
        return (tf.data.Dataset.range(int(start_batch), 2**62)
                .map(to_tensors, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
                .prefetch(tf.data.AUTOTUNE))
    arrays = [make(b) for b in range(max(1, eval_examples // batch_size))]
    tokens, answers, steps = (np.concatenate([a[i] for a in arrays]) for i in range(3))
    return tf.data.Dataset.from_tensor_slices(
        ({"tokens": tokens}, {"answers": answers, "steps": steps})).batch(batch_size, drop_remainder=True)


# ---------------------------------------------------------------------------------------------------------
# User files: JSONL lines {"input": str, "answer": str, "steps": int (optional)}.


def read_jsonl(path: str, *, answer_length: int, max_tokens: int | None, known_chars: set | None = None,
               tokenizer=CHARS):
    """[(text, answer, steps)] of a JSONL file (steps -1 when not given), each line checked; a bad line is
    one error naming the file and line number. ``known_chars``: characters the model was trained on (a
    test file may use no others)."""
    if not path:
        raise UserError("task=file needs --config=train_file=<jsonl> (and test_file for evaluation)")
    if not os.path.isfile(path):
        raise UserError(f"no such file: {path}")
    problems = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not a JSON object ({e.msg})") from None
            if not isinstance(record, dict):
                raise UserError(f"{where}: expected a JSON object with keys input, answer[, steps]")
            missing = [key for key in ("input", "answer") if key not in record]
            if missing:
                raise UserError(f"{where}: missing key {missing[0]!r} (a line is "
                                f'{{"input": "...", "answer": "...", "steps": k}})')
            text, answer, steps = record["input"], record["answer"], record.get("steps", -1)
            if not isinstance(text, str) or not isinstance(answer, str):
                raise UserError(f"{where}: input and answer must be strings")
            if not text:
                raise UserError(f"{where}: empty input")
            if isinstance(steps, bool) or not isinstance(steps, int) or (steps < 1 and steps != -1):
                raise UserError(f"{where}: steps must be a positive integer, got {steps!r}")
            encode_answer(answer, answer_length, f"{where} answer")
            ids = problem_ids(text, answer_length, f"{where} input", tokenizer)
            if max_tokens is not None:
                check_problem_length(ids, max_tokens, answer_length, f"{where} input")
            if known_chars is not None:
                unknown = sorted(set(text + answer) - known_chars)
                if unknown:
                    raise UserError(f"{where}: characters {''.join(unknown)!r} never occur in the training "
                                    f"file, so the model has not learned them")
            problems.append((text, answer, steps))
    if not problems:
        raise UserError(f"{path}: no problems (empty file)")
    return problems


def read_file_task(train_file: str, test_file: str, *, answer_length: int, max_tokens: int,
                   max_steps: int | None = None, tokenizer=CHARS):
    """(train, test) problems of a JSONL task, every line checked (``read_jsonl``); train ``steps`` at most
    ``max_steps`` (the loop iterations trained), test characters all seen in training. test is None
    without a ``test_file``."""
    train = read_jsonl(train_file, answer_length=answer_length, max_tokens=max_tokens, tokenizer=tokenizer)
    if max_steps is not None:
        for number, (_, _, steps) in enumerate(train, 1):
            if steps > max_steps:
                raise UserError(f"{train_file}: problem {number} has steps={steps}, more than the "
                                f"{max_steps} loop iterations trained (set --config=train_loops)")
    if not test_file:
        return train, None
    known = set("".join(t + a for t, a, _ in train))
    return train, read_jsonl(test_file, answer_length=answer_length, max_tokens=max_tokens, known_chars=known,
                             tokenizer=tokenizer)


def file_dataset(train_file: str, test_file: str, split: str, batch_size: int, *, seed: int = 0,
                 start_batch: int = 0, answer_length: int, max_tokens: int, max_steps: int | None = None,
                 tokenizer=CHARS, length_buckets: int = 1):
    """A user's JSONL task. "train": the train file, reshuffled every epoch; batch b starts at stream
    position b * batch_size (exact resume); with ``length_buckets`` N > 1, every N batches of the stream
    are sorted by length, cut into N batches served in a shuffled order, and each is cut to the shortest
    of N evenly spaced lengths up to the file's longest that holds it (as ``generated_dataset``).
    "validation": the test file when given, else the train file's last 10%. "test": the test file (its
    characters must all occur in the train file)."""
    from tfmstep.data import common

    train, test = read_file_task(train_file, test_file if split != "train" else "", answer_length=answer_length,
                                 max_tokens=max_tokens, max_steps=max_steps, tokenizer=tokenizer)
    if split == "train":
        problems = train
    elif test is not None:
        problems = test
    elif split == "validation":
        problems = train[-max(1, len(train) // 10):]
    else:
        raise UserError("task=file needs --config=test_file=<jsonl> for the test split")
    inputs, labels = make_batch(problems, answer_length, tokenizer=tokenizer)  # padded to the longest
    if split == "train":
        longest = int(inputs["tokens"].shape[1])
        grid = tf.constant(length_grid(longest, length_buckets))
        first_group, skip = divmod(int(start_batch), length_buckets)
        indices = common.shuffled_index_stream(len(problems), seed, first_group * length_buckets * batch_size)
        tensors = (tf.constant(inputs["tokens"]), tf.constant(labels["answers"]), tf.constant(labels["steps"]))
        lengths = tf.reduce_sum(tf.cast(tensors[0] != PAD, tf.int32), axis=1)

        def sorted_batches(group, index):
            """A group's N * B stream indices as N batches of similar lengths, in a shuffled order."""
            by_length = tf.reshape(tf.gather(index, tf.argsort(tf.gather(lengths, index), stable=True)),
                                   [length_buckets, batch_size])
            order = tf.random.experimental.stateless_shuffle(
                tf.range(length_buckets), seed=tf.stack([tf.cast(seed, tf.int64), group]))
            return tf.data.Dataset.from_tensor_slices(tf.gather(by_length, order))

        def gather(index):
            width = longest
            if length_buckets > 1:  # trailing PADs beyond the batch's bucket cut off
                width = tf.reduce_min(tf.boolean_mask(grid, grid >= tf.reduce_max(tf.gather(lengths, index))))
            return ({"tokens": tf.gather(tensors[0], index)[:, :width]},
                    {"answers": tf.gather(tensors[1], index), "steps": tf.gather(tensors[2], index)})
        if length_buckets == 1:
            batches = indices.batch(batch_size, drop_remainder=True)
        else:
            batches = (indices.batch(length_buckets * batch_size, drop_remainder=True).enumerate(first_group)
                       .flat_map(sorted_batches).skip(skip))
        return batches.map(gather).prefetch(tf.data.AUTOTUNE)
    return tf.data.Dataset.from_tensor_slices((inputs, labels)).batch(batch_size)
