"""Helpers shared by the input pipelines: the indexed streams that make resume exact, TFDS loading that
never downloads."""

from __future__ import annotations

import contextlib
import difflib

import tensorflow as tf
from absl import logging

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


# --- which data a run uses; falling back to offline data only when asked --------------------------------

_policy = {"allow_fallback": True}  # library calls outside a run keep the warn-and-fall-back behaviour
_used: dict = {}  # requested dataset -> the dataset actually read, since the last data_policy()


@contextlib.contextmanager
def data_policy(allow_fallback: bool):
    """Within (a training run): a requested dataset that is not prepared locally is an error unless
    ``allow_fallback``; yields the record {requested: actually used} of every dataset read."""
    previous = dict(_policy)
    _policy["allow_fallback"] = allow_fallback
    _used.clear()
    try:
        yield _used
    finally:
        _policy.update(previous)


def fallback_allowed() -> bool:
    return _policy["allow_fallback"]


def record_used(requested: str, actual: str) -> None:
    _used[requested] = actual


def data_read() -> dict:
    """{requested dataset: the dataset actually read} since the last ``data_policy``."""
    return dict(_used)


def used_instead_of(requested: str) -> str:
    """What was read for ``requested`` (itself, unless it fell back)."""
    return _used.get(requested, requested)


def fall_back(requested: str, offline: str, reason) -> None:
    """A pipeline is about to read ``offline`` data instead of ``requested`` (not prepared locally):
    an error unless the run allows it (``--allow_fallback``); then a warning and the record says so."""
    if not _policy["allow_fallback"]:
        raise UserError(f"dataset {requested!r} is not available on this machine ({reason}); prepare it "
                        f"with TFDS (tfds build {requested}), or pass --allow_fallback to train on {offline} "
                        f"instead")
    logging.warning("dataset %r is not available locally (%s); FALLING BACK to %s (--allow_fallback).",
                    requested, reason, offline)
    record_used(requested, offline)


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
