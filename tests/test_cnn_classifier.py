"""The CNN family's own layers: the fused BatchNorm is Keras' BatchNormalization, computed faster."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfmstep.models.cnn_classifier import BatchNormalization as FusedBatchNormalization


def _pair(shape):
    keras_norm, fused = keras.layers.BatchNormalization(), FusedBatchNormalization()
    keras_norm.build(shape)
    fused.build(shape)
    weights = [w + 0.1 * (i + 1) for i, w in enumerate(keras_norm.get_weights())]  # not the trivial init
    keras_norm.set_weights(weights)
    fused.set_weights(weights)
    return keras_norm, fused


def test_fused_batch_norm_matches_keras_outputs_gradients_and_moving_statistics():
    rng = np.random.default_rng(0)
    images = tf.constant(rng.normal(2.0, 3.0, size=(8, 6, 6, 5)), tf.float32)
    weights = tf.constant(rng.normal(size=(8, 6, 6, 5)), tf.float32)  # a loss whose gradients are not ~0
    keras_norm, fused = _pair(images.shape)
    for training in (True, False, True):
        grads = []
        for layer in (keras_norm, fused):
            with tf.GradientTape() as tape:
                tape.watch(images)
                out = layer(images, training=training)
                loss = tf.reduce_sum(out * weights)
            grads.append(tape.gradient(loss, [images] + layer.trainable_weights))
        np.testing.assert_allclose(fused(images, training=False), keras_norm(images, training=False),
                                   atol=1e-5)
        for a, b in zip(*grads):
            np.testing.assert_allclose(a, b, atol=1e-4)
        for a, b in zip(keras_norm.get_weights(), fused.get_weights()):
            np.testing.assert_allclose(a, b, rtol=1e-6)


def test_fused_batch_norm_keeps_bfloat16_activations_and_float32_statistics():
    fused = FusedBatchNormalization(dtype="mixed_bfloat16")
    images = tf.random.normal([4, 3, 3, 2])
    out = fused(images, training=True)
    assert out.dtype == tf.bfloat16 and fused.moving_variance.dtype == tf.float32


@pytest.mark.parametrize("shape", [(4, 7), (2, 3, 5)])
def test_fused_batch_norm_falls_back_to_keras_where_the_fused_kernel_does_not_apply(shape):
    keras_norm, fused = _pair(shape)
    x = tf.random.normal(shape)
    np.testing.assert_allclose(fused(x, training=True), keras_norm(x, training=True), atol=1e-6)


def test_mirror_average_answers_the_mean_of_each_image_and_its_mirror():
    import tfmstep

    plain = tfmstep.build("cnn_classifier", "tiny", image_shape=(8, 8, 3), num_classes=4)
    mirrored = tfmstep.build("cnn_classifier", "tiny", image_shape=(8, 8, 3), num_classes=4,
                             mirror_average=True)
    mirrored.set_weights(plain.get_weights())  # the two layers it adds have no weights
    images = tf.random.uniform([5, 8, 8, 3])
    expected = 0.5 * (plain(images, training=False) + plain(tf.reverse(images, axis=[2]), training=False))
    np.testing.assert_allclose(mirrored(images, training=False), expected, atol=1e-5)
    np.testing.assert_allclose(mirrored(images, training=True), plain(images, training=True), atol=1e-5)
