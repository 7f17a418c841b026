"""chain_transformer: looped vs baseline structure, halting and forced loops, the per-iteration loss,
training through the shared step, and the evaluation tool on a tiny trained run."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfmstep
from tfmstep import evaluate_chains
from tfmstep import step as step_lib
from tfmstep.data import chains
from tfmstep.errors import UserError
from tfmstep.models import chain_transformer as ct


def _batch(task="lego", length=3, size=4, **config):
    cfg = tfmstep.get_config("chain_transformer", "tiny", task=task, **config)
    (inputs, labels), = chains.fixed_length_batches(task, length, size, size, modulus=cfg.modulus,
                                                     num_names=cfg.num_names)
    return cfg, inputs, labels


@pytest.mark.parametrize("task", chains.TASKS)
def test_every_task_builds_and_runs_training_and_inference(task):
    cfg, inputs, labels = _batch(task)
    model = ct.build_chain_transformer(cfg)
    train_out = model(inputs, training=True)
    assert train_out["step_logits"].shape == (4, cfg.train_loops, inputs["op"].shape[1], cfg.num_classes)
    infer_out = model(inputs, training=False)
    assert "step_logits" not in infer_out
    assert infer_out["steps_used"].shape == (4,)
    loss, metrics = ct.chain_loss(labels, train_out)
    assert loss.shape == (4,) and np.isfinite(loss.numpy()).all()
    assert set(metrics) == {"token_accuracy", "exact_match", "steps_used", "halting_error"}


def test_looped_model_shares_one_block_and_baseline_stacks_distinct_ones():
    looped = tfmstep.build("chain_transformer", "tiny")
    baseline = tfmstep.build("chain_transformer", "tiny", looped=False, layers=5)
    assert len(looped.blocks) == 1 and len(baseline.blocks) == 5
    _, inputs, _ = _batch()
    assert baseline(inputs, training=False)["steps_used"].numpy().tolist() == [5.0] * 4


def test_default_and_baseline_presets_have_about_equal_parameter_counts():
    for task in chains.TASKS:
        looped = ct.count_parameters(tfmstep.get_config("chain_transformer", "default", task=task))
        baseline = ct.count_parameters(tfmstep.get_config("chain_transformer", "baseline", task=task))
        assert looped <= 1_000_000 and baseline <= 1_000_000
        assert abs(looped - baseline) / looped < 0.15, (task, looped, baseline)


def test_forced_loops_run_exactly_that_many_iterations_without_halting():
    _, inputs, _ = _batch()
    model = tfmstep.build("chain_transformer", "tiny")
    out = model(inputs, training=False, num_loops=7, use_halting=False)
    assert out["steps_used"].numpy().tolist() == [7.0] * 4


def test_halted_problems_keep_their_state_when_more_loops_are_allowed():
    """A problem that halts stops changing, however many loops the batch is allowed afterwards."""
    _, inputs, _ = _batch()
    model = tfmstep.build("chain_transformer", "tiny")
    # Force "halt after the first loop" by a large positive halting bias.
    model.halt_head.bias.assign([50.0])
    short = model(inputs, training=False, num_loops=1, use_halting=True)
    long = model(inputs, training=False, num_loops=9, use_halting=True)
    assert long["steps_used"].numpy().tolist() == [1.0] * 4
    np.testing.assert_allclose(short["logits"].numpy(), long["logits"].numpy(), atol=1e-5)


def test_unrolled_and_while_loop_inference_agree():
    _, inputs, _ = _batch()
    model = tfmstep.build("chain_transformer", "tiny")
    unrolled = model(inputs, training=False, num_loops=4, return_steps=True)
    looped = model(inputs, training=False, num_loops=4)
    np.testing.assert_allclose(unrolled["logits"].numpy(), looped["logits"].numpy(), atol=1e-4)
    np.testing.assert_array_equal(unrolled["steps_used"].numpy(), looped["steps_used"].numpy())


def test_answers_do_not_depend_on_the_order_of_shuffled_clauses():
    """Positions only enter through a relative bias: permuting a LEGO problem's clauses permutes the
    answers (up to that bias, which is zero at initialisation)."""
    _, inputs, _ = _batch(length=4)
    model = tfmstep.build("chain_transformer", "tiny")
    permutation = np.random.default_rng(0).permutation(inputs["op"].shape[1])
    permuted = {k: v[:, permutation] for k, v in inputs.items()}
    a = model(inputs, training=False, num_loops=4, use_halting=False)["logits"].numpy()
    b = model(permuted, training=False, num_loops=4, use_halting=False)["logits"].numpy()
    np.testing.assert_allclose(a[:, permutation], b, atol=1e-4)


def test_loss_supervises_only_tokens_reachable_by_each_iteration():
    cfg, inputs, labels = _batch(length=3)
    model = ct.build_chain_transformer(cfg)
    out = dict(model(inputs, training=True))
    # Make every answer perfect at the last iteration only: earlier iterations still see deep tokens
    # wrong, but those are not supervised there, so the answer loss is small only on reachable ones.
    logits = out["step_logits"].numpy()
    perfect = np.full_like(logits, -20.0)
    depth, target = labels["depth"], labels["target"]
    for t in range(logits.shape[1]):
        for b in range(logits.shape[0]):
            for n in range(logits.shape[2]):
                if depth[b, n] >= 0 and depth[b, n] <= t + 1:
                    perfect[b, t, n, target[b, n]] = 20.0
    out["step_logits"] = tf.constant(perfect)
    out["step_halt_logits"] = tf.constant(np.where(
        (depth[:, None, :] >= 0) & (depth[:, None, :] <= np.arange(1, logits.shape[1] + 1)[None, :, None]),
        20.0, -20.0).astype(np.float32))
    loss, _ = ct.chain_loss(labels, out)
    assert loss.numpy().max() < 1e-3


def test_tiny_preset_trains_through_the_shared_xla_step():
    keras.utils.set_random_seed(0)
    cfg = tfmstep.get_config("chain_transformer", "tiny", task="pointer")
    model = ct.build_chain_transformer(cfg)
    optimizer = step_lib.make_optimizer(step_lib.OptimizerConfig(learning_rate=1e-2, warmup_steps=0,
                                                                 total_steps=100))
    optimizer.build(model.trainable_variables)
    steps = step_lib.make_steps(model, optimizer, ct.chain_loss, global_batch_size=16, jit_compile=True)
    iterator = iter(ct.chain_dataset(cfg, "train", 16))
    values = steps.train(iterator, tf.constant(5))
    assert np.isfinite(values["loss"].numpy()).all()
    # Inference (a while loop with halting) compiles under XLA too.
    inputs, _ = next(iterator)
    compiled = tf.function(lambda x: model(x, training=False), jit_compile=True)
    assert compiled(inputs)["logits"].shape[0] == 16


@pytest.mark.parametrize("overrides, message", [
    (dict(train_min_len=0), "chain length must be >= 1"),
    (dict(num_names=4), "num_names=4 is too small"),
    (dict(train_loops=2), "train_loops=2 is fewer than train_max_len=3"),
    (dict(looped=False, layers=2), "layers=2 is fewer than train_max_len=3"),
    (dict(width=15), "divisible by heads"),
    (dict(task="sudoku"), "unknown chain task"),
])
def test_bad_config_gives_a_clear_error(overrides, message):
    with pytest.raises(UserError, match=message):
        tfmstep.get_config("chain_transformer", "tiny", **overrides)


def test_command_line_overrides_are_coerced():
    cfg = tfmstep.get_config("chain_transformer", "tiny", task="kinship", looped="false", layers="4")
    assert cfg.task == "kinship" and cfg.looped is False and cfg.layers == 4


def test_evaluation_writes_json_png_and_table_for_a_trained_run(tmp_path):
    from tfmstep import trainer

    workdir = str(tmp_path / "run")
    trainer.train("chain_transformer", workdir, preset="tiny",
                  config=trainer.TrainConfig(steps=4, batch_size=8, steps_per_call=2, eval_every=0,
                                             checkpoint_every=4, log_every=2, jit_compile=False))
    report = evaluate_chains.run([workdir], ["looped"], str(tmp_path / "out"), "t", max_length_factor=1,
                                 examples=6, batch_size=4)
    with open(tmp_path / "out" / "t.json") as f:
        saved = json.load(f)
    rows = saved["runs"]["looped"]["per_length"]
    assert [r["length"] for r in rows] == [1, 2, 3]  # 1 x train_max_len=3
    assert all(0.0 <= r["exact_match"] <= r["token_accuracy"] + 1e-9 or r["exact_match"] == 0.0 for r in rows)
    assert all("forced_exact_match" in r for r in rows)
    assert os.path.getsize(tmp_path / "out" / "t.png") > 1000
    table = evaluate_chains.format_table(report)
    assert "looped" in table and "2x-loops exact" in table
