"""chain_transformer on plain tokens: structure (looped vs stacked), halting and forced loops, padding and
answer-mask invariance, the loss's supervision window, Keras conventions (fit, .keras save/load), the
serving signatures' input checks, and the evaluation tool on a tiny trained run (generated and JSONL)."""

import dataclasses
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfmstep
from tfmstep import step as step_lib
from tfmstep.data import chains
from tfmstep.errors import UserError
from tfmstep.models import chain_transformer as ct


def _batch(task="lego", k=3, size=4, **config):
    cfg = tfmstep.get_config("chain_transformer", "tiny", task=task, **config)
    (inputs, labels), = chains.fixed_length_batches(task, k, size, size, answer_length=cfg.answers)
    return cfg, {"tokens": tf.constant(inputs["tokens"])}, labels


@pytest.mark.parametrize("task", chains.TASKS)
def test_every_task_runs_training_and_inference_with_answers_at_the_slots(task):
    cfg, inputs, labels = _batch(task)
    model = ct.build_chain_transformer(cfg)
    train_out = model(inputs, training=True)
    assert train_out["step_logits"].shape == (4, cfg.loops_in_training, cfg.answers, chains.VOCAB_SIZE)
    infer_out = model(inputs, training=False)
    assert "step_logits" not in infer_out
    assert infer_out["logits"].shape == (4, cfg.answers, chains.VOCAB_SIZE)
    assert infer_out["steps_used"].shape == (4,)
    loss, metrics = ct.chain_loss(labels, train_out)
    assert loss.shape == (4,) and np.isfinite(loss.numpy()).all()
    assert set(metrics) == {"token_accuracy", "exact_match", "steps_used", "halting_error"}


def test_looped_model_shares_one_core_block_and_baseline_stacks_distinct_ones():
    looped = tfmstep.build("chain_transformer", "tiny")
    baseline = tfmstep.build("chain_transformer", "tiny", looped=False, layers=5)
    assert len(looped.core) == 1 and len(baseline.core) == 5
    _, inputs, _ = _batch()
    assert baseline(inputs, training=False)["steps_used"].numpy().tolist() == [5.0] * 4


def test_default_and_baseline_presets_have_about_equal_parameters_under_a_million():
    looped = tfmstep.build("chain_transformer", "default").count_params()
    baseline = tfmstep.build("chain_transformer", "baseline").count_params()
    assert looped <= 1_000_000 and baseline <= 1_000_000
    assert abs(looped - baseline) / looped < 0.15, (looped, baseline)


def test_forced_loops_run_exactly_that_many_iterations_without_halting():
    _, inputs, _ = _batch()
    model = tfmstep.build("chain_transformer", "tiny")
    out = model(inputs, training=False, num_loops=7, use_halting=False)
    assert out["steps_used"].numpy().tolist() == [7.0] * 4


def test_unrolled_and_while_loop_inference_agree():
    _, inputs, _ = _batch()
    model = tfmstep.build("chain_transformer", "tiny")
    unrolled = model(inputs, training=False, num_loops=5, use_halting=False, return_steps=True)
    looped = model(inputs, training=False, num_loops=5, use_halting=False)
    np.testing.assert_allclose(unrolled["logits"], looped["logits"], atol=1e-5)
    np.testing.assert_allclose(unrolled["step_logits"][:, -1], looped["logits"], atol=1e-5)


def test_a_halted_problem_keeps_its_answer_when_more_loops_are_allowed():
    _, inputs, _ = _batch()
    model = tfmstep.build("chain_transformer", "tiny", halting="learned")
    model.halt_head.bias.assign([5.0])  # halts after the first iteration
    few = model(inputs, training=False, num_loops=3)
    many = model(inputs, training=False, num_loops=50)
    assert few["steps_used"].numpy().tolist() == [1.0] * 4
    np.testing.assert_allclose(few["logits"], many["logits"], atol=1e-6)


def test_halt_confidence_keeps_looping_until_every_answer_is_confident():
    _, inputs, _ = _batch()
    for halting, options in (("learned", {}), ("fixed_point", dict(fixed_point_tolerance=1e3))):
        model = tfmstep.build("chain_transformer", "tiny", halting=halting, **options)
        if halting == "learned":
            model.halt_head.bias.assign([5.0])  # the rule alone would stop after the first iteration
        first = 1.0 if halting == "learned" else 0.0  # fixed point: settled before the iteration that saw it
        assert model(inputs, training=False)["steps_used"].numpy().tolist() == [first] * 4
        model.config = dataclasses.replace(model.config, halt_confidence=0.999)  # untrained: never that sure
        assert model(inputs, training=False, num_loops=6)["steps_used"].numpy().tolist() == [6.0] * 4
        model.head.bias.assign(tf.one_hot(0, model.head.bias.shape[0]) * 50.0)  # certain from the start
        assert model(inputs, training=False, num_loops=6)["steps_used"].numpy().tolist() == [first] * 4


def test_ready_halting_stops_when_the_answers_outweigh_not_yet_at_every_slot():
    _, inputs, _ = _batch("registers", k=2)  # three answer slots
    model = tfmstep.build("chain_transformer", "tiny", task="registers", halting="ready")
    out = model(inputs, training=True)
    # The halt logit is the least ready slot's log P(some answer) - log P(not yet): it moves with the answers.
    model.head.bias.assign(model.head.bias + 3.0)
    shifted = model(inputs, training=True)
    np.testing.assert_allclose(shifted["step_halt_logits"], out["step_halt_logits"] + 3.0, atol=1e-4)
    model.halt_head.bias.assign([-50.0])  # "not yet" never wins: stop after the first iteration
    assert model(inputs, training=False, num_loops=6)["steps_used"].numpy().tolist() == [1.0] * 4
    model.halt_head.bias.assign([50.0])  # "not yet" always wins: run to the cap
    assert model(inputs, training=False, num_loops=6)["steps_used"].numpy().tolist() == [6.0] * 4


def test_fixed_point_halting_stops_when_the_state_stops_moving():
    _, inputs, _ = _batch()
    settles_at_once = tfmstep.build("chain_transformer", "tiny", halting="fixed_point", fixed_point_tolerance=1e3)
    # One iteration ran and changed nothing: the state needed none.
    assert settles_at_once(inputs, training=False)["steps_used"].numpy().tolist() == [0.0] * 4
    assert settles_at_once(inputs, training=True)["steps_used"].numpy().tolist() == [0.0] * 4
    never_settles = tfmstep.build("chain_transformer", "tiny", halting="fixed_point", fixed_point_tolerance=1e-12)
    out = never_settles(inputs, training=False, num_loops=9)
    assert out["steps_used"].numpy().tolist() == [9.0] * 4  # stopped by the cap, every iteration counted


def test_no_problem_halts_before_its_answer_lag_has_passed():
    _, inputs, _ = _batch()
    for lag in (1, 2):
        model = tfmstep.build("chain_transformer", "tiny", halting="fixed_point", fixed_point_tolerance=1e3,
                              answer_lag=lag)
        # It halts at iteration lag + 1 at the earliest, which shows the state settled after lag.
        assert model(inputs, training=False)["steps_used"].numpy().tolist() == [float(lag)] * 4


def test_fixed_point_cost_counts_only_the_iterations_after_k():
    cfg, inputs, labels = _batch(k=2, fixed_point_weight=1.0)
    model = ct.build_chain_transformer(cfg)
    outputs = model(inputs, training=True)
    assert outputs["step_fixed_point_cost"].shape == (4, cfg.loops_in_training)
    with_cost, _ = ct.chain_loss(labels, outputs)
    after_k_zeroed = dict(outputs, step_fixed_point_cost=tf.concat(
        [outputs["step_fixed_point_cost"][:, :2], tf.zeros_like(outputs["step_fixed_point_cost"][:, 2:])], 1))
    without_cost, _ = ct.chain_loss(labels, {k: v for k, v in outputs.items() if k != "step_fixed_point_cost"})
    np.testing.assert_allclose(ct.chain_loss(labels, after_k_zeroed)[0], without_cost, rtol=1e-6)
    assert (with_cost.numpy() > without_cost.numpy()).all()


_LOOKUP = dict(conv_kernel=5, block_conv_kernel=3, token_match=4.0, window=0, causal=False)


@pytest.mark.parametrize("options", [{}, _LOOKUP, dict(_LOOKUP, residual_state=False, value_feedback=True)],
                         ids=["default", "lookup", "lookup_feedback"])
def test_padding_after_the_content_and_an_answer_mask_change_nothing(options):
    _, inputs, _ = _batch("registers", k=4)
    model = tfmstep.build("chain_transformer", "tiny", task="registers", **options)
    reference = model(inputs, training=False, num_loops=4, use_halting=False)["logits"]
    padded = tf.pad(inputs["tokens"], [[0, 0], [0, 9]])
    out = model({"tokens": padded}, training=False, num_loops=4, use_halting=False)["logits"]
    np.testing.assert_allclose(out, reference, atol=1e-5)
    mask = (padded >= 1) & (padded <= chains.MAX_ANSWER_LENGTH)
    out = model({"tokens": padded, "answer_mask": mask}, training=False, num_loops=4, use_halting=False)["logits"]
    np.testing.assert_allclose(out, reference, atol=1e-5)


def test_lego_negation_rate_sets_the_share_of_negated_clauses_in_every_split():
    def negated_share(negation_rate):
        cfg = tfmstep.get_config("chain_transformer", "tiny", task="lego", negation_rate=negation_rate)
        rows = [next(iter(ct.chain_dataset(cfg, split, 32)))[0]["tokens"].numpy() for split in ("train", "validation")]
        (inputs, _), = chains.fixed_length_batches("lego", 4, 32, 32, answer_length=1, **cfg.generator_options)
        texts = [chains.decode(row) for batch in rows + [inputs["tokens"]] for row in batch]
        ops = [clause.split("=")[1][0] for text in texts for clause in text.split("?")[0].split(";") if clause]
        return sum(op == "-" for op in ops) / sum(op in "+-" for op in ops)

    assert negated_share(0.0) == 0.0 and negated_share(1.0) == 1.0
    assert 0.4 < negated_share(0.5) < 0.6


def test_registers_train_copy_rate_changes_training_problems_only():
    def copy_shares(train_copy_rate):
        cfg = tfmstep.get_config("chain_transformer", "tiny", task="registers", train_copy_rate=train_copy_rate)
        shares = {}
        for split in ("train", "validation", "test"):
            texts = [chains.decode(row) for row in next(iter(ct.chain_dataset(cfg, split, 64)))[0]["tokens"].numpy()]
            ops = [ins[1] for text in texts for ins in text.split(":")[1].split(";")[:-1]]
            shares[split] = sum(op == "=" for op in ops) / len(ops)
        return shares

    default, none, every = copy_shares(chains.REGISTERS_COPY_RATE), copy_shares(0.0), copy_shares(1.0)
    assert 0.25 < default["train"] < 0.42 and none["train"] == 0.0 and every["train"] == 1.0
    # Validation and test are the generator's own problems whatever training draws.
    assert none["validation"] == every["validation"] == default["validation"]
    assert none["test"] == every["test"] == default["test"] > 0.25


@pytest.mark.parametrize("task", chains.DISTRACTOR_SCALE_TASKS)
def test_train_distractor_scale_lengthens_training_problems_only(task):
    def clauses_per_problem(scale):
        cfg = tfmstep.get_config("chain_transformer", "tiny", task=task, train_distractor_scale=scale)
        counts = {}
        for split in ("train", "validation"):
            inputs, labels = next(iter(ct.chain_dataset(cfg, split, 64)))
            texts = [chains.decode(row) for row in inputs["tokens"].numpy()]
            assert [chains.solve(task, t)[1] for t in texts] == labels["steps"].numpy().tolist()
            counts[split] = np.mean([t.count(";") for t in texts])
        return counts

    plain, scaled = clauses_per_problem(1), clauses_per_problem(3)
    assert scaled["train"] > 1.2 * plain["train"]
    assert plain["validation"] == scaled["validation"]  # scored on the generator's own problems


def test_value_feedback_makes_each_iteration_read_the_answer_heads_distribution():
    _, inputs, _ = _batch()
    shift = tf.one_hot(chains.FIRST_CHAR_ID + 3, chains.VOCAB_SIZE) * 4.0
    for feedback in (False, True):
        model = tfmstep.build("chain_transformer", "tiny", residual_state=False, value_feedback=feedback)
        before = model(inputs, training=False, num_loops=3, use_halting=False)["logits"]
        model.head.bias.assign(model.head.bias + shift)
        after = model(inputs, training=False, num_loops=3, use_halting=False)["logits"]
        # Without feedback the head only reads the last state: its bias shifts the logits and nothing else.
        assert np.allclose(after - before, shift, atol=1e-4) != feedback


def _slot_logits(model, text, loops):
    tokens = tf.constant([chains.encode(text) + [1]])
    return model({"tokens": tokens}, training=False, num_loops=loops, use_halting=False)["logits"]


def _reads_the_change(model, loops):
    # The two problems differ only in the digit two tokens before the answer slot.
    return not np.allclose(_slot_logits(model, "10110?", loops), _slot_logits(model, "10111?", loops), atol=1e-6)


def test_causal_local_heads_carry_a_token_one_position_per_iteration():
    # No prelude, causal +-1 heads, answers read from the slot's own state: the slot sees the token d
    # places before it only after d iterations.
    local = tfmstep.build("chain_transformer", "tiny", task="parity", prelude_layers=0)
    assert not _reads_the_change(local, loops=1)
    assert _reads_the_change(local, loops=2)
    for reaching_further in (dict(global_heads=1), dict(window=2), dict(readout="attention")):
        model = tfmstep.build("chain_transformer", "tiny", task="parity", prelude_layers=0, **reaching_further)
        assert _reads_the_change(model, loops=1), reaching_further


def test_answer_reads_text_and_returns_answer_strings_and_loops():
    model = tfmstep.build("chain_transformer", "tiny", task="parity")
    answers, loops = model.answer(["10110?", "1?"], max_loops=3)
    assert len(answers) == 2 and all(len(a) <= model.config.answers for a in answers)
    assert all(1 <= n <= 3 for n in loops)
    with pytest.raises(UserError, match="problem 1: character"):
        model.answer(["10?", "1\u00e9?"])


def test_answer_slots_are_found_wherever_the_problem_ends():
    model = tfmstep.build("chain_transformer", "tiny")
    text = "b=-a+2;a=3;c=+b+0;?c"
    tokens = tf.constant([chains.encode(text) + [1] + [chains.PAD] * 4, chains.encode("a=3;" + text) + [1]])
    positions = model.answer_positions(tokens).numpy()
    assert positions.tolist() == [[len(text)], [len(text) + 4]]


def test_loss_supervises_the_answers_only_from_iteration_k_on():
    classes = chains.VOCAB_SIZE
    answers = np.array([[20], [30]], np.int32)
    right = tf.one_hot(answers, classes) * 50.0  # [B, A, C]: confidently right
    wrong = tf.one_hot(answers + 1, classes) * 50.0
    # Example 0 (k=2) is wrong at iteration 1 only; example 1 (k=3) is wrong at iterations 1-2.
    step_logits = tf.stack([tf.stack([wrong[0], right[0], right[0], right[0]]),
                            tf.stack([wrong[1], wrong[1], right[1], right[1]])])
    halt = tf.constant([[-50.0, 50.0, 50.0, 50.0], [-50.0, -50.0, 50.0, 50.0]])
    outputs = {"logits": step_logits[:, -1], "steps_used": tf.constant([2.0, 3.0]),
               "step_logits": step_logits, "step_halt_logits": halt}
    loss, _ = ct.chain_loss({"answers": answers, "steps": np.array([2, 3], np.int32)}, outputs)
    np.testing.assert_allclose(loss, [0.0, 0.0], atol=1e-6)
    # Wrong after k: penalised. Unknown k (-1): only the last iteration counts for the answer.
    loss, _ = ct.chain_loss({"answers": answers, "steps": np.array([1, -1], np.int32)}, outputs)
    assert loss[0] > 10 and loss[1] < 1e-6


def _shared_step_on(cfg, batch_size, learning_rate, warmup_steps, total_steps, jit_compile):
    """(steps, train iterator, optimizer) of a fresh model of ``cfg`` on the shared training step."""
    model = ct.build_chain_transformer(cfg)
    optimizer = step_lib.make_optimizer(step_lib.OptimizerConfig(
        learning_rate=learning_rate, warmup_steps=warmup_steps, total_steps=total_steps, weight_decay=0.0))
    optimizer.build(model.trainable_variables)
    steps = step_lib.make_steps(model, optimizer, ct.chain_loss, global_batch_size=batch_size,
                                jit_compile=jit_compile)
    return steps, iter(ct.chain_dataset(cfg, "train", batch_size, seed=0)), optimizer


def test_tiny_preset_learns_parity_through_the_shared_step():
    keras.utils.set_random_seed(0)
    cfg = tfmstep.get_config("chain_transformer", "tiny", task="parity")
    steps, iterator, _ = _shared_step_on(cfg, 32, learning_rate=3e-3, warmup_steps=20, total_steps=200,
                                         jit_compile=False)
    loss = steps.train(iterator, tf.constant(200))["loss"].numpy()
    assert loss[-20:].mean() < 0.5 * loss[:20].mean(), (loss[:20].mean(), loss[-20:].mean())


def test_the_jitted_step_trains_through_curriculum_stages_of_different_lengths_in_one_call():
    keras.utils.set_random_seed(0)
    cfg = tfmstep.get_config("chain_transformer", "tiny", task="lego", train_min_len=0, train_max_len=3,
                             curriculum_stages="1:2,2:2")
    steps, iterator, optimizer = _shared_step_on(cfg, 8, learning_rate=1e-3, warmup_steps=1, total_steps=6,
                                                 jit_compile=True)
    history = steps.train(iterator, tf.constant(6))  # three problem lengths within one call
    assert history["loss"].shape == (6,) and np.isfinite(history["loss"].numpy()).all()
    assert int(optimizer.iterations) == 6


def test_a_prelude_convolution_shows_each_token_its_neighbours_before_any_attention():
    # The digit two tokens before the slot: causal +-1 heads alone need two iterations to bring it there;
    # a causal kernel of 3 puts it in the slot's own input.
    assert not _reads_the_change(tfmstep.build("chain_transformer", "tiny", task="parity", prelude_layers=0),
                                 loops=1)
    conv = tfmstep.build("chain_transformer", "tiny", task="parity", prelude_layers=0, conv_kernel=3)
    assert _reads_the_change(conv, loops=1)


def test_a_block_convolution_moves_what_attention_brought_further_in_the_same_iteration():
    plain = tfmstep.build("chain_transformer", "tiny", task="parity", prelude_layers=0)
    assert not _reads_the_change(plain, loops=1)
    conv = tfmstep.build("chain_transformer", "tiny", task="parity", prelude_layers=0, block_conv_kernel=3)
    assert _reads_the_change(conv, loops=1)


def test_two_sided_convolutions_under_causal_heads_see_the_next_token_but_nothing_further():
    # The answer read at "b" of "a=b+2;c=4", with the token after it changed or one six places after it:
    # one iteration, no prelude, causal heads at any distance, a convolution of 3.
    def middle_logits(model, text):
        tokens = tf.constant([chains.encode(text)])
        mask = tf.constant([[i == 2 for i in range(len(text))]])  # at "b"
        return model({"tokens": tokens, "answer_mask": mask}, training=False, num_loops=1,
                     use_halting=False)["logits"].numpy()

    def build(**options):
        return tfmstep.build("chain_transformer", "tiny", task="reassign", prelude_layers=0, window=0,
                             causal=True, conv_kernel=3, **options)

    two_sided, causal = build(causal_convolutions=False), build()
    base = "a=b+2;c=4"
    next_changed, later_changed = "a=b-2;c=4", "a=b+2;c=5"
    assert not np.allclose(middle_logits(two_sided, base), middle_logits(two_sided, next_changed), atol=1e-6)
    assert np.allclose(middle_logits(two_sided, base), middle_logits(two_sided, later_changed), atol=1e-6)
    assert np.allclose(middle_logits(causal, base), middle_logits(causal, next_changed), atol=1e-6)


def test_same_token_mask_marks_other_occurrences_only():
    tokens = tf.constant([[chains.FIRST_CHAR_ID] + chains.encode("a0a0") + [1, 0, 0]])
    mask = ct.model.same_token_mask(tokens, start_token=True)[0, 0].numpy()
    a1, zero1, a2, zero2 = 1, 2, 3, 4
    assert mask[a1, a2] == mask[a2, a1] == mask[zero1, zero2] == 1
    assert mask[a1, a1] == 0  # not itself
    assert mask[0, zero1] == mask[zero1, 0] == 0  # the start placeholder shares the id of "0"
    assert mask[6, 7] == mask[7, 6] == 0  # padding
    assert mask.sum() == 4


def test_token_match_adds_a_learned_bonus_to_every_self_attention_block():
    model = tfmstep.build("chain_transformer", "tiny", task="pointer", token_match=4.0, window=0, causal=False)
    for block in model.prelude + model.core:
        np.testing.assert_array_equal(block.match_weight.numpy(), 4.0)
    _, inputs, _ = _batch("pointer", k=2)  # every name occurs twice or more
    before = model(inputs, training=False, num_loops=2, use_halting=False)["logits"].numpy()
    model.core[0].match_weight.assign(tf.zeros_like(model.core[0].match_weight))
    after = model(inputs, training=False, num_loops=2, use_halting=False)["logits"].numpy()
    assert not np.allclose(before, after)


def test_answer_lag_starts_the_supervised_readouts_that_many_iterations_later():
    cfg, inputs, _ = _batch("pointer", k=2, answer_lag=1, train_loops=6)
    model = ct.build_chain_transformer(cfg)
    steps = model(inputs, training=True)["step_logits"]
    assert steps.shape[1] == 6
    for j in (0, 5):  # output step j is the readout after iteration j + 1 + answer_lag
        np.testing.assert_allclose(
            steps[:, j], model(inputs, training=False, num_loops=j + 2, use_halting=False)["logits"], atol=1e-5)


def test_recomputing_iterations_replace_the_state_instead_of_adding_to_it():
    # With the core's attention values zeroed, nothing of the previous state reaches a recomputing
    # iteration, so every iteration gives the same state; a residual iteration still adds to its own.
    _, inputs, _ = _batch("lego", k=2)
    for residual_state, settles in ((False, True), (True, False)):
        model = tfmstep.build("chain_transformer", "tiny", residual_state=residual_state)
        values = model.core[0].key_value
        kernel = values.kernel.numpy()
        kernel[:, model.config.width:] = 0.0
        values.kernel.assign(kernel)
        values.bias.assign(np.zeros_like(values.bias.numpy()))
        logits = [model(inputs, training=False, num_loops=n, use_halting=False)["logits"].numpy() for n in (1, 3)]
        assert np.allclose(*logits, atol=1e-5) == settles, residual_state


def test_core_layers_run_their_distinct_blocks_in_every_iteration_and_round_trip(tmp_path):
    _, inputs, _ = _batch("registers", k=2)
    model = tfmstep.build("chain_transformer", "tiny", task="registers", core_layers=2)
    one_block = tfmstep.build("chain_transformer", "tiny", task="registers")
    assert [block.name for block in model.core] == ["core", "core1"]
    assert model.count_params() - one_block.count_params() == model.core[1].count_params() > 0
    path = str(tmp_path / "two_blocks.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)

    def logits(m, loops):
        return m(inputs, training=False, num_loops=loops, use_halting=False)["logits"].numpy()

    np.testing.assert_allclose(logits(loaded, 3), logits(model, 3), atol=1e-6)
    before = [logits(model, n) for n in (1, 3)]
    second = model.core[1].mlp_out  # only the second block changes (not by a constant: its LayerNorm ends it)
    second.kernel.assign(second.kernel.numpy() + np.random.default_rng(0).normal(size=second.kernel.shape))
    assert all(not np.allclose(old, logits(model, n), atol=1e-4) for old, n in zip(before, (1, 3)))


def test_model_fit_uses_the_family_loss_and_the_keras_file_round_trips(tmp_path):
    cfg = tfmstep.get_config("chain_transformer", "tiny")
    model = ct.build_chain_transformer(cfg)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    history = model.fit(ct.chain_dataset(cfg, "train", 8).take(3), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    path = str(tmp_path / "chain.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.config == cfg
    _, inputs, _ = _batch()
    np.testing.assert_allclose(loaded(inputs, training=False)["logits"], model(inputs, training=False)["logits"],
                               atol=1e-6)


@pytest.mark.parametrize("overrides, message", [
    (dict(task="nope"), "unknown chain task 'nope'"),
    (dict(width=30, heads=4), "divisible by heads"),
    (dict(train_loops=3, train_max_len=8), "fewer than train_max_len"),
    (dict(task="pointer", test_max_len=51), "chain lengths up to 50"),
    (dict(task="kinship", test_max_len=40), "chain lengths up to 34"),
    (dict(task="lego", test_max_len=35), "chain lengths up to 34"),
    (dict(task="reassign", train_min_len=0), "reassign' has no zero-step problems"),
    (dict(train_min_len=-1), "train_min_len must be >= 0"),
    (dict(answer_length=9), "answer_length must be in 0..8"),
    (dict(modulus=11), "modulus must be in 2..10"),
    (dict(window=-1), "window must be >= 0"),
    (dict(core_layers=0), "core_layers and max_loops must be >= 1"),
    (dict(looped=False, core_layers=2), "core_layers=2 is for the looped model"),
    (dict(conv_kernel=4, causal=False), "conv_kernel must be 0 or >= 1"),
    (dict(conv_kernel=-1), "conv_kernel must be 0 or >= 1"),
    (dict(block_conv_kernel=2, causal=False), "block_conv_kernel must be 0 or >= 1"),
    (dict(conv_kernel=4, causal_convolutions=False), r"conv_kernel must be 0 or >= 1 \(odd unless the convolutions are causal\), got 4"),
    (dict(answer_lag=-1), "answer_lag must be >= 0"),
    (dict(task="pointer", negation_rate=0.0), "applies to task 'lego' only"),
    (dict(negation_rate=1.5), "negation_rate must be in"),
    (dict(task="lego", train_copy_rate=0.1), "applies to task 'registers' only"),
    (dict(task="registers", train_copy_rate=-0.1), "train_copy_rate must be in"),
    (dict(task="pointer", train_distractor_scale=2), "applies to tasks lego, reassign only"),
    (dict(task="lego", train_max_len=16, train_distractor_scale=5), "more than the 52 names"),
    (dict(task="reassign", train_distractor_scale=0), "train_distractor_scale must be >= 1"),
    (dict(train_length_buckets=0), "train_length_buckets must be >= 1"),
    (dict(halt_confidence=1.0), r"halt_confidence must be in \[0, 1\)"),
    (dict(global_heads=5, heads=4), "global_heads must be in 0..heads=4"),
    (dict(readout="pool"), "unknown readout 'pool'"),
    (dict(halting="never"), "unknown halting 'never'"),
    (dict(fixed_point_tolerance=0.0), "fixed_point_tolerance must be > 0"),
    (dict(curriculum_stages="1-600"), "curriculum_stages is 'top:steps,...'"),
    (dict(curriculum_stages="1:0"), "each stage needs >= 1 step"),
    (dict(curriculum_stages="2:10,1:10"), "tops must rise within train_min_len..train_max_len"),
    (dict(curriculum_stages="9:10", train_max_len=8), "tops must rise within"),
    (dict(curriculum_stages="1:10", curriculum_steps=5), "without curriculum_steps"),
])
def test_bad_config_gives_a_clear_error(overrides, message):
    with pytest.raises(UserError, match=message):
        tfmstep.get_config("chain_transformer", **overrides)


def test_serving_signatures_refuse_bad_requests_by_input_name(tmp_path):
    from tfmstep.export import saved_model, signatures

    cfg = tfmstep.get_config("chain_transformer", "tiny")
    model = ct.build_chain_transformer(cfg)
    servable = signatures.servable("chain_transformer", model, cfg)
    path = saved_model.export_saved_model(model, "chain_transformer", cfg, str(tmp_path), servable=servable)
    loaded = tf.saved_model.load(path)
    answer, by_text = loaded.signatures["serving_default"], loaded.signatures["answer_text"]
    good = chains.encode("b=-a+2;a=3;?b") + [1]
    out = by_text(text=tf.constant(["b=-a+2;a=3;?b"]))
    np.testing.assert_array_equal(out["answers"], answer(tokens=tf.constant([good]))["answers"])
    bad_tokens = [
        ([[-1] + good[1:]], r"token ids must be in \[0, 103\], got -1 to"),
        ([good[:-1] + [chains.VOCAB_SIZE]], r"token ids must be in \[0, 103\], got .* to 104"),
        ([good[:-1] + [chains.PAD]], "each answer slot"),
        ([good + [1]], "each answer slot"),
        ([good + [chains.PAD] * (cfg.max_tokens)], "over max_tokens"),
    ]
    for tokens, message in bad_tokens:
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            answer(tokens=tf.constant(tokens, tf.int32))
    for text, message in [(["b=\u00e9;?b"], "outside printable ASCII"), ([""], "empty problem"),
                          (["x" * cfg.max_tokens], "longer than max_tokens"), ([b"\xff\xfe"], "outside printable"),
                          ([], "empty batch")]:
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            by_text(text=tf.constant(text, tf.string))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from tfmstep import trainer

    workdir = str(tmp_path_factory.mktemp("chain") / "run")
    trainer.train("chain_transformer", workdir, preset="tiny",
                  overrides={"task": "parity"},
                  config=trainer.TrainConfig(steps=30, batch_size=16, log_every=10, eval_every=0,
                                             checkpoint_every=30, jit_compile=False, steps_per_call=10))
    return workdir


def test_evaluation_writes_json_png_and_table_for_a_trained_run(tiny_run, tmp_path):
    from tfmstep import evaluation as evaluate

    report, table = evaluate.evaluate([tiny_run], ["looped"], str(tmp_path), "parity", examples=8,
                                      max_length_factor=2)
    rows = report["runs"]["looped"]["per_length"]
    assert [r["length"] for r in rows] == list(range(1, 7))
    assert all(0.0 <= r["exact_match"] <= 1.0 and "forced_exact_match" in r for r in rows)
    for ext in ("json", "png", "txt"):
        assert os.path.getsize(tmp_path / f"parity.{ext}") > 0
    assert json.loads((tmp_path / "parity.json").read_text())["runs"]["looped"]["task"] == "parity"
    assert "exact" in table


def test_merge_adds_a_run_to_an_existing_report_measured_alike(tiny_run, tmp_path):
    from tfmstep import evaluation as evaluate

    options = dict(examples=4, max_length_factor=1)
    evaluate.evaluate([tiny_run], ["first"], str(tmp_path), "parity", **options)
    report, table = evaluate.evaluate([tiny_run, tiny_run], ["second", "first"], str(tmp_path), "parity",
                                      merge=True, **options)
    written = json.loads((tmp_path / "parity.json").read_text())
    assert list(written["runs"]) == list(report["runs"]) == ["first", "second"]  # "first" replaced in place
    assert "second:" in table and "second:" in (tmp_path / "parity.txt").read_text()
    with pytest.raises(UserError, match="examples_per_length=4, this evaluation with 8"):
        evaluate.evaluate([tiny_run], ["third"], str(tmp_path), "parity", merge=True, examples=8,
                          max_length_factor=1)
    assert list(json.loads((tmp_path / "parity.json").read_text())["runs"]) == ["first", "second"]


def test_show_errors_lists_wrong_problems_with_their_answers_that_the_solver_confirms(tiny_run, tmp_path):
    from tfmstep import evaluation as evaluate

    report, table = evaluate.evaluate([tiny_run], ["looped"], examples=16, max_length_factor=2, show_errors=3)
    rows = report["runs"]["looped"]["per_length"]
    wrong = [(r["length"], e) for r in rows for e in r.get("errors", ())]
    assert wrong, "a 30-step tiny model should get some parity problems wrong"
    for r in rows:
        assert len(r.get("errors", ())) == min(3, round((1 - r["exact_match"]) * r["examples"]))
    for k, e in wrong:
        assert chains.solve("parity", e["input"]) == (e["answer"], k) and e["predicted"] != e["answer"]
        assert f"{e['answer']} / {e['predicted']}  {e['input']}" in table
    # A JSONL test file's wrong problems show as the file has them.
    text, answer = wrong[0][1]["input"], wrong[0][1]["answer"]
    test_file = tmp_path / "test.jsonl"
    test_file.write_text(json.dumps({"input": text, "answer": answer}) + "\n")
    report, _ = evaluate.evaluate([tiny_run], None, test_file=str(test_file), show_errors=5)
    [row] = next(iter(report["runs"].values()))["per_length"]
    assert [e["input"] for e in row["errors"]] == [text]


def test_evaluation_reports_halting_and_forced_loops_only_for_the_looped_model():
    from tfmstep.models.chain_transformer import evaluate as chain_evaluate

    spec = tfmstep.registry.get_spec("chain_transformer")
    for looped in (True, False):
        config = spec.config("tiny", task="parity", looped=looped, layers=3)
        rows = chain_evaluate.evaluate_model(spec.build(config), config, [2, 3], examples=4, batch_size=4)
        assert all(("halting_within_1" in r) == looped and ("forced_exact_match" in r) == looped for r in rows)


def test_forced_loops_are_twice_the_iterations_the_answer_is_due_at():
    from tfmstep.models.chain_transformer import evaluate as chain_evaluate

    spec = tfmstep.registry.get_spec("chain_transformer")
    for answer_lag in (0, 1, 2):
        config = spec.config("tiny", task="parity", answer_lag=answer_lag)
        model, forced_counts = spec.build(config), []

        def predict(inputs, num_loops, use_halting):
            if not use_halting:
                forced_counts.append(num_loops)
            return model(inputs, training=False, num_loops=tf.constant(num_loops), use_halting=use_halting)

        batches = chains.fixed_length_batches("parity", 3, 4, 4, seed=0, answer_length=config.answers)
        chain_evaluate._score(batches, predict, config)
        assert forced_counts == [2 * (3 + answer_lag)]


def test_evaluation_overrides_only_how_the_trained_model_runs(tiny_run):
    from tfmstep import evaluation as evaluate

    report, table = evaluate.evaluate([tiny_run], ["looped"], examples=8, max_length_factor=1,
                                      config_overrides={"halting": "learned", "max_loops": "2"})
    run = report["runs"]["looped"]
    assert run["inference"]["halting"] == "learned" and run["inference"]["max_loops"] == 2
    assert all(r["steps_used"] <= 2 for r in run["per_length"]) and "max_loops=2" in table
    with pytest.raises(UserError, match="--config=width cannot change at evaluation"):
        evaluate.evaluate([tiny_run], config_overrides={"width": "32"})


def test_evaluation_of_a_jsonl_test_file_groups_by_steps(tiny_run, tmp_path):
    from tfmstep import evaluation as evaluate

    rng = np.random.default_rng(0)
    lines = []
    for k in (2, 2, 5):
        text, answer = chains.generate_problem("parity", k, rng)
        lines.append(json.dumps({"input": text, "answer": answer, "steps": k}))
    lines.append(json.dumps({"input": "101?", "answer": "0"}))
    test_file = tmp_path / "test.jsonl"
    test_file.write_text("\n".join(lines) + "\n")
    report, _ = evaluate.evaluate([tiny_run], None, "", "file", test_file=str(test_file))
    rows = next(iter(report["runs"].values()))["per_length"]
    assert [(r["length"], r["examples"]) for r in rows] == [(2, 2), (5, 1), (None, 1)]


def test_merge_refuses_runs_on_another_test_file_or_on_generated_problems(tiny_run, tmp_path):
    from tfmstep import evaluation as evaluate

    first = _jsonl(tmp_path / "first.jsonl", "parity", [2, 3], seed=0)
    other = _jsonl(tmp_path / "other.jsonl", "parity", [2, 3], seed=1)
    out = str(tmp_path / "reports")
    report, _ = evaluate.evaluate([tiny_run], ["a"], out, "file", test_file=first)
    assert report["runs"]["a"]["test_file"] == first and len(report["runs"]["a"]["test_file_sha256"]) == 64
    evaluate.evaluate([tiny_run], ["b"], out, "file", test_file=first, merge=True)  # the same file: merged
    with pytest.raises(UserError, match=f"a: test file {first}; b: test file {first}; c: test file {other}.*"
                                        f"another --name"):
        evaluate.evaluate([tiny_run], ["c"], out, "file", test_file=other, merge=True)
    with pytest.raises(UserError, match="c: generated task=parity, modulus=5"):
        evaluate.evaluate([tiny_run], ["c"], out, "file", merge=True, examples=256, max_length_factor=4)
    assert list(json.loads((tmp_path / "reports" / "file.json").read_text())["runs"]) == ["a", "b"]
    # Re-evaluating every run of the report on another file replaces them all: allowed.
    evaluate.evaluate([tiny_run, tiny_run], ["a", "b"], out, "file", test_file=other, merge=True)


def test_merge_refuses_generated_problems_of_another_task_or_generator_option(tiny_run, tmp_path):
    from tfmstep import evaluation as evaluate

    options = dict(examples=4, max_length_factor=1)
    evaluate.evaluate([tiny_run], ["parity"], str(tmp_path), "mixed", **options)
    path = tmp_path / "mixed.json"
    report = json.loads(path.read_text())
    assert report["runs"]["parity"]["generator"] == {"task": "parity", "modulus": 5}
    report["runs"]["parity"]["generator"]["modulus"] = 3  # as if generated with another modulus
    path.write_text(json.dumps(report))
    with pytest.raises(UserError, match="parity: generated task=parity, modulus=3; again: generated task=parity"):
        evaluate.evaluate([tiny_run], ["again"], str(tmp_path), "mixed", merge=True, **options)
    del report["runs"]["parity"]["generator"]  # an older report records only the task: compared on it
    path.write_text(json.dumps(report))
    evaluate.evaluate([tiny_run], ["again"], str(tmp_path), "mixed", merge=True, **options)
    report["runs"]["parity"]["task"] = "pointer"
    path.write_text(json.dumps(report))
    with pytest.raises(UserError, match="parity: generated task=pointer"):
        evaluate.evaluate([tiny_run], ["again"], str(tmp_path), "mixed", merge=True, **options)


def _jsonl(path, task, lengths, seed):
    rng = np.random.default_rng(seed)
    lines = []
    for k in lengths:
        text, answer = chains.generate_problem(task, int(k), rng)
        lines.append(json.dumps({"input": text, "answer": answer, "steps": int(k)}))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_a_file_task_reads_sentencepiece_pieces_trains_saves_and_serves_text(tmp_path):
    from tfmstep import saving, trainer
    from tfmstep.export import saved_model, signatures

    train_file = _jsonl(tmp_path / "train.jsonl", "lego", [1, 2, 3] * 100, seed=0)
    test_file = _jsonl(tmp_path / "test.jsonl", "lego", [1, 2, 3] * 4, seed=1)
    workdir = tmp_path / "run"
    overrides = {"task": "file", "train_file": train_file, "test_file": test_file, "answer_length": 1,
                 "tokenizer": "sentencepiece", "vocab_file": str(workdir / "vocab.spm"), "vocab_size": 350}
    trainer.train("chain_transformer", str(workdir), "tiny", overrides,
                  config=trainer.TrainConfig(steps=2, batch_size=8, eval_batches=1, jit_compile=False))
    assert (workdir / "vocab.spm").exists()
    model, config, spec = saving.load_trained(str(workdir))
    tokens = next(iter(spec.dataset(config, "train", 8)))[0]["tokens"].numpy()
    assert tokens.max() >= chains.VOCAB_SIZE  # pieces, not characters
    assert (tokens > 0).sum(1).max() < max(len(json.loads(l)["input"]) for l in open(train_file))
    problems = [json.loads(line)["input"] for line in open(test_file)][:3]
    answers, _ = model.answer(problems)

    saved = saving.save(model, str(tmp_path / "saved"), config=config, evaluate_metrics=False)
    assert os.path.isfile(os.path.join(saved, saving.ASSETS_DIR, "vocab.spm"))
    path = saved_model.export_saved_model(model, spec.name, config, str(tmp_path / "export"),
                                          servable=signatures.servable(spec, model, config))
    assert os.path.isfile(os.path.join(path, "assets", "vocab.spm"))
    served = tf.saved_model.load(path).signatures["answer_text"](text=tf.constant(problems))
    assert [a.decode() for a in served["answer_text"].numpy()] == answers


def test_sentencepiece_is_refused_for_generated_tasks_and_without_a_vocab_file():
    with pytest.raises(UserError, match="tokenizer=sentencepiece is for task=file"):
        tfmstep.get_config("chain_transformer", "tiny", tokenizer="sentencepiece", vocab_file="v.spm")
    with pytest.raises(UserError, match="needs vocab_file"):
        tfmstep.get_config("chain_transformer", "tiny", task="file", tokenizer="sentencepiece")
