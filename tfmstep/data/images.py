"""Image classification data: TFDS (cifar10, mnist, ...) when prepared locally, else real images that
ship inside scikit-learn (the 8x8 handwritten digits), or a user's own .npz file."""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf
from absl import logging

from tfmstep.data.common import (NotAvailableLocally, fall_back, fallback_allowed, load_tfds, record_used,
                                 shuffled_index_stream, used_instead_of)
from tfmstep.errors import UserError

OFFLINE_DATASET = "digits"
_cache: dict = {}


def load_arrays(dataset: str, data_file: str = "") -> dict:
    """{"train": (images uint8 [N,H,W,C], labels int64 [N]), "test": (...)} held in memory.

    ``dataset``: "digits" (offline, scikit-learn), a TFDS name such as "cifar10" or "mnist", or "npz"
    with ``data_file`` holding x_train, y_train, x_test, y_test. A TFDS name that is not prepared
    locally falls back to digits with a warning, so the default job never needs the network; a name TFDS
    does not know is an error. Arrays that would train wrongly (empty, negative labels, float pixels
    outside [0, 1], ...) are refused with one line naming the file and the field.
    """
    key = (dataset, data_file, fallback_allowed())
    if key not in _cache:
        arrays = _load_uncached(dataset, data_file)
        _cache[key] = arrays, used_instead_of(dataset)
    arrays, used = _cache[key]
    record_used(dataset, used)  # metrics.json names the data actually read
    return arrays


def _load_uncached(dataset: str, data_file: str) -> dict:
    if dataset == "npz":
        return _load_npz(data_file)
    if dataset == OFFLINE_DATASET:
        return _load_digits()
    try:
        splits = {}
        for split in ("train", "test"):
            # never downloads: a default job does not reach for the network
            ds = load_tfds(dataset, split=split, as_supervised=True, batch_size=-1)
            images, labels = _as_numpy(ds)
            splits[split] = (images.astype(np.uint8), labels.astype(np.int64))
    except NotAvailableLocally as e:
        fall_back(dataset, f"{OFFLINE_DATASET} (the offline scikit-learn digits images)", e)
        return _load_digits()
    except UserError:
        raise
    except (ValueError, TypeError) as e:  # not (image, label) pairs
        raise UserError(f"TFDS dataset {dataset!r} does not hold (image, label) pairs an image "
                        f"classifier can read: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                        ) from None
    logging.info("Using TFDS dataset %s (%d train images).", dataset, len(splits["train"][1]))
    return _checked(f"TFDS dataset {dataset!r}", splits)


def _as_numpy(ds):
    import tensorflow_datasets as tfds  # only reached after load_tfds imported it

    return tfds.as_numpy(ds)


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
            arrays = {s: (np.asarray(data[f"x_{s}"]), np.asarray(data[f"y_{s}"])) for s in ("train", "test")}
    except KeyError as e:
        raise UserError(f"cannot read image data file {path}: no array {e} (it needs x_train, y_train, "
                        f"x_test, y_test)") from None
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"cannot read image data file {path}: {e}") from None
    return _checked(path, arrays)


def _checked(source: str, arrays: dict) -> dict:
    """Arrays that make_dataset reads as meant: [N,H,W,C] uint8 (or float in [0, 1]) images, N integer
    labels >= 0, N >= 1. Anything else is one UserError naming ``source``, the field and the value."""
    out = {}
    for split, (x, y) in arrays.items():
        x, y = np.asarray(x), np.asarray(y)
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4:
            raise UserError(f"{source}: x_{split} has shape {x.shape}; it must be [N,H,W] or [N,H,W,C]")
        if y.ndim != 1 or len(y) != len(x):
            raise UserError(f"{source}: y_{split} has shape {y.shape}; it must be [N] with N = "
                            f"len(x_{split}) = {len(x)}")
        if len(y) == 0:
            raise UserError(f"{source}: x_{split}/y_{split} are empty (0 examples)")
        if min(x.shape[1:]) < 1:
            raise UserError(f"{source}: x_{split} images have shape {x.shape[1:]}; every dimension must "
                            f"be >= 1")
        if not (np.issubdtype(y.dtype, np.integer) or (np.issubdtype(y.dtype, np.floating)
                                                       and np.all(np.mod(y, 1) == 0))):
            raise UserError(f"{source}: y_{split} must hold integer class ids, got dtype {y.dtype}")
        y = y.astype(np.int64)
        if y.min() < 0:
            index = int(np.argmin(y))
            raise UserError(f"{source}: y_{split}[{index}] = {y[index]}; class ids must be 0..num_classes-1")
        if np.issubdtype(x.dtype, np.floating):
            low, high = float(np.min(x)), float(np.max(x))
            if not (np.isfinite(low) and np.isfinite(high)) or low < 0.0 or high > 1.0:
                raise UserError(f"{source}: x_{split} is {x.dtype} with values in [{low:g}, {high:g}]; float "
                                f"images must be in [0, 1] (or store uint8 0..255)")
        elif x.dtype != np.uint8:
            if not np.issubdtype(x.dtype, np.integer) or x.min() < 0 or x.max() > 255:
                raise UserError(f"{source}: x_{split} has dtype {x.dtype}"
                                + (f" with values in [{x.min()}, {x.max()}]"
                                   if np.issubdtype(x.dtype, np.integer) else "")
                                + "; images must be uint8 0..255 or float in [0, 1]")
            x = x.astype(np.uint8)  # integer pixels 0..255 in a wider type: the same image
        out[split] = (x, y)
    return out


# Channel counts make_dataset converts between (grayscale <-> RGB); equal counts need no conversion.
_CONVERTIBLE_CHANNELS = {(1, 3), (3, 1)}


def validate_config(config) -> None:
    """The images and labels of ``config`` (a CNN config: dataset, data_file, image_shape, num_classes)
    checked against it before anything is trained: num_classes >= 1 and above every label, no class range
    that is mostly empty (labels 50..59 would silently train a 60-way head), image channels the pipeline
    can convert. One UserError line naming the file, the field and the value."""
    if config.num_classes is not None and config.num_classes < 1:
        raise UserError(f"num_classes must be >= 1 (or unset to take the dataset's), got "
                        f"{config.num_classes}")
    arrays = load_arrays(config.dataset, config.data_file)
    source = config.data_file if config.dataset == "npz" else f"dataset {config.dataset!r}"
    train_labels = arrays["train"][1]
    if config.num_classes is not None:
        for split, (_, labels) in arrays.items():
            index = int(np.argmax(labels))
            if labels[index] >= config.num_classes:
                raise UserError(f"{source}: y_{split}[{index}] = {labels[index]} but num_classes="
                                f"{config.num_classes}; class ids must be 0..{config.num_classes - 1} "
                                f"(raise num_classes or unset it to take the dataset's)")
    else:
        classes = int(train_labels.max()) + 1
        test_labels = arrays["test"][1]
        if test_labels.max() >= classes:
            index = int(np.argmax(test_labels))
            raise UserError(f"{source}: y_test[{index}] = {test_labels[index]} is above every y_train label "
                            f"(max {classes - 1}); set num_classes to cover it")
        present = np.unique(train_labels)
        if 2 * len(present) < classes:
            raise UserError(f"{source}: y_train holds {len(present)} classes with ids {present.min()}.."
                            f"{present.max()}, so the head would have {classes} outputs, "
                            f"{classes - len(present)} of them for classes with no example; relabel to "
                            f"0..{len(present) - 1}, or set num_classes={classes} if those classes exist")
    if config.image_shape is not None:
        channels = int(config.image_shape[-1])
        for split, (images, _) in arrays.items():
            have = int(images.shape[-1])
            if have != channels and (have, channels) not in _CONVERTIBLE_CHANNELS:
                raise UserError(f"{source}: x_{split} images have {have} channel(s) but image_shape="
                                f"{tuple(config.image_shape)} asks for {channels}; only 1 <-> 3 channels "
                                f"are converted")


def make_dataset(images: np.ndarray, labels: np.ndarray, image_shape, split: str, batch_size: int,
                 seed: int, start_batch: int, augment: bool, flip: bool = True,
                 shift: int = 0) -> tf.data.Dataset:
    """Batches of (float images in [0, 1] resized to ``image_shape``, int labels); train batches
    augmented (``augment_batch``) when ``augment``, mirrored too when ``flip``, shifted by up to ``shift`` px."""
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
        first = start_batch * batch_size
        indices = shuffled_index_stream(len(labels), seed, first)
        # Each example's position in the stream (not its index in the dataset) keys its augmentation:
        # a new flip/crop every epoch, and the same one after a resume at that position.
        positions = tf.data.Dataset.range(first, 2**62)
        ds = tf.data.Dataset.zip((positions, indices)).batch(batch_size, drop_remainder=True)
    else:
        ds = tf.data.Dataset.range(len(labels)).batch(batch_size)
        ds = ds.map(lambda idx: (tf.zeros_like(idx), idx))

    def gather(positions, idx):
        batch = tf.map_fn(prepare, tf.gather(images_t, idx), fn_output_signature=tf.float32)
        if augment and split == "train":
            batch = augment_batch(batch, positions, seed, flip, shift)
        return batch, tf.gather(labels_t, idx)

    return ds.map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(2)


def augment_batch(batch, positions, seed, flip: bool = True, shift: int = 0):
    """Random horizontal flip and pad-and-crop (reflect padding of ``shift`` px; 0: 4 px, 1 px below 16 px
    images) of a batch
    [B, H, W, C], each image drawn from the stateless seed (seed, its stream position): a function of
    the position only, so it differs every epoch and is identical after a resume."""
    height, width = batch.shape[1], batch.shape[2]
    pad = shift or (4 if height >= 16 else 1)

    def draws(position):
        s = tf.stack([tf.cast(seed, tf.int64) + 7919, position])
        return tf.random.stateless_uniform([3], s, dtype=tf.float32)

    u = tf.map_fn(draws, positions, fn_output_signature=tf.float32)  # [B, 3]: flip, dy, dx
    if flip:
        batch = tf.where((u[:, 0] < 0.5)[:, None, None, None], tf.reverse(batch, axis=[2]), batch)
    padded = tf.pad(batch, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
    offsets = tf.cast(tf.floor(u[:, 1:] * (2 * pad + 1)), tf.int32)  # [B, 2] in 0..2*pad
    rows = offsets[:, :1] + tf.range(height)[None]  # [B, H]
    cols = offsets[:, 1:] + tf.range(width)[None]  # [B, W]
    batch = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(batch, cols, axis=2, batch_dims=1)
