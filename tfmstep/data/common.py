"""Helpers shared by the input pipelines: the indexed streams that make resume exact, TFDS loading that
never downloads."""

from __future__ import annotations

import difflib

import tensorflow as tf

from tfmstep.errors import UserError

_EPOCHS_FOREVER = 2**40


def shuffled_index_stream(num_examples: int, seed: int, start_example: int = 0) -> tf.data.Dataset:
    """Infinite stream of example indices, reshuffled every epoch, starting at ``start_example``.

    Epoch ``e`` is a stateless permutation seeded by ``(seed, e)``, so the stream's state is just the
    position: resuming at position p gives exactly the indices an uninterrupted run sees from p on,
    without a shuffle buffer in the checkpoint.
    """
    if num_examples < 1:
        raise UserError("cannot stream an empty dataset (0 examples)")
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


# --- TFDS, never downloading -----------------------------------------------------------------------------

class NotAvailableLocally(Exception):
    """A known TFDS dataset that is not prepared on this machine (or TFDS is not installed): callers fall
    back to their offline data and say so."""


def load_tfds(name: str, **kwargs):
    """``tfds.load(name, download=False, **kwargs)``.

    A name TFDS does not know is bad input (``UserError`` with the closest names), not a reason to fall
    back silently; a known dataset that is not prepared locally raises ``NotAvailableLocally``. Any other
    error is a real failure and propagates.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise NotAvailableLocally(f"tensorflow_datasets is not installed ({e})") from None
    not_found = getattr(tfds.core, "DatasetNotFoundError", None)
    try:
        return tfds.load(name, download=False, **kwargs)
    except AssertionError as e:  # "Dataset x: could not find data in ~/tensorflow_datasets ..."
        raise NotAvailableLocally(str(e).splitlines()[0] if str(e) else "not prepared") from None
    except Exception as e:
        if not_found is None or not isinstance(e, not_found):
            raise
        try:
            close = difflib.get_close_matches(name, tfds.list_builders(), n=3)
        except Exception:  # the list is a convenience only
            close = []
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UserError(f"unknown TFDS dataset {name!r}{hint}") from None
