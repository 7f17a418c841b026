"""Image classification data: TFDS (cifar10, mnist, ...) when prepared locally, else real images that
ship inside scikit-learn (the 8x8 handwritten digits), or a user's own .npz file."""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf
from absl import logging

from tfmstep.data.common import shuffled_index_stream
from tfmstep.errors import UserError

OFFLINE_DATASET = "digits"
_cache: dict = {}


def load_arrays(dataset: str, data_file: str = "") -> dict:
    """{"train": (images uint8 [N,H,W,C], labels int64 [N]), "test": (...)} held in memory.

    ``dataset``: "digits" (offline, scikit-learn), a TFDS name such as "cifar10" or "mnist", or "npz"
    with ``data_file`` holding x_train, y_train, x_test, y_test. A TFDS name that is not prepared
    locally falls back to digits with a warning, so the default job never needs the network.
    """
    key = (dataset, data_file)
    if key not in _cache:
        _cache[key] = _load_uncached(dataset, data_file)
    return _cache[key]


def _load_uncached(dataset: str, data_file: str) -> dict:
    if dataset == "npz":
        return _load_npz(data_file)
    if dataset == OFFLINE_DATASET:
        return _load_digits()
    try:
        import tensorflow_datasets as tfds

        splits = {}
        for split in ("train", "test"):
            # download=False: never reach for the network from a default job.
            ds = tfds.load(dataset, split=split, as_supervised=True, download=False, batch_size=-1)
            images, labels = tfds.as_numpy(ds)
            splits[split] = (images.astype(np.uint8), labels.astype(np.int64))
        logging.info("Using TFDS dataset %s (%d train images).", dataset, len(splits["train"][1]))
        return splits
    except Exception as e:  # not prepared locally, unknown name, no network...
        logging.warning("TFDS dataset %r is not available locally (%s: %s); falling back to the "
                        "offline scikit-learn digits images.", dataset, type(e).__name__,
                        str(e).splitlines()[0] if str(e) else "")
        return _load_digits()


def _load_digits() -> dict:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)[..., None]  # [1797, 8, 8, 1]
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(labels))  # fixed split: seed 0, 80/20
    cut = int(0.8 * len(labels))
    return {"train": (images[order[:cut]], labels[order[:cut]]),
            "test": (images[order[cut:]], labels[order[cut:]])}


def _load_npz(path: str) -> dict:
    if not path:
        raise UserError("dataset='npz' needs data_file=<path to .npz with x_train, y_train, x_test, "
                        "y_test>")
    if not os.path.exists(path):
        raise UserError(f"data file not found: {path}")
    try:
        with np.load(path) as data:
            arrays = {s: (np.asarray(data[f"x_{s}"]), np.asarray(data[f"y_{s}"]).astype(np.int64))
                      for s in ("train", "test")}
    except (KeyError, ValueError, OSError) as e:
        raise UserError(f"cannot read image data file {path}: {e}") from None
    for split, (x, y) in arrays.items():
        if x.ndim == 3:
            arrays[split] = (x[..., None], y)
        if arrays[split][0].ndim != 4 or len(arrays[split][0]) != len(y):
            raise UserError(f"{path}: x_{split} must be [N,H,W] or [N,H,W,C] with N = len(y_{split})")
    return arrays


def make_dataset(images: np.ndarray, labels: np.ndarray, image_shape, split: str, batch_size: int,
                 seed: int, start_batch: int, augment: bool) -> tf.data.Dataset:
    """Batches of (float images in [0, 1] resized to ``image_shape``, int labels)."""
    height, width, channels = image_shape

    def prepare(image):
        image = tf.image.convert_image_dtype(image, tf.float32)
        if image.shape[-1] != channels:
            image = (tf.image.grayscale_to_rgb(image) if channels == 3 else tf.image.rgb_to_grayscale(image))
        if image.shape[0] != height or image.shape[1] != width:
            image = tf.image.resize(image, (height, width))
        return image

    images_t = tf.constant(images)
    labels_t = tf.constant(labels)
    if split == "train":
        indices = shuffled_index_stream(len(labels), seed, start_batch * batch_size)
        ds = indices.batch(batch_size, drop_remainder=True)
    else:
        ds = tf.data.Dataset.range(len(labels)).batch(batch_size)

    def gather(idx):
        batch = tf.map_fn(prepare, tf.gather(images_t, idx), fn_output_signature=tf.float32)
        if augment and split == "train":
            # Stateless flips/shifts keyed by example index: identical after a resume.
            batch = _augment(batch, idx, seed)
        return batch, tf.gather(labels_t, idx)

    return ds.map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(2)


def _augment(batch, idx, seed):
    def one(args):
        image, i = args
        s = tf.stack([tf.cast(seed, tf.int64) + 7919, i])
        image = tf.image.stateless_random_flip_left_right(image, s)
        pad = 4 if image.shape[0] >= 16 else 1
        padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
        return tf.image.stateless_random_crop(padded, tf.shape(image), s + 1)

    return tf.map_fn(one, (batch, idx), fn_output_signature=tf.float32)
