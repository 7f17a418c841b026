"""LSTM language model: Embedding -> stacked LSTM -> (LayerNorm) -> logits over the next token.

(Registered in ``tfmstep/models/lstm_lm/__init__.py`` with its serving code, ``serving.py``.)

Tokens are bytes by default, or SentencePiece subwords (``tokenizer="sentencepiece"``, vocabulary in
``vocab_file``); see ``tfmstep/data/text.py`` for the corpora and the fixed split. The loss is the mean
next-token cross-entropy in nats; ``bits_per_byte`` turns it into the number compared with the n-gram.

Generation carries the LSTM (h, c) states from token to token (``make_step_fn``), so a long prompt is
read once and each new token costs one cell step.
"""

from __future__ import annotations

import dataclasses
import os

import keras
import numpy as np
import tensorflow as tf

from tfmstep.data import text as text_data
from tfmstep.errors import UserError


@dataclasses.dataclass(frozen=True)
class LSTMConfig:
    # Data.
    corpus: str = text_data.STDLIB_CORPUS  # or a TFDS text dataset such as "tiny_shakespeare"
    text_file: str = ""  # a local file or directory; overrides corpus
    # 0: the whole corpus. The offline default is then every top-level stdlib module (4.7 MB on
    # Python 3.11): with the first 2 MB only, the LSTM overfitted within 15 epochs.
    max_corpus_bytes: int = 0
    validation_fraction: float = 0.1
    seq_len: int = 128
    # Validation reads this many tokens before each scored chunk without scoring them, so every scored
    # token has that much history (the n-gram sees its full order - 1 tokens); 0: chunks start cold.
    eval_context: int = 128
    tokenizer: str = "byte"  # or "sentencepiece" (subwords through keras-hub)
    vocab_file: str = ""  # sentencepiece vocabulary; trained on the train split and written here if missing
    # Model.
    vocab_size: int = text_data.BYTE_VOCAB_SIZE  # sentencepiece: the number of pieces
    embedding_dim: int = 128
    units: int = 512
    layers: int = 1
    dropout: float = 0.1
    layer_norm: bool = True
    # Output layer = the embedding matrix (transposed). When embedding_dim != units a Dense projection to
    # embedding_dim comes first: tied and cheaper than a units x vocab softmax.
    tie_weights: bool = False
    # The cuDNN LSTM kernel cannot run inside an XLA cluster, and the step uses XLA by default on
    # accelerators (on CPU only when auto-tuning picks it). Set true for non-XLA training on a GPU.
    use_cudnn: bool = False

    def __post_init__(self):
        if self.units < 1 or self.layers < 1 or self.embedding_dim < 1 or self.seq_len < 1:
            raise UserError("units, layers, embedding_dim and seq_len must be >= 1")
        if not 0.0 < self.validation_fraction < 0.5:
            raise UserError(f"validation_fraction must be in (0, 0.5), got {self.validation_fraction}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.max_corpus_bytes < 0:
            raise UserError(f"max_corpus_bytes must be >= 0 (0: the whole corpus), got {self.max_corpus_bytes}")
        if self.eval_context < 0:
            raise UserError(f"eval_context must be >= 0, got {self.eval_context}")
        if self.tokenizer not in text_data.TOKENIZERS:
            raise UserError(f"unknown tokenizer {self.tokenizer!r}; choose one of "
                            f"{', '.join(text_data.TOKENIZERS)}")
        if self.tokenizer == "byte" and self.vocab_size != text_data.BYTE_VOCAB_SIZE:
            raise UserError(f"vocab_size must be {text_data.BYTE_VOCAB_SIZE} with tokenizer=byte")
        if self.tokenizer == "sentencepiece":
            if not self.vocab_file:
                raise UserError("tokenizer=sentencepiece needs vocab_file, e.g. "
                                "--config=vocab_file=<workdir>/vocab.spm (trained there if missing)")
            if self.vocab_size < 300:  # 256 byte-fallback pieces + specials + some merges
                raise UserError(f"tokenizer=sentencepiece needs vocab_size >= 300, got {self.vocab_size}")


def tokenized_corpus(config: LSTMConfig) -> text_data.TokenizedCorpus:
    return text_data.tokenized_corpus(config.corpus, config.text_file, config.max_corpus_bytes,
                                      config.validation_fraction, config.tokenizer, config.vocab_file,
                                      config.vocab_size)


def token_splits(config: LSTMConfig) -> dict:
    """{"train": tokens, "validation": tokens} of the fixed split (the n-gram baseline uses these)."""
    corpus = tokenized_corpus(config)
    return {"train": corpus.train, "validation": corpus.validation}


def make_tokenizer(config: LSTMConfig):
    """The model's tokenizer: ``encode(bytes) -> ids``, ``decode(ids) -> str``."""
    if config.tokenizer == "byte":
        return text_data.ByteTokenizer()
    if config.vocab_file and os.path.exists(config.vocab_file):  # no corpus needed (a saved model)
        return text_data.load_or_train_sentencepiece(config.vocab_file, config.vocab_size, b"")
    return tokenized_corpus(config).tokenizer


def lm_loss(labels, logits):
    """Per-sequence mean next-token cross-entropy (nats) and accuracy over the scored tokens (labels
    equal to ``IGNORED_LABEL`` are context: read, not scored)."""
    logits = tf.cast(logits, tf.float32)
    scored = tf.cast(labels != text_data.IGNORED_LABEL, tf.float32)
    safe_labels = tf.maximum(labels, 0)
    token_loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=safe_labels, logits=logits)
    correct = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), safe_labels), tf.float32)
    count = tf.maximum(tf.reduce_sum(scored, -1), 1.0)
    return (tf.reduce_sum(token_loss * scored, -1) / count,
            {"accuracy": tf.reduce_sum(correct * scored, -1) / count})


def lm_dataset(config: LSTMConfig, split: str, batch_size: int, seed: int = 0, start_batch: int = 0):
    corpus = tokenized_corpus(config)
    if split == "train":
        return text_data.window_dataset(corpus.train, split, config.seq_len, batch_size, seed, start_batch)
    return text_data.window_dataset(corpus.validation, split, config.seq_len, batch_size, seed, start_batch,
                                    context=corpus.train, eval_context=config.eval_context)


def bits_per_byte(config: LSTMConfig, nats_per_token: float) -> float:
    """Validation loss in nats per token -> bits per byte of text (= bits/token for byte tokens)."""
    return float(nats_per_token / np.log(2.0) / tokenized_corpus(config).bytes_per_validation_token)


def headline_metrics(config: LSTMConfig, eval_metrics: dict) -> dict:
    """The ``headline`` hook: bits per byte of validation text (what the n-gram baseline is compared in)
    and per-token perplexity."""
    return {"bits_per_byte": bits_per_byte(config, eval_metrics["loss"]),
            "perplexity": float(np.exp(eval_metrics["loss"]))}


@keras.saving.register_keras_serializable("tfmstep")
class TiedEmbedding(keras.layers.Embedding):
    """Token embedding whose transpose also gives the output logits (weight tying): ``layer(ids)`` embeds,
    ``layer(features, reverse=True)`` projects onto the vocabulary. One layer called twice in the
    functional graph, so the model serialises (``.keras``) with no layer holding another."""

    def call(self, inputs, reverse=False):
        if reverse:
            return keras.ops.matmul(inputs, keras.ops.transpose(keras.ops.cast(self.embeddings, inputs.dtype)))
        return super().call(inputs)

    def compute_output_shape(self, input_shape, reverse=False):
        if reverse:
            return (*input_shape[:-1], self.input_dim)
        return super().compute_output_shape(input_shape)

    def compute_output_spec(self, inputs, reverse=False):
        if reverse:
            return keras.KerasTensor((*inputs.shape[:-1], self.input_dim), dtype=self.compute_dtype)
        return super().compute_output_spec(inputs)


@keras.saving.register_keras_serializable("tfmstep")
class OutputBias(keras.layers.Layer):
    """The tied output's per-token bias (the ``logits`` layer of a tied model)."""

    def build(self, input_shape):
        self.bias = self.add_weight(shape=(input_shape[-1],), initializer="zeros", name="bias")

    def call(self, x):
        return keras.ops.cast(x, self.compute_dtype) + self.bias


def build_lstm_lm(config: LSTMConfig) -> keras.Model:
    """Embedding -> stacked LSTM -> logits for next-token prediction (byte level)."""
    tokens = keras.Input(shape=(None,), dtype="int32", name="tokens")
    embedding_class = TiedEmbedding if config.tie_weights else keras.layers.Embedding
    embedding = embedding_class(config.vocab_size, config.embedding_dim, name="embedding")
    x = embedding(tokens)
    for i in range(config.layers):
        x = keras.layers.LSTM(config.units, return_sequences=True, dropout=config.dropout,
                              use_cudnn=config.use_cudnn, name=f"lstm_{i}")(x)
    if config.layer_norm:
        x = keras.layers.LayerNormalization(name="final_norm")(x)
    if config.dropout:
        x = keras.layers.Dropout(config.dropout)(x)
    if config.tie_weights:
        if config.embedding_dim != config.units:
            x = keras.layers.Dense(config.embedding_dim, name="projection")(x)
        logits = OutputBias(name="logits", dtype="float32")(embedding(x, reverse=True))
    else:
        logits = keras.layers.Dense(config.vocab_size, name="logits", dtype="float32")(x)
    return keras.Model(tokens, logits, name="lstm_lm")


def lstm_layers(model: keras.Model) -> list:
    return [layer for layer in model.layers if isinstance(layer, keras.layers.LSTM)]


def initial_state(model: keras.Model, batch_size) -> tf.Tensor:
    """Zero (h, c) for every layer, packed as one tensor [batch, layers, 2, units]."""
    layers = lstm_layers(model)
    return tf.zeros(tf.stack([batch_size, len(layers), 2, layers[0].units]), tf.float32)


def make_step_fn(model: keras.Model):
    """``step(tokens [N], state) -> (logits [N, vocab], state)``: one token through the LSTM cells,
    with the same weights as ``model``. Graph-compatible, for decoding and export."""
    layers = lstm_layers(model)
    embedding = model.get_layer("embedding")
    norm = next((layer for layer in model.layers if isinstance(layer, keras.layers.LayerNormalization)),
                None)
    projection = next((layer for layer in model.layers if layer.name == "projection"), None)
    head = model.get_layer("logits")

    def step(tokens, state):
        x = embedding(tokens)
        new_states = []
        for i, layer in enumerate(layers):
            h, (h, c) = layer.cell(x, [state[:, i, 0], state[:, i, 1]], training=False)
            new_states.append(tf.stack([h, c], axis=1))
            x = h
        if norm is not None:
            x = norm(x)
        if projection is not None:
            x = projection(x)
        if isinstance(embedding, TiedEmbedding):
            x = embedding(x, reverse=True)
        return tf.cast(head(x), tf.float32), tf.stack(new_states, axis=1)

    return step


DECODERS = ("greedy", "sample", "beam")


def generate_text(model: keras.Model, prompt: str, *, decoder: str = "greedy", max_new_tokens: int = 200,
                  temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                  beam_width: int = 4, length_penalty: float = 0.0, tokenizer=None) -> tuple:
    """(generated text, its log-probability in nats) after ``prompt``, carrying the LSTM state.

    ``tokenizer``: the model's (``make_tokenizer(config)``); bytes when None."""
    from tfmstep import decoding

    if decoder not in DECODERS:
        raise UserError(f"unknown decoder {decoder!r}; choose one of {', '.join(DECODERS)}")
    if not prompt:
        raise UserError("the prompt must not be empty")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    tokenizer = tokenizer or text_data.ByteTokenizer()
    prompt_ids = tokenizer.encode(prompt.encode("utf-8"))
    if not len(prompt_ids):
        raise UserError("the prompt has no tokens")
    tokens = tf.constant([prompt_ids.tolist()], tf.int32)
    step = make_step_fn(model)
    state = initial_state(model, 1)
    if decoder == "beam":
        out, log_prob, _ = decoding.beam_search(step, tokens, state, max_new_tokens, beam_width=beam_width,
                                                length_penalty=length_penalty)
    else:
        out, log_prob = decoding.sample(step, tokens, state, max_new_tokens, greedy=decoder == "greedy",
                                        temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    return tokenizer.decode(out.numpy()[0]), float(log_prob.numpy()[0])
