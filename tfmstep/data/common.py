"""Helpers shared by the input pipelines."""

from __future__ import annotations

import tensorflow as tf

_EPOCHS_FOREVER = 2**40


def shuffled_index_stream(num_examples: int, seed: int, start_example: int = 0) -> tf.data.Dataset:
    """Infinite stream of example indices, reshuffled every epoch, starting at ``start_example``.

    Epoch ``e`` is a stateless permutation seeded by ``(seed, e)``, so the stream's state is just the
    position: resuming at position p gives exactly the indices an uninterrupted run sees from p on,
    without a shuffle buffer in the checkpoint.
    """
    if num_examples < 1:
        raise ValueError("cannot stream an empty dataset")
    start_epoch, offset = divmod(int(start_example), num_examples)

    def epoch_permutation(epoch):
        return tf.data.Dataset.from_tensor_slices(tf.random.experimental.stateless_shuffle(
            tf.range(num_examples, dtype=tf.int64), seed=tf.stack([tf.cast(seed, tf.int64), epoch])))

    stream = tf.data.Dataset.range(start_epoch, _EPOCHS_FOREVER).flat_map(epoch_permutation)
    return stream.skip(offset)


def example_seeds(seed: int, start_example: int = 0) -> tf.data.Dataset:
    """Infinite stream of per-example stateless seeds ``[seed, k]`` for generated data, from ``start``."""
    return tf.data.Dataset.range(int(start_example), _EPOCHS_FOREVER * 1000).map(
        lambda k: tf.stack([tf.constant(seed, tf.int64), k]))
