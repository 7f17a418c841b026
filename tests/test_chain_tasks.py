"""The chain task generators against a slow reference solver, their length knob, and their input checks."""

import numpy as np
import pytest

from tfmstep.data import chains
from tfmstep.errors import UserError


def reference_solve(task, problem, modulus):
    """Slow solver that knows only the clause semantics: sweep the clauses until nothing changes.

    Returns (answers, depths) computed from the inputs alone (names, parents, ops, given values)."""
    n = len(problem["op"])
    answers, depths = [None] * n, [None] * n
    by_name = {int(problem["name"][i]): i for i in range(n)} if task != "running_sum" else {}
    for i in range(n):
        if problem["op"][i] == chains.ROOT_OP:
            answers[i], depths[i] = int(problem["value"][i]) - 1, 0
    changed = True
    while changed:
        changed = False
        for i in range(n):
            if answers[i] is not None:
                continue
            j = i - 1 if task == "running_sum" else by_name[int(problem["parent"][i])]
            if answers[j] is None:
                continue
            op, parent = int(problem["op"][i]), answers[j]
            if task == "lego":
                sign, add = divmod(op - 2, modulus)
                answers[i] = ((-parent if sign else parent) + add) % modulus
            elif task == "running_sum":
                answers[i] = (parent + op - 2) % modulus
            elif task == "pointer":
                answers[i] = parent
            else:  # kinship: relation to the root = this relation after the parent's
                relation = chains.S3[op - 2]
                parent_perm = chains.S3[parent]
                answers[i] = chains.S3.index(tuple(relation[parent_perm[k]] for k in range(3)))
            depths[i] = depths[j] + 1
            changed = True
    assert None not in answers, "some clause is unreachable"
    return answers, depths


@pytest.mark.parametrize("task", chains.TASKS)
@pytest.mark.parametrize("length", [1, 2, 7, 20])
def test_generated_answers_match_the_reference_solver(task, length):
    rng = np.random.default_rng(length)
    for _ in range(5):
        problem = chains.generate_problem(task, length, rng, modulus=3 if task == "running_sum" else 5,
                                          num_names=64)
        answers, depths = reference_solve(task, problem, 3 if task == "running_sum" else 5)
        np.testing.assert_array_equal(problem["target"], answers)
        np.testing.assert_array_equal(problem["depth"], depths)
        assert max(depths) == length  # the knob is the number of hops


@pytest.mark.parametrize("task", ["lego", "pointer", "kinship"])
def test_names_are_distinct_and_clauses_are_shuffled(task):
    rng = np.random.default_rng(0)
    problems = [chains.generate_problem(task, 10, rng, num_names=40) for _ in range(20)]
    for problem in problems:
        assert len(set(problem["name"].tolist())) == len(problem["name"])
    # The root is not always in the same place: order carries no information.
    root_positions = {int(np.argmax(p["depth"] == 0)) for p in problems}
    assert len(root_positions) > 1


def test_kinship_composition_is_not_commutative():
    assert any(chains.S3_TABLE[a, b] != chains.S3_TABLE[b, a] for a in range(6) for b in range(6))


def test_pointer_task_has_distractor_trees():
    rng = np.random.default_rng(1)
    roots = [int((chains.generate_problem("pointer", 12, rng)["op"] == chains.ROOT_OP).sum())
             for _ in range(20)]
    assert max(roots) > 1


def test_train_split_has_static_shapes_and_trained_lengths():
    ds = chains.chain_dataset("lego", "train", 16, train_min_len=2, train_max_len=5, test_max_len=10)
    inputs, labels = next(iter(ds))
    assert inputs["name"].shape == (16, 6) and labels["depth"].shape == (16, 6)
    hops = labels["depth"].numpy().max(axis=1)
    assert hops.min() >= 2 and hops.max() <= 5


def test_test_split_is_finite_and_reaches_the_test_lengths():
    ds = chains.chain_dataset("running_sum", "test", 32, modulus=2, train_max_len=4, test_max_len=16,
                              eval_examples=256)
    batches = list(ds)
    assert len(batches) == 8
    hops = np.concatenate([labels["depth"].numpy().max(axis=1) for _, labels in batches])
    assert hops.max() > 4 and hops.max() <= 16


def test_fixed_length_batches_have_exactly_that_many_hops():
    batches = chains.fixed_length_batches("kinship", 9, 10, 4)
    assert [len(labels["depth"]) for _, labels in batches] == [4, 4, 2]
    for _, labels in batches:
        assert (labels["depth"].max(axis=1) == 9).all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(train_min_len=0), "chain length must be >= 1"),
    (dict(test_max_len=0), "chain length must be >= 1"),
    (dict(train_min_len=5, train_max_len=3), "must be >= train_min_len"),
    (dict(task="lego", num_names=10, test_max_len=20), "num_names=10 is too small"),
    (dict(task="kinship", num_names=30, test_max_len=16), "num_names=30 is too small"),
    (dict(task="running_sum", modulus=1), "modulus must be >= 2"),
    (dict(task="sorting"), "unknown chain task"),
])
def test_invalid_task_parameters_give_a_clear_error(kwargs, message):
    params = dict(task="lego", modulus=5, num_names=80, train_min_len=1, train_max_len=8, test_max_len=32)
    params.update(kwargs)
    with pytest.raises(UserError, match=message):
        chains.validate_task(**params)


def test_running_sum_needs_no_name_vocabulary():
    chains.validate_task("running_sum", 2, 1, 1, 8, 200)  # long sequences, no names: fine
