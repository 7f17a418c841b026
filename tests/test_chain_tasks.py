"""Chain tasks as plain text: every generator agrees with the independent reference solver, the
tokenizer round-trips, splits have the promised lengths and shapes, and user JSONL files are read with
one clear error per bad line."""

import json
import math
import re

import numpy as np
import pytest

from tfmstep.data import chains
from tfmstep.errors import UserError


@pytest.mark.parametrize("task", chains.TASKS)
@pytest.mark.parametrize("k", [0, 1, 2, 5, 8, 16, 32])
def test_generated_answers_and_step_counts_match_the_reference_solver(task, k):
    rng = np.random.default_rng(k)
    if k < chains.min_chain_length(task):  # reassign: no zero-step problems, and one clear error for them
        with pytest.raises(UserError, match=f"task {task!r} has no problems of {k} steps"):
            chains.generate_problem(task, k, rng)
        return
    for _ in range(20):
        text, answer = chains.generate_problem(task, k, rng)
        assert chains.solve(task, text) == (answer, k), text
        assert len(text) <= chains.max_text_length(task, k)
        assert len(answer) == chains.ANSWER_LENGTH[task]


@pytest.mark.parametrize("task", ["lego", "pointer", "kinship"])
def test_clauses_are_shuffled_and_names_random(task):
    rng = np.random.default_rng(0)
    problems = [chains.generate_problem(task, 6, rng)[0] for _ in range(20)]
    assert len({p.split(";")[0] for p in problems}) > 10  # first clause is not always the root
    assert len({p[-1] for p in problems}) > 10  # queried name varies


def test_lego_answer_is_not_the_sum_of_every_number_without_following_the_chain():
    """Without negated clauses a chain's end is the sum of its numbers mod 5; distractor clauses off the
    chain must keep "sum everything in the text" near chance (1/5), so only following the chain answers."""
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(200):
        text, answer = chains.generate_problem("lego", 4, rng, negation_rate=0.0)
        numbers = [int(c) for c in text if c.isdigit()]
        hits += sum(numbers) % 5 == int(answer)
    assert hits / 200 < 0.35


def test_reassign_reads_a_name_that_was_assigned_more_than_once():
    """The dependency is computed: the answer depends on which earlier assignment is the latest."""
    rng = np.random.default_rng(0)
    reassigned = 0
    for _ in range(50):
        text, _ = chains.generate_problem("reassign", 8, rng)
        targets = [clause.split("=")[0] for clause in text.split("?")[0].split(";") if clause]
        reassigned += len(targets) > len(set(targets))
    assert reassigned == 50


@pytest.mark.parametrize("modulus", [3, 10])
def test_reassign_values_follow_the_modulus_in_the_generator_and_the_solver(modulus):
    rng = np.random.default_rng(modulus)
    numbers = []
    for k in (1, 4, 12):
        for _ in range(20):
            text, answer = chains.generate_problem("reassign", k, rng, modulus=modulus)
            assert chains.solve("reassign", text, modulus) == (answer, k), text
            numbers += [int(n) for n in re.findall(r"\d+", text)] + [int(answer)]
    assert max(numbers) == modulus - 1  # every value and addend is mod `modulus`, and all of it is used


def test_registers_answer_is_every_register_after_the_program():
    assert chains.solve("registers", "351:A+B;C=A;B-7;=") == ("888", 3)


def test_kinship_composition_is_not_commutative():
    table = chains.S3_TABLE
    assert any(table[a, b] != table[b, a] for a in range(6) for b in range(6))


def test_tokenizer_round_trips_text_and_refuses_unknown_characters():
    text = "b=-a+2;a=3;?b"
    assert chains.decode(chains.encode(text)) == text
    assert min(chains.encode(text)) >= chains.FIRST_CHAR_ID
    with pytest.raises(UserError, match="character 'é' is not in the tokenizer"):
        chains.encode("é=1")


def test_train_split_has_static_shapes_trained_lengths_and_answer_slots():
    ds = chains.generated_dataset("lego", "train", 16, train_min_len=2, train_max_len=5)
    inputs, labels = next(iter(ds))
    tokens = inputs["tokens"].numpy()
    assert tokens.shape == (16, chains.max_text_length("lego", 5) + 1)
    assert set(labels["steps"].numpy()) <= {2, 3, 4, 5}
    for row, answer in zip(tokens, labels["answers"].numpy()):
        assert (row == 1).sum() == 1  # one answer slot (id 1), right after the text
        assert chains.solve("lego", chains.decode(row))[0] == chains.decode(answer)


def test_zero_step_problems_are_trained_on_but_never_validated():
    train = chains.generated_dataset("pointer", "train", 64, train_min_len=0, train_max_len=2)
    steps = np.concatenate([labels["steps"].numpy() for _, labels in train.take(2)])
    assert set(steps) == {0, 1, 2}
    validation = chains.generated_dataset("pointer", "validation", 64, train_min_len=0, train_max_len=2,
                                          eval_examples=128)
    steps = np.concatenate([labels["steps"].numpy() for _, labels in validation])
    assert set(steps) == {1, 2}


def test_lego_negation_curriculum_starts_without_negations_and_ends_at_the_usual_half():
    def negated_share(start_batch):
        ds = chains.generated_dataset("lego", "train", 64, train_min_len=4, train_max_len=4,
                                      start_batch=start_batch, negation_curriculum_batches=100)
        texts = [chains.decode(row) for row in next(iter(ds))[0]["tokens"].numpy()]
        for text in texts:  # still valid problems
            assert chains.solve("lego", text)[1] == 4
        ops = [clause.split("=")[1][0] for text in texts for clause in text.split("?")[0].split(";") if clause]
        return sum(op == "-" for op in ops) / sum(op in "+-" for op in ops)

    assert negated_share(0) == negated_share(49) == 0.0
    assert 0.15 < negated_share(75) < 0.35
    assert 0.4 < negated_share(100) < 0.6  # past the curriculum: the generator's own mix


def test_a_task_specific_generator_option_is_refused_for_other_tasks():
    with pytest.raises(UserError, match="applies to task 'lego' only"):
        chains.generate_problem("pointer", 2, np.random.default_rng(0), negation_rate=0.0)
    with pytest.raises(UserError, match="applies to task 'registers' only"):
        chains.generate_problem("lego", 2, np.random.default_rng(0), copy_rate=0.1)
    with pytest.raises(UserError, match="applies to task 'lego' and 'reassign' only"):
        chains.generate_problem("pointer", 2, np.random.default_rng(0), distractor_scale=2)


def test_lego_distractor_scale_lengthens_the_text_not_the_chain_and_one_draws_as_before():
    rng = np.random.default_rng(0)
    clauses = {1: [], 3: []}
    for _ in range(300):
        k = int(rng.integers(0, 9))
        for scale in clauses:
            text, answer = chains.generate_problem("lego", k, rng, negation_rate=0.5, distractor_scale=scale)
            assert chains.solve("lego", text) == (answer, k)
            assert len(text) <= chains.max_text_length("lego", k, scale)
            clauses[scale].append((text.count(";") - k - 1) / max(1, -(-k // 2)))  # distractors per ceil(k/2)
    assert set(clauses[1]) <= {0, 1} and set(clauses[3]) <= {0, 1, 2, 3} and 1.7 < np.mean(clauses[3]) < 2.3
    default, scale_one = (chains.generate_problem("lego", 5, np.random.default_rng(7), distractor_scale=scale)
                          for scale in (None, 1))
    assert default == scale_one


def test_reassign_distractor_scale_lengthens_the_text_not_the_chain():
    rng = np.random.default_rng(0)
    statements = {1: [], 3: []}
    for _ in range(300):
        k = int(rng.integers(1, 9))
        for scale in statements:
            text, answer = chains.generate_problem("reassign", k, rng, distractor_scale=scale)
            assert chains.solve("reassign", text) == (answer, k)
            assert len(text) <= chains.max_text_length("reassign", k, scale)
            statements[scale].append(text.count(";") / k)
    assert max(statements[1]) == 2  # k steps + k distractors
    assert 2.7 < np.mean(statements[3]) < 3.3 and max(statements[3]) == 4  # k steps + m * k, m in 1..3


def test_curriculum_stages_train_each_stage_top_padded_to_its_own_length_and_resume_mid_stage():
    stages = ((1, 2), (3, 2))  # k <= 1 for batches 0-1, k <= 3 for 2-3, then k <= 5

    def batch(start_batch):
        ds = chains.generated_dataset("lego", "train", 64, train_min_len=0, train_max_len=5,
                                      start_batch=start_batch, curriculum_stages=stages)
        inputs, labels = next(iter(ds))
        return inputs["tokens"].numpy(), labels["steps"].numpy()

    for start_batch, top in [(0, 1), (1, 1), (2, 3), (3, 3), (4, 5), (9, 5)]:
        tokens, steps = batch(start_batch)
        assert tokens.shape == (64, chains.max_text_length("lego", top) + 1)
        assert steps.max() == top and steps.min() == 0
        for row in tokens:
            assert chains.solve("lego", chains.decode(row))[1] <= top
    resumed = chains.generated_dataset("lego", "train", 64, train_min_len=0, train_max_len=5,
                                       start_batch=1, curriculum_stages=stages)
    for index, (inputs, _) in enumerate(resumed.take(3), start=1):  # a resumed run sees the same batches
        np.testing.assert_array_equal(inputs["tokens"].numpy(), batch(index)[0])


def test_length_buckets_pad_sorted_groups_to_shared_shapes_and_resume_mid_group():
    stages = ((2, 6), (5, 7))  # 6 batches of k <= 2, 7 of k <= 5 (a group of 4, then one of 3), then k <= 8
    kwargs = dict(train_min_len=1, train_max_len=8, curriculum_stages=stages, train_distractor_scale=3, seed=3)
    longest = chains.max_text_length("reassign", 8, 3) + 1
    grid = {math.ceil(longest * i / 4) for i in (1, 2, 3, 4)}

    def batches(start_batch, count, buckets=4):
        ds = chains.generated_dataset("reassign", "train", 16, start_batch=start_batch, length_buckets=buckets,
                                      **kwargs)
        return [(inputs["tokens"].numpy(), labels) for inputs, labels in ds.take(count)]

    served = batches(0, 21)
    for index, (tokens, labels) in enumerate(served):
        stage_top = 2 if index < 6 else 5 if index < 13 else 8
        stage_length = chains.max_text_length("reassign", stage_top, 3) + 1
        for row, answer, steps in zip(tokens, labels["answers"].numpy(), labels["steps"].numpy()):
            solved, solved_steps = chains.solve("reassign", chains.decode(row))
            assert (chains.encode_answer(solved, 1), solved_steps) == (answer.tolist(), steps)
        assert labels["steps"].numpy().max() <= stage_top
        assert tokens.shape[1] in grid | {stage_length} and tokens.shape[1] <= stage_length
        lengths = (tokens != chains.PAD).sum(axis=1)
        # The shortest grid length that holds the batch's longest problem (or the stage's own).
        assert tokens.shape[1] == min(b for b in grid | {stage_length} if b >= lengths.max())
    # A group's batches are its problems sorted by length: they do not overlap in length.
    group = sorted(((t != chains.PAD).sum(axis=1) for t, _ in served[13:17]), key=np.min)
    assert all(a.max() <= b.min() for a, b in zip(group, group[1:]))
    assert len({t.shape[1] for t, _ in served[13:]}) > 2  # the k <= 8 stage uses several shapes
    for resumed, (tokens, _) in zip(batches(15, 4), served[15:19]):  # resumed mid-group, same batches
        np.testing.assert_array_equal(resumed[0], tokens)
    plain = batches(0, 13, buckets=1)
    assert {t.shape[1] for t, _ in plain} == {chains.max_text_length("reassign", top, 3) + 1 for top in (2, 5)}


def test_pointer_decoy_chain_is_as_long_as_the_real_one_while_names_last():
    """Two labelled sinks, both reached by a chain of k hops: only following the query's chain answers."""
    rng = np.random.default_rng(0)
    for k in (1, 8, 25, 32):
        text, answer = chains.generate_problem("pointer", k, rng)
        clauses = text.split("?")[0].split(";")[:-1]
        sinks = [c for c in clauses if "=" in c]
        assert len(sinks) == 2 and len({c[-1] for c in sinks}) == 2
        edges = len(clauses) - 2
        assert edges == k + min(k, len(chains.NAMES) - k - 2)


def test_test_split_is_finite_and_reaches_the_test_lengths():
    ds = chains.generated_dataset("pointer", "test", 32, test_max_len=20, eval_examples=128)
    steps = np.concatenate([labels["steps"].numpy() for _, labels in ds])
    assert len(steps) == 128 and steps.max() > 12


def test_fixed_length_batches_have_exactly_that_many_steps():
    batches = chains.fixed_length_batches("registers", 7, 10, 4, answer_length=3)
    assert [len(labels["steps"]) for _, labels in batches] == [4, 4, 2]
    assert all((labels["steps"] == 7).all() for _, labels in batches)


def _write(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return str(path)


def test_jsonl_file_task_reads_problems_and_streams_them_resumably(tmp_path):
    lines = [{"input": f"{i}+{i}", "answer": str(2 * i), "steps": 1} for i in range(10)]
    train = _write(tmp_path / "train.jsonl", lines)
    problems = chains.read_jsonl(train, answer_length=2, max_tokens=64)
    assert problems[3] == ("3+3", "6", 1)
    ds = chains.file_dataset(train, "", "train", 4, answer_length=2, max_tokens=64, seed=1)
    first = list(ds.take(3))
    resumed = next(iter(chains.file_dataset(train, "", "train", 4, answer_length=2, max_tokens=64, seed=1,
                                            start_batch=2)))
    np.testing.assert_array_equal(first[2][0]["tokens"], resumed[0]["tokens"])
    tokens, answers = first[0][0]["tokens"].numpy(), first[0][1]["answers"].numpy()
    for row, answer in zip(tokens, answers):
        a, b = chains.decode(row).split("+")
        assert int(a) + int(b) == int(chains.decode(answer))


def test_jsonl_file_task_length_buckets_cut_sorted_batches_and_resume_mid_group(tmp_path):
    lines = [{"input": "+".join(["1"] * n), "answer": str(n % 10)} for n in range(1, 41)]  # 1 to 79 chars
    train = _write(tmp_path / "train.jsonl", lines)
    longest = 79 + 1  # the longest line and its answer slot

    def batches(start_batch, count, buckets=4):
        ds = chains.file_dataset(train, "", "train", 5, answer_length=1, max_tokens=128, seed=2,
                                 start_batch=start_batch, length_buckets=buckets)
        return [(inputs["tokens"].numpy(), labels["answers"].numpy()) for inputs, labels in ds.take(count)]

    served = batches(0, 16)  # two epochs of 8 batches
    grid = {20, 40, 60, 80}
    for tokens, answers in served:
        lengths = (tokens != chains.PAD).sum(axis=1)
        assert tokens.shape[1] == min(b for b in grid if b >= lengths.max())
        for row, answer in zip(tokens, answers):  # cut only PADs: every problem whole, with its answer
            text = chains.decode(row)
            assert chains.encode_answer(str(text.count("1") % 10), 1) == answer.tolist()
    group = sorted(((t != chains.PAD).sum(axis=1) for t, _ in served[:4]), key=np.min)
    assert all(a.max() <= b.min() for a, b in zip(group, group[1:]))  # a group is sorted by length
    firsts = [sorted(chains.decode(t) for t in tokens) for tokens, _ in served[:8]]
    assert sorted(sum(firsts, [])) == sorted(line["input"] for line in lines)  # an epoch is the file once
    for resumed, (tokens, _) in zip(batches(6, 4), served[6:10]):
        np.testing.assert_array_equal(resumed[0], tokens)
    assert {t.shape[1] for t, _ in batches(0, 4, buckets=1)} == {longest}


@pytest.mark.parametrize("line, message", [
    ("not json", r"train.jsonl:2: not a JSON object"),
    ({"answer": "1"}, r"train.jsonl:2: missing key 'input'"),
    ({"input": "1+1", "answer": ""}, r"train.jsonl:2 answer: empty answer"),
    ({"input": "1+1", "answer": "123"}, r"train.jsonl:2 answer: .* more than the model's 2 answer slots"),
    ({"input": "x" * 100, "answer": "1"}, r"train.jsonl:2 input: 102 tokens .* longer than .* 64"),
    ({"input": "1+1", "answer": "2", "steps": 0}, r"train.jsonl:2: steps must be a positive integer"),
    ({"input": "1\u00e9", "answer": "2"}, r"train.jsonl:2 input: character"),
])
def test_a_bad_jsonl_line_is_one_error_naming_its_line(tmp_path, line, message):
    path = _write(tmp_path / "train.jsonl", [{"input": "1+1", "answer": "2"}, line])
    with pytest.raises(UserError, match=message):
        chains.read_jsonl(path, answer_length=2, max_tokens=64)


def test_test_file_characters_never_seen_in_training_are_refused(tmp_path):
    train = _write(tmp_path / "train.jsonl", [{"input": "1+1", "answer": "2"}])
    test = _write(tmp_path / "test.jsonl", [{"input": "1+1", "answer": "2"}, {"input": "1*1", "answer": "1"}])
    with pytest.raises(UserError, match=r"test.jsonl:2: characters '\*' never occur in the training file"):
        chains.file_dataset(train, test, "test", 4, answer_length=2, max_tokens=64)


def test_missing_and_empty_files_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        chains.read_jsonl(str(tmp_path / "nope.jsonl"), answer_length=1, max_tokens=8)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="no problems"):
        chains.read_jsonl(str(tmp_path / "empty.jsonl"), answer_length=1, max_tokens=8)
