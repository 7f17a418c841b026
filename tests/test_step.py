"""The shared step: XLA on/off agree, MirroredStrategy matches one device, XLA pre-flight errors."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfmstep
from tfmstep import step as step_lib

BATCH = 16


def _run(strategy, jit_compile, clip_norm, num_steps=4):
    keras.utils.set_random_seed(1)
    spec = tfmstep.get_spec("cnn_classifier")
    # GroupNorm: BatchNorm's batch statistics are per replica by design, so they would differ.
    config = tfmstep.get_config("cnn_classifier", "tiny", norm="group", groups=2, filters=(4, 8),
                                dropout=0.0)
    with strategy.scope():
        model = spec.build(config)
        optimizer = step_lib.make_optimizer(step_lib.OptimizerConfig(
            learning_rate=1e-2, warmup_steps=0, total_steps=num_steps))
        optimizer.build(model.trainable_variables)
    steps = step_lib.make_steps(model, optimizer, spec.loss, global_batch_size=BATCH, strategy=strategy,
                                jit_compile=jit_compile, clip_norm=clip_norm)
    dataset = spec.dataset(config, "train", BATCH, seed=0)
    iterator = iter(strategy.experimental_distribute_dataset(dataset))
    history = steps.train(iterator, tf.constant(num_steps))
    return history, [v.numpy() for v in model.trainable_variables]


def test_xla_and_plain_step_give_the_same_training():
    default = tf.distribute.get_strategy()
    xla_history, xla_weights = _run(default, jit_compile=True, clip_norm=1.0)
    plain_history, plain_weights = _run(default, jit_compile=False, clip_norm=1.0)
    np.testing.assert_allclose(xla_history["loss"], plain_history["loss"], rtol=1e-4)
    for a, b in zip(xla_weights, plain_weights):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


# XLA cannot run one replica's cluster on a second *logical* CPU device (TF's "variable on a different
# device" known issue), so replicas here run the plain step; XLA == plain is checked above.
@pytest.mark.parametrize("clip_norm", [0.0, 0.05])  # 0.05 clips every step: global-norm clipping
def test_mirrored_strategy_on_two_devices_matches_one_device(clip_norm):
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
    assert len(devices) == 2, "conftest configures two logical CPUs"
    mirrored = tf.distribute.MirroredStrategy(devices)
    assert mirrored.num_replicas_in_sync == 2
    one_history, one_weights = _run(tf.distribute.get_strategy(), jit_compile=False, clip_norm=clip_norm)
    two_history, two_weights = _run(mirrored, jit_compile=False, clip_norm=clip_norm)
    np.testing.assert_allclose(two_history["loss"], one_history["loss"], rtol=1e-5)
    np.testing.assert_allclose(two_history["accuracy"], one_history["accuracy"], rtol=1e-6)
    for a, b in zip(one_weights, two_weights):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_warmup_then_cosine_schedule():
    optimizer = step_lib.make_optimizer(step_lib.OptimizerConfig(learning_rate=1.0, warmup_steps=10,
                                                                 total_steps=110))
    schedule = optimizer._learning_rate  # the Keras schedule object
    assert float(schedule(0)) == pytest.approx(0.0)
    assert float(schedule(5)) == pytest.approx(0.5)
    assert float(schedule(10)) == pytest.approx(1.0)
    assert float(schedule(60)) == pytest.approx(0.5, abs=1e-3)
    assert float(schedule(110)) == pytest.approx(0.0, abs=1e-6)


def test_cosine_decays_to_the_minimum_learning_rate_ratio():
    schedule = step_lib.make_optimizer(step_lib.OptimizerConfig(
        learning_rate=2.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.25))._learning_rate
    assert float(schedule(10)) == pytest.approx(2.0)
    assert float(schedule(60)) == pytest.approx(2.0 * (0.25 + 0.75 * 0.5), abs=1e-3)
    assert float(schedule(110)) == pytest.approx(0.5, abs=1e-6)


def test_cooldown_falls_linearly_to_zero_from_the_cosine_floor_and_round_trips():
    optimizer = step_lib.make_optimizer(step_lib.OptimizerConfig(
        learning_rate=2.0, warmup_steps=0, total_steps=100, min_lr_ratio=1.0, cooldown_steps=20))
    schedule = optimizer._learning_rate
    assert float(schedule(50)) == pytest.approx(2.0)
    assert float(schedule(80)) == pytest.approx(2.0)
    assert float(schedule(90)) == pytest.approx(1.0)
    assert float(schedule(100)) == pytest.approx(0.0)
    assert float(schedule(120)) == pytest.approx(0.0)  # past the end: stays at 0, never negative
    again = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(schedule))
    assert float(again(90)) == pytest.approx(1.0)


class _NotXlaCompilable(keras.layers.Layer):
    def call(self, x):
        # String ops have no XLA kernel.
        as_text = tf.strings.as_string(x)
        return x + tf.cast(tf.strings.length(as_text), x.dtype) * 0.0


def test_xla_preflight_names_the_failing_op_and_the_way_out():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2)(_NotXlaCompilable()(inputs)))
    optimizer = step_lib.make_optimizer(step_lib.OptimizerConfig())
    optimizer.build(model.trainable_variables)
    loss = lambda y, logits: (tf.reduce_mean(tf.square(logits), -1), {})  # noqa: E731
    steps = step_lib.make_steps(model, optimizer, loss, global_batch_size=4, jit_compile=True)
    with pytest.raises(tfmstep.UserError, match=r"XLA cannot compile.*AsString.*--nojit_compile"):
        step_lib.preflight_xla(steps, tf.ones((4, 3)), tf.zeros((4,)), "toy")


def test_optimizer_config_has_no_clip_norm_clipping_is_the_steps():
    """Clipping lives in make_steps (it must see the all-reduced gradient); a second, unread clip_norm on
    the optimizer's config would only let the two disagree."""
    import dataclasses

    assert "clip_norm" not in {f.name for f in dataclasses.fields(step_lib.OptimizerConfig)}
    with pytest.raises(TypeError):
        step_lib.OptimizerConfig(clip_norm=1.0)


def _linear_step(optimizer, clip_norm, scale_grads=1.0):
    """One step of a 2-weight linear model whose gradient norm (~50) is far above ``clip_norm``."""
    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")(inputs))
    optimizer.build(model.trainable_variables)
    loss = lambda y, out: (tf.square(out[:, 0] - y), {})  # noqa: E731
    data = tf.data.Dataset.from_tensors((tf.constant([[3.0, 4.0]] * 4), tf.constant([10.0] * 4))).repeat()
    steps = step_lib.make_steps(model, optimizer, loss, global_batch_size=4, clip_norm=clip_norm)
    steps.train(iter(data), tf.constant(1))
    return model.trainable_variables[0].numpy()


def test_loss_scaling_clips_the_true_gradient_not_the_scaled_one():
    # float16's loss scale (2^15) multiplies the gradients the step clips; clipping must still act on
    # the gradient itself, or the update would be 2^15 times too small.
    plain = _linear_step(keras.optimizers.SGD(1.0), clip_norm=1.0)
    scaled = _linear_step(keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(1.0)), clip_norm=1.0)
    np.testing.assert_allclose(np.linalg.norm(plain), 1.0, rtol=1e-5)  # clipped to norm 1
    np.testing.assert_allclose(scaled, plain, rtol=1e-5)


def test_set_precision_moves_the_following_layers_and_keeps_pinned_ones_and_weights():
    model = tfmstep.build("cnn_classifier", "tiny")
    weights = [v.numpy() for v in model.variables]
    step_lib.set_precision(model, "mixed_bfloat16")
    assert model.get_layer("logits").compute_dtype == "float32"  # pinned by the family
    assert {layer.compute_dtype for layer in model.layers if layer.name != "logits"} == {"bfloat16"}
    assert model(tf.zeros((1, 8, 8, 1))).dtype == tf.float32
    step_lib.set_precision(model, "")
    assert {layer.compute_dtype for layer in model.layers} == {"float32"}
    for a, v in zip(weights, model.variables):
        np.testing.assert_array_equal(a, v.numpy())
    with pytest.raises(tfmstep.UserError, match="unknown precision"):
        step_lib.set_precision(model, "float8")
