"""Text for language modelling: a local file or directory, TFDS ``tiny_shakespeare`` when prepared
locally, and offline the Python standard library's own source (real text on every machine).

Tokens are bytes (0..255) by default. The split is fixed: the last ``validation_fraction`` of the token
stream is validation, the rest is train.
"""

from __future__ import annotations

import os
import sysconfig

import numpy as np
import tensorflow as tf
from absl import logging

from tfmstep.data.common import example_seeds
from tfmstep.errors import UserError

BYTE_VOCAB_SIZE = 256
STDLIB_CORPUS = "python_stdlib"
_cache: dict = {}


def stdlib_source_files() -> list:
    """The top-level .py files of this interpreter's standard library, sorted by name."""
    stdlib = sysconfig.get_paths()["stdlib"]
    return sorted(os.path.join(stdlib, name) for name in os.listdir(stdlib) if name.endswith(".py"))


def _read_paths(paths: list, max_bytes: int) -> bytes:
    chunks, total = [], 0
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        chunks.append(data)
        total += len(data)
        if max_bytes and total >= max_bytes:
            break
    text = b"\n".join(chunks)
    return text[:max_bytes] if max_bytes else text


def load_corpus(corpus: str, text_file: str = "", max_bytes: int = 0) -> bytes:
    """Raw bytes of the corpus; logs which corpus is used and any fallback."""
    key = (corpus, text_file, max_bytes)
    if key in _cache:
        return _cache[key]
    if text_file:
        if not os.path.exists(text_file):
            raise UserError(f"text file not found: {text_file}")
        if os.path.isdir(text_file):
            paths = sorted(os.path.join(root, name) for root, _, names in os.walk(text_file)
                           for name in names if not name.startswith("."))
            if not paths:
                raise UserError(f"text directory {text_file} has no files")
        else:
            paths = [text_file]
        data = _read_paths(paths, max_bytes)
        logging.info("Corpus: %s (%d bytes).", text_file, len(data))
    elif corpus == STDLIB_CORPUS:
        data = _read_paths(stdlib_source_files(), max_bytes)
        logging.info("Corpus: Python %s standard library sources, sorted by file name (%d bytes).",
                     sysconfig.get_python_version(), len(data))
    else:
        try:
            import tensorflow_datasets as tfds

            ds = tfds.load(corpus, split="train", download=False)
            data = b"".join(x["text"] for x in tfds.as_numpy(ds))
            data = data[:max_bytes] if max_bytes else data
            logging.info("Corpus: TFDS %s (%d bytes).", corpus, len(data))
        except Exception as e:  # not prepared locally / no network
            logging.warning("TFDS corpus %r is not available locally (%s); falling back to the offline "
                            "Python standard library sources.", corpus, type(e).__name__)
            data = _read_paths(stdlib_source_files(), max_bytes)
    if len(data) < 1000:
        raise UserError(f"corpus has only {len(data)} bytes; a language model needs more text")
    _cache[key] = data
    return data


def split_tokens(tokens: np.ndarray, validation_fraction: float) -> dict:
    cut = int(len(tokens) * (1.0 - validation_fraction))
    return {"train": tokens[:cut], "validation": tokens[cut:]}


def byte_tokens(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32)


def window_dataset(tokens: np.ndarray, split: str, seq_len: int, batch_size: int, seed: int,
                   start_batch: int) -> tf.data.Dataset:
    """(inputs [B, seq_len], next-token labels [B, seq_len]).

    Train: windows at stateless random offsets keyed by (seed, example index), infinite.
    Validation: consecutive non-overlapping windows, in order, finite.
    """
    if len(tokens) < seq_len + 2:
        raise UserError(f"{split} split has {len(tokens)} tokens, fewer than seq_len + 2 = {seq_len + 2}")
    tokens_t = tf.constant(tokens, tf.int32)
    span = seq_len + 1
    if split == "train":
        max_start = len(tokens) - span

        def window(seed_pair):
            start = tf.random.stateless_uniform([], seed_pair, maxval=max_start + 1, dtype=tf.int64)
            return tokens_t[start:start + span]

        ds = example_seeds(seed, start_batch * batch_size).map(window).batch(batch_size, drop_remainder=True)
    else:
        starts = tf.range(0, len(tokens) - span + 1, seq_len, dtype=tf.int64)
        ds = tf.data.Dataset.from_tensor_slices(starts).map(lambda s: tokens_t[s:s + span]).batch(batch_size)
    return ds.map(lambda w: (w[:, :-1], w[:, 1:]), num_parallel_calls=tf.data.AUTOTUNE,
                  deterministic=True).prefetch(2)
