"""Text for language modelling: a local file or directory, TFDS ``tiny_shakespeare`` when prepared
locally, and offline the Python standard library's own source (real text on every machine).

Corpus ``python_stdlib``: the top-level ``*.py`` files of the running interpreter's standard library
(``sysconfig.get_paths()["stdlib"]``, not its subpackages), sorted by file name, joined with a newline and
cut at ``max_bytes``.

Split (fixed): the corpus bytes are cut at the first newline at or after ``1 - validation_fraction`` of
them; everything before is train, the rest validation. Both tokenizers see the same bytes, so their
bits per byte are comparable.

Tokens are bytes (0..255) by default. ``tokenizer="sentencepiece"`` uses a keras-hub
``SentencePieceTokenizer`` whose vocabulary is trained on the train split once and written to
``vocab_file``: that file is the vocabulary of the model (it sits in the workdir next to the
checkpoints, so generation and export read the same one).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import sysconfig

import numpy as np
import tensorflow as tf
from absl import logging

from tfmstep import fileio
from tfmstep.data.common import (NotAvailableLocally, example_seeds, fall_back, fallback_allowed, load_tfds,
                                 record_used, used_instead_of)
from tfmstep.errors import UserError

BYTE_VOCAB_SIZE = 256
STDLIB_CORPUS = "python_stdlib"
TOKENIZERS = ("byte", "sentencepiece")
IGNORED_LABEL = -1  # a label the loss skips: context tokens that are read but not scored
_corpus_cache: dict = {}
_tokenized_cache: dict = {}


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


def _stdlib_corpus(max_bytes: int) -> bytes:
    data = _read_paths(stdlib_source_files(), max_bytes)
    logging.info("Corpus: Python %s standard library sources (top-level *.py of %s, sorted by name), "
                 "%d bytes.", sysconfig.get_python_version(), sysconfig.get_paths()["stdlib"], len(data))
    return data


def load_corpus(corpus: str, text_file: str = "", max_bytes: int = 0) -> bytes:
    """Raw bytes of the corpus; logs which corpus is used and any fallback."""
    key = (corpus, text_file, max_bytes, fallback_allowed())
    requested = text_file or corpus
    if key in _corpus_cache:
        data, used = _corpus_cache[key]
        record_used(requested, used)  # metrics.json names the data actually read
        return data
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
        logging.info("Corpus: %s (%d file(s), %d bytes).", text_file, len(paths), len(data))
    elif corpus == STDLIB_CORPUS:
        data = _stdlib_corpus(max_bytes)
    else:
        try:
            ds = load_tfds(corpus, split="train")  # never downloads; an unknown name is an error
        except NotAvailableLocally as e:
            fall_back(corpus, f"{STDLIB_CORPUS} (the offline Python standard library sources)", e)
            data = _stdlib_corpus(max_bytes)
        else:
            import tensorflow_datasets as tfds  # load_tfds imported it

            try:
                data = b"".join(x["text"] for x in tfds.as_numpy(ds))
            except (KeyError, TypeError) as e:
                raise UserError(f"TFDS dataset {corpus!r} has no 'text' feature a language model can "
                                f"read ({type(e).__name__}: {e})") from None
            data = data[:max_bytes] if max_bytes else data
            logging.info("Corpus: TFDS %s, prepared locally (%d bytes).", corpus, len(data))
    if len(data) < 1000:
        raise UserError(f"corpus has only {len(data)} bytes; a language model needs at least 1000")
    used = used_instead_of(requested)
    _corpus_cache[key] = data, used
    record_used(requested, used)
    return data


def split_bytes(data: bytes, validation_fraction: float) -> tuple:
    """(train bytes, validation bytes): cut at the first newline at or after the train fraction."""
    cut = int(len(data) * (1.0 - validation_fraction))
    newline = data.find(b"\n", cut)
    if newline != -1 and newline < len(data) - 1:
        cut = newline + 1
    return data[:cut], data[cut:]


class ByteTokenizer:
    """Bytes are the tokens: lossless for any text, vocabulary 256."""

    vocabulary_size = BYTE_VOCAB_SIZE

    def encode(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def decode_bytes(self, ids) -> bytes:
        """The raw bytes: what the exported LM's text outputs hold (``models/lstm_lm/serving.py``)."""
        return bytes(np.asarray(ids).astype(np.uint8).tolist())

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """Subwords through keras-hub's ``SentencePieceTokenizer``.

    The vocabulary is trained with the ``sentencepiece`` library directly (what keras-hub's
    ``compute_sentence_piece_proto`` wraps) because that helper forces NFKC normalisation, which collapses
    runs of spaces: indentation would be lost. Identity normalisation, whitespace-only pieces, newline as
    a piece and byte fallback make the round trip text -> ids -> text exact.
    """

    def __init__(self, proto: bytes):
        import keras_hub

        self.tokenizer = keras_hub.tokenizers.SentencePieceTokenizer(proto=proto)
        self.vocabulary_size = int(self.tokenizer.vocabulary_size())

    @staticmethod
    def train(data: bytes, vocab_size: int) -> bytes:
        import sentencepiece

        lines = data.decode("utf-8", errors="replace").split("\n")
        proto = io.BytesIO()
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=proto, vocab_size=vocab_size, model_type="bpe",
            normalization_rule_name="identity", remove_extra_whitespaces=False, byte_fallback=True,
            user_defined_symbols=["\n"], allow_whitespace_only_pieces=True, split_digits=True,
            character_coverage=1.0, max_sentence_length=1 << 16, pad_id=0, unk_id=1, bos_id=-1, eos_id=-1,
            num_threads=1, minloglevel=2)
        return proto.getvalue()

    def encode(self, data: bytes) -> np.ndarray:
        return np.asarray(self.tokenizer.tokenize(tf.constant(data.decode("utf-8", errors="replace"))),
                          np.int32)

    def decode(self, ids) -> str:
        text = self.tokenizer.detokenize(tf.constant(np.asarray(ids, np.int32)))
        return text.numpy().decode("utf-8", errors="replace") if hasattr(text, "numpy") else str(text)


# The corpus fingerprint rides in the vocabulary file itself: a length-delimited field in the range
# SentencePiece's ModelProto reserves for extensions (200+), which its parser and keras-hub's skip.
_FINGERPRINT_FIELD = 201


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def corpus_fingerprint(train_bytes: bytes, source: str) -> dict:
    import hashlib

    return {"train_sha256": hashlib.sha256(train_bytes).hexdigest(), "train_bytes": len(train_bytes),
            "source": source}


def with_fingerprint(proto: bytes, fingerprint: dict) -> bytes:
    payload = json.dumps(fingerprint, sort_keys=True).encode()
    return proto + _varint((_FINGERPRINT_FIELD << 3) | 2) + _varint(len(payload)) + payload


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """(value, position after it) of the protobuf varint at ``pos``; IndexError if it is cut off."""
    value, shift = 0, 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def read_fingerprint(proto: bytes):
    """The fingerprint recorded in a vocabulary file (None: it records none, or it is no ModelProto)."""
    pos = 0
    try:
        while pos < len(proto):
            tag, pos = _read_varint(proto, pos)
            if tag & 7 != 2:  # ModelProto's top-level fields are all length-delimited
                return None
            length, pos = _read_varint(proto, pos)
            if tag >> 3 == _FINGERPRINT_FIELD:
                return json.loads(proto[pos:pos + length])
            pos += length
    except (IndexError, ValueError):
        return None
    return None


def _bound_to_a_trained_model(vocab_file: str) -> bool:
    """Whether a trained run may depend on ``vocab_file``: it is not inside a workdir (config.json) that
    holds no checkpoint and no finished run yet -- only such a workdir's own vocabulary is retrained."""
    directory = os.path.dirname(os.path.abspath(vocab_file))
    if not os.path.exists(os.path.join(directory, "config.json")):
        return True
    checkpoints = os.path.join(directory, "checkpoints")
    trained = os.path.exists(os.path.join(directory, "metrics.json")) or (
        os.path.isdir(checkpoints) and any(n.endswith(".index") for _, _, names in os.walk(checkpoints)
                                           for n in names))
    return trained


def load_or_train_sentencepiece(vocab_file: str, vocab_size: int, train_bytes: bytes,
                                source: str = "") -> SentencePieceTokenizer:
    """The vocabulary in ``vocab_file``; trained on ``train_bytes`` and written there if it is missing.

    A trained vocabulary records a fingerprint of its train split (sha256, length, where it came from).
    Reusing it on other text is an error, unless it is the own vocabulary of a workdir that has trained
    nothing yet: then it is retrained. ``train_bytes`` empty: a saved model's vocabulary, not checked.
    """
    if not vocab_file:
        raise UserError("tokenizer=sentencepiece needs vocab_file (e.g. <workdir>/vocab.spm); it is trained "
                        "on the train split if the file does not exist")
    fingerprint = corpus_fingerprint(train_bytes, source) if train_bytes else None
    proto = None
    if os.path.exists(vocab_file):
        with open(vocab_file, "rb") as f:
            proto = f.read()
        recorded = read_fingerprint(proto)
        if fingerprint is None:
            pass
        elif recorded is None:
            logging.warning("Vocabulary %s records no corpus fingerprint (written by an older version): "
                            "not checked against this corpus; remove it to retrain it here.", vocab_file)
        elif recorded.get("train_sha256") != fingerprint["train_sha256"]:
            where = (f"({recorded.get('source') or 'unknown source'}, {recorded.get('train_bytes')} train "
                     f"bytes) than this run's train split ({source or 'this corpus'}, "
                     f"{fingerprint['train_bytes']} bytes)")
            if _bound_to_a_trained_model(vocab_file):
                raise UserError(f"vocab_file {vocab_file} was trained on another corpus {where}; use a new "
                                f"vocab_file (e.g. <workdir>/vocab.spm) or remove it to retrain it")
            logging.info("Vocabulary %s was trained on another corpus %s; this workdir has trained nothing "
                         "with it yet, so it is retrained.", vocab_file, where)
            proto = None
    if proto is not None:
        tokenizer = SentencePieceTokenizer(proto)
        logging.info("Vocabulary: %s (%d pieces).", vocab_file, tokenizer.vocabulary_size)
    else:
        try:
            proto = with_fingerprint(SentencePieceTokenizer.train(train_bytes, vocab_size), fingerprint)
        except RuntimeError as e:  # sentencepiece: "Vocabulary size is smaller than required_chars ..."
            reason = str(e).split("] ", 1)[-1].splitlines()[0]
            raise UserError(f"cannot train a {vocab_size}-piece vocabulary on this text: {reason}") from None
        try:
            os.makedirs(os.path.dirname(os.path.abspath(vocab_file)), exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the directory of vocab_file {vocab_file}: {e.strerror or e}"
                            ) from None
        fileio.atomic_write(vocab_file, proto)  # a reader never sees half a vocabulary
        tokenizer = SentencePieceTokenizer(proto)
        logging.info("Vocabulary: trained %d SentencePiece pieces on the train split, wrote %s.",
                     tokenizer.vocabulary_size, vocab_file)
    if tokenizer.vocabulary_size != vocab_size:
        raise UserError(f"vocab_file {vocab_file} has {tokenizer.vocabulary_size} pieces but vocab_size is "
                        f"{vocab_size}; set vocab_size={tokenizer.vocabulary_size} or use a new vocab_file")
    return tokenizer


@dataclasses.dataclass(frozen=True)
class TokenizedCorpus:
    train: np.ndarray
    validation: np.ndarray
    validation_bytes: int  # bytes of validation text: bits/byte = bits/token * tokens / bytes
    tokenizer: object

    @property
    def bytes_per_validation_token(self) -> float:
        return self.validation_bytes / max(len(self.validation), 1)


def tokenized_corpus(corpus: str, text_file: str, max_bytes: int, validation_fraction: float,
                     tokenizer: str = "byte", vocab_file: str = "",
                     vocab_size: int = BYTE_VOCAB_SIZE) -> TokenizedCorpus:
    key = (corpus, text_file, max_bytes, validation_fraction, tokenizer, vocab_file, vocab_size)
    if key in _tokenized_cache:
        return _tokenized_cache[key]
    train_bytes, validation_bytes = split_bytes(load_corpus(corpus, text_file, max_bytes),
                                                validation_fraction)
    if tokenizer == "byte":
        tok = ByteTokenizer()
    elif tokenizer == "sentencepiece":
        source = f"text_file={text_file}" if text_file else f"corpus={corpus}"
        if max_bytes:
            source += f", max_corpus_bytes={max_bytes}"
        tok = load_or_train_sentencepiece(vocab_file, vocab_size, train_bytes, source)
    else:
        raise UserError(f"unknown tokenizer {tokenizer!r}; choose one of {', '.join(TOKENIZERS)}")
    result = TokenizedCorpus(tok.encode(train_bytes), tok.encode(validation_bytes), len(validation_bytes),
                             tok)
    logging.info("Split: %d train / %d validation tokens (%s; validation = last %.0f%% of the bytes, "
                 "%.2f bytes per token).", len(result.train), len(result.validation), tokenizer,
                 100 * validation_fraction, result.bytes_per_validation_token)
    _tokenized_cache[key] = result
    return result


def validate_config(config) -> None:
    """The corpus of ``config`` (an LSTM config) checked against it before anything is trained or written:
    the text is there and readable, both splits are long enough for ``seq_len``, and every token id is in
    the vocabulary. One UserError line naming the file (or corpus), the field and the value."""
    corpus = tokenized_corpus(config.corpus, config.text_file, config.max_corpus_bytes,
                              config.validation_fraction, config.tokenizer, config.vocab_file,
                              config.vocab_size)
    source = f"text_file={config.text_file}" if config.text_file else f"corpus={config.corpus}"
    for split, tokens, needed, knob in (("train", corpus.train, config.seq_len + 2, "seq_len"),
                                        ("validation", corpus.validation, config.seq_len + 1,
                                         "seq_len or raise validation_fraction")):
        if len(tokens) < needed:
            raise UserError(f"{source}: the {split} split has {len(tokens)} tokens, fewer than the {needed} "
                            f"seq_len={config.seq_len} needs; use a longer text or lower {knob}")
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= config.vocab_size:
            bad = low if low < 0 else high
            raise UserError(f"{source}: the {split} split has token id {bad}, outside the vocabulary "
                            f"0..{config.vocab_size - 1} (vocab_size={config.vocab_size}, "
                            f"tokenizer={config.tokenizer})")


def window_dataset(tokens: np.ndarray, split: str, seq_len: int, batch_size: int, seed: int,
                   start_batch: int, context: np.ndarray | None = None,
                   eval_context: int = 0) -> tf.data.Dataset:
    """(inputs [B, T], next-token labels [B, T]).

    Train: windows of ``seq_len`` at stateless random offsets keyed by (seed, example index), infinite.
    Validation: consecutive non-overlapping chunks of ``seq_len`` scored tokens, in order, finite. Each is
    preceded by ``eval_context`` tokens that the model reads but that are not scored (their labels are
    ``IGNORED_LABEL``), taken from the tokens before it (the end of ``context`` -- the train split -- for
    the first chunk): the model predicts every scored token with at least that much history, as the
    n-gram baseline does.
    """
    span = seq_len + 1
    if split == "train":
        if len(tokens) < span + 1:
            raise UserError(f"train split has {len(tokens)} tokens, fewer than seq_len + 2 = {span + 1}")
        tokens_t = tf.constant(tokens, tf.int32)
        max_start = len(tokens) - span

        def window(seed_pair):
            start = tf.random.stateless_uniform([], seed_pair, maxval=max_start + 1, dtype=tf.int64)
            return tokens_t[start:start + span]

        windows = example_seeds(seed, start_batch * batch_size).map(window).batch(batch_size,
                                                                                  drop_remainder=True)
        return windows.map(lambda w: (w[:, :-1], w[:, 1:]), num_parallel_calls=tf.data.AUTOTUNE,
                           deterministic=True).prefetch(2)

    if len(tokens) < span:
        raise UserError(f"{split} split has {len(tokens)} tokens, fewer than seq_len + 1 = {span}")
    history = np.asarray(context if context is not None else [], np.int32)[-eval_context:] \
        if eval_context else np.zeros(0, np.int32)
    stream = np.concatenate([history, tokens]).astype(np.int32)
    offset = len(history)  # stream index of the first validation token
    chunk_starts = np.arange(0, len(tokens) - span + 1, seq_len)
    window_starts = np.maximum(offset + chunk_starts - eval_context, 0)
    # Fixed-width windows; a chunk with less history than eval_context (only when the train split is
    # shorter than it) scores the same seq_len tokens with what history there is.
    width = eval_context + span
    stream = np.concatenate([stream, np.zeros(width, np.int32)])
    windows = np.stack([stream[s:s + width] for s in window_starts])
    first_scored = (offset + chunk_starts - window_starts)[:, None]
    position = np.arange(width - 1)[None, :]
    ignored = (position < first_scored) | (position >= first_scored + seq_len)
    labels = np.where(ignored, IGNORED_LABEL, windows[:, 1:])
    return tf.data.Dataset.from_tensor_slices((windows[:, :-1], labels)).batch(batch_size).prefetch(2)
