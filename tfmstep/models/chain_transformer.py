"""Chain reasoner: a looped (weight-shared) Transformer block with input injection and learned halting.

Each loop iteration is one pre-LayerNorm Transformer block (attention, GELU MLP, residuals, dropout) on a
per-token state; the token embeddings are added back before every iteration (input injection), and the
state is layer-normalised between iterations so that running many more loops than in training keeps it
in range. A token finds the token it depends on by content (its ``parent`` name against the other
tokens' ``name``) or by a clipped relative-position bias -- never by absolute position -- so a problem
longer than any trained one looks locally the same. Training supervises the answer after every
iteration on the tokens already reachable (depth <= iteration), which teaches one hop per iteration and
answers that stay fixed once found; a per-token halting head learns "my answer is final", and at
inference the loop stops for a problem once every token's halting probability passes the threshold
(ACT-style; the loop count is the ``steps_used`` output). ``looped=False`` gives the baseline: a plain
stack of ``layers`` distinct blocks run once each.

The attention is written out (rather than keras-hub's TransformerEncoder) because it needs the
relative-position bias and the per-head key mask inside the softmax.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from tfmstep.data import chains
from tfmstep.errors import UserError
from tfmstep.registry import register

HALT_WEIGHT = 0.5  # halting loss relative to the answer loss


@dataclasses.dataclass(frozen=True)
class ChainConfig:
    # Task.
    task: str = "lego"  # lego | running_sum | pointer | kinship
    train_min_len: int = 1
    train_max_len: int = 8
    test_max_len: int = 32  # longest chain of the "test" split (and the name vocabulary check)
    modulus: int = 5  # answer classes of lego / running_sum (2 = running parity) / pointer sink labels
    num_names: int = 80  # name vocabulary (lego, pointer, kinship): >= tokens of the longest problem
    eval_examples: int = 512
    # Model.
    looped: bool = True  # False: the non-looped stacked baseline
    width: int = 64
    heads: int = 2
    mlp_dim: int = 256
    layers: int = 10  # distinct blocks of the baseline (its fixed number of steps)
    train_loops: int = 10  # loop iterations in training (looped); >= train_max_len
    max_loops: int = 80  # inference cap on loop iterations (looped); halting usually stops earlier
    halt_threshold: float = 0.5
    relative_clip: int = 4  # relative offsets beyond +-clip share one learned bias
    dropout: float = 0.0

    def __post_init__(self):
        chains.validate_task(self.task, self.modulus, self.num_names, self.train_min_len,
                             self.train_max_len, self.test_max_len)
        if min(self.width, self.heads, self.mlp_dim, self.layers, self.train_loops, self.max_loops) < 1:
            raise UserError("width, heads, mlp_dim, layers, train_loops and max_loops must be >= 1")
        if self.width % self.heads:
            raise UserError(f"width ({self.width}) must be divisible by heads ({self.heads})")
        steps = self.train_loops if self.looped else self.layers
        if steps < self.train_max_len:
            raise UserError(f"{'train_loops' if self.looped else 'layers'}={steps} is fewer than "
                            f"train_max_len={self.train_max_len}: one iteration resolves one hop")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.halt_threshold < 1.0:
            raise UserError(f"halt_threshold must be in (0, 1), got {self.halt_threshold}")

    @property
    def num_classes(self) -> int:
        return chains.num_classes(self.task, self.modulus, self.num_names)


class LoopBlock(keras.layers.Layer):
    """Pre-LN Transformer block with a clipped relative-position bias and length-scaled softmax, ending
    in a LayerNorm."""

    def __init__(self, width, heads, mlp_dim, dropout, relative_clip, **kwargs):
        super().__init__(**kwargs)
        self.width, self.heads, self.clip = width, heads, relative_clip
        self.attn_norm = keras.layers.LayerNormalization(epsilon=1e-5, name="attn_norm")
        self.qkv = keras.layers.Dense(3 * width, name="qkv")
        self.attn_out = keras.layers.Dense(width, name="attn_out")
        self.mlp_norm = keras.layers.LayerNormalization(epsilon=1e-5, name="mlp_norm")
        self.mlp_in = keras.layers.Dense(mlp_dim, activation="gelu", name="mlp_in")
        self.mlp_out = keras.layers.Dense(width, name="mlp_out")
        self.state_norm = keras.layers.LayerNormalization(epsilon=1e-5, name="state_norm")
        self.dropout = keras.layers.Dropout(dropout)

    def build(self, input_shape):
        self.relative_bias = self.add_weight(shape=(self.heads, 2 * self.clip + 1), initializer="zeros",
                                             name="relative_bias")
        # Scalable softmax: logits grow with log(number of tokens), so attention stays as sharp on a
        # problem four times longer than any trained one (initialised to 1 at about 10 tokens).
        self.length_scale = self.add_weight(shape=(self.heads,), name="length_scale",
                                            initializer=keras.initializers.Constant(1 / np.log(10.0)))
        for layer, width in ((self.attn_norm, self.width), (self.qkv, self.width),
                             (self.attn_out, self.width), (self.mlp_norm, self.width),
                             (self.mlp_in, self.width), (self.state_norm, self.width)):
            layer.build((None, None, width))
        self.mlp_out.build((None, None, self.mlp_in.units))

    def call(self, h, key_mask, relative_index, training=False):
        batch, length = tf.shape(h)[0], tf.shape(h)[1]
        head_dim = self.width // self.heads
        qkv = tf.reshape(self.qkv(self.attn_norm(h)), [batch, length, 3, self.heads, head_dim])
        q, k, v = tf.unstack(qkv, axis=2)
        scores = tf.einsum("bqhd,bkhd->bhqk", q, k) * (head_dim ** -0.5)
        scores += tf.gather(self.relative_bias, relative_index, axis=1)[None]  # [1, H, N, N]
        tokens = tf.reduce_sum(tf.cast(key_mask, scores.dtype), axis=1)
        log_tokens = tf.math.log(tf.maximum(tokens, 2.0))[:, None, None, None]
        scores *= self.length_scale[None, :, None, None] * log_tokens
        # A reshape, not key_mask[:, None, None, :]: that strided slice of a bool has no TF-Lite builtin.
        scores = tf.where(tf.reshape(key_mask, [batch, 1, 1, length]), scores, tf.cast(-1e9, scores.dtype))
        weights = tf.nn.softmax(scores, axis=-1)
        attended = tf.reshape(tf.einsum("bhqk,bkhd->bqhd", weights, v), [batch, length, self.width])
        h = h + self.dropout(self.attn_out(attended), training=training)
        h = h + self.dropout(self.mlp_out(self.mlp_in(self.mlp_norm(h))), training=training)
        return self.state_norm(h)


class ChainTransformer(keras.Model):
    """Outputs {"logits" [B,N,C], "halt_logits" [B,N], "steps_used" [B]} and, in training (or when
    asked), the per-iteration {"step_logits" [B,T,N,C], "step_halt_logits" [B,T,N]}."""

    def __init__(self, config: ChainConfig, **kwargs):
        super().__init__(name="chain_transformer", **kwargs)
        self.config = config
        c = config
        values = c.num_classes + 1  # 0 = not given
        # Embeddings on the scale of the layer-normalised state, so the injected input is not drowned
        # out by the state in later iterations.
        init = keras.initializers.RandomNormal(stddev=0.5)
        names = c.num_names + 1
        self.name_embedding = keras.layers.Embedding(names, c.width, embeddings_initializer=init,
                                                      name="name_embedding")
        # Names and parent names share one table: matching "my parent" to "your name" is then one
        # linear map learned from every pair, instead of a separate alignment per name.
        self.parent_projection = keras.layers.Dense(c.width, use_bias=False, name="parent_projection",
                                                    kernel_initializer="orthogonal")
        self.op_embedding = keras.layers.Embedding(chains.num_ops(c.task, c.modulus), c.width,
                                                   embeddings_initializer=init, name="op_embedding")
        self.value_embedding = keras.layers.Embedding(values, c.width, embeddings_initializer=init,
                                                      name="value_embedding")
        count = 1 if c.looped else c.layers
        self.blocks = [LoopBlock(c.width, c.heads, c.mlp_dim, c.dropout, c.relative_clip, name=f"block{i}")
                       for i in range(count)]
        self.head_norm = keras.layers.LayerNormalization(epsilon=1e-5, name="head_norm")
        self.head = keras.layers.Dense(c.num_classes, name="answer_head")
        self.halt_head = keras.layers.Dense(1, name="halt_head", bias_initializer="zeros")

    def build(self, input_shape=None):
        for layer in (self.name_embedding, self.op_embedding, self.value_embedding):
            layer.build((None, None))
        self.parent_projection.build((None, None, self.config.width))
        for block in self.blocks:
            block.build((None, None, self.config.width))
        for layer in (self.head_norm, self.head, self.halt_head):
            layer.build((None, None, self.config.width))
        self.built = True

    def _read(self, h):
        return self.head(self.head_norm(h)), self.halt_head(h)[..., 0]

    def call(self, inputs, training=False, num_loops=None, use_halting=None, return_steps=None):
        """``num_loops``: iterations to run (looped only; default train_loops in training, else max_loops).
        ``use_halting``: stop each problem when it halts (default: not in training). With it off, exactly
        ``num_loops`` iterations run -- how the evaluation forces extra loops."""
        c = self.config
        ops = tf.cast(inputs["op"], tf.int32)
        mask = ops > 0
        x = (self.name_embedding(inputs["name"])
             + self.parent_projection(self.name_embedding(inputs["parent"]))
             + self.op_embedding(ops) + self.value_embedding(inputs["value"]))
        length = tf.shape(ops)[1]
        positions = tf.range(length)
        relative_index = tf.clip_by_value(positions[None, :] - positions[:, None], -c.relative_clip,
                                          c.relative_clip) + c.relative_clip
        if use_halting is None:
            use_halting = not training
        if return_steps is None:
            return_steps = bool(training)
        if not c.looped:  # a plain stack: every layer runs once, no halting
            num_loops, use_halting = c.layers, False
        elif num_loops is None:
            num_loops = c.train_loops if training else c.max_loops
        batch = tf.shape(ops)[0]
        h = tf.zeros_like(x)

        def halted_now(halt_logits):
            return tf.reduce_all((tf.sigmoid(halt_logits) > c.halt_threshold) | ~mask, axis=1)

        if return_steps or not c.looped:
            # Unrolled: gradients through every iteration; per-iteration outputs for deep supervision.
            step_logits, step_halts = [], []
            halted = tf.zeros([batch], tf.bool)
            steps_used = tf.zeros([batch], tf.float32)
            for t in range(num_loops):
                block = self.blocks[0 if c.looped else t]
                new_h = block(h + x, mask, relative_index, training=training)
                h = tf.where(halted[:, None, None], h, new_h) if use_halting else new_h
                logits, halt_logits = self._read(h)
                step_logits.append(logits)
                step_halts.append(halt_logits)
                steps_used += 1.0 - tf.cast(halted, tf.float32)
                halted = halted | halted_now(halt_logits)
            if not c.looped:
                steps_used = tf.fill([batch], float(num_loops))
            # (In training, steps_used is where halting would have stopped: a metric, not a freeze.)
            outputs = {"logits": logits, "halt_logits": halt_logits, "steps_used": steps_used}
            if return_steps:
                outputs["step_logits"] = tf.stack(step_logits, axis=1)
                outputs["step_halt_logits"] = tf.stack(step_halts, axis=1)
            return outputs

        # Looped inference: a while loop that stops once every problem in the batch has halted.
        block = self.blocks[0]

        def body(t, h, halted, steps_used):
            new_h = block(h + x, mask, relative_index, training=False)
            h = tf.where(halted[:, None, None], h, new_h)
            steps_used += 1.0 - tf.cast(halted, tf.float32)
            if use_halting:
                _, halt_logits = self._read(h)
                halted = halted | halted_now(halt_logits)
            return t + 1, h, halted, steps_used

        def cond(t, h, halted, steps_used):
            return (t < num_loops) & ~tf.reduce_all(halted)

        _, h, _, steps_used = tf.while_loop(
            cond, body, (tf.constant(0), h, tf.zeros([batch], tf.bool), tf.zeros([batch], tf.float32)),
            maximum_iterations=num_loops)
        logits, halt_logits = self._read(h)
        return {"logits": logits, "halt_logits": halt_logits, "steps_used": steps_used}


def chain_loss(labels, outputs):
    """Per-problem loss: cross-entropy after every iteration on the tokens reachable by then (depth <=
    iteration), plus a halting loss teaching each token to say when its answer is final. Without the
    per-iteration outputs (inference), cross-entropy of the final answers."""
    target = tf.cast(labels["target"], tf.int32)
    depth = tf.cast(labels["depth"], tf.int32)
    valid = depth >= 0
    validf = tf.cast(valid, tf.float32)
    logits = tf.cast(outputs["logits"], tf.float32)
    if "step_logits" in outputs:
        step_logits = tf.cast(outputs["step_logits"], tf.float32)  # [B, T, N, C]
        loops = tf.shape(step_logits)[1]
        iteration = tf.range(1, loops + 1)[None, :, None]
        reachable = valid[:, None, :] & (depth[:, None, :] <= iteration)  # [B, T, N]
        reachablef = tf.cast(reachable, tf.float32)
        step_target = tf.broadcast_to(target[:, None, :], tf.shape(reachable))
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=step_target, logits=step_logits)
        answer_loss = tf.reduce_sum(ce * reachablef, [1, 2]) / tf.maximum(tf.reduce_sum(reachablef, [1, 2]),
                                                                          1.0)
        halt = tf.nn.sigmoid_cross_entropy_with_logits(
            labels=reachablef, logits=tf.cast(outputs["step_halt_logits"], tf.float32))
        validt = tf.broadcast_to(validf[:, None, :], tf.shape(reachablef))
        halt_loss = tf.reduce_sum(halt * validt, [1, 2]) / tf.maximum(tf.reduce_sum(validt, [1, 2]), 1.0)
        loss = answer_loss + HALT_WEIGHT * halt_loss
    else:
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.maximum(target, 0), logits=logits)
        loss = tf.reduce_sum(ce * validf, 1) / tf.maximum(tf.reduce_sum(validf, 1), 1.0)
    return loss, chain_metrics(labels, outputs)


def chain_metrics(labels, outputs):
    """Per-problem token accuracy, full-chain exact match, loops used and |loops - hops|."""
    target = tf.cast(labels["target"], tf.int32)
    depth = tf.cast(labels["depth"], tf.int32)
    valid = depth >= 0
    validf = tf.cast(valid, tf.float32)
    predicted = tf.argmax(outputs["logits"], -1, output_type=tf.int32)
    correct = tf.cast(tf.equal(predicted, target), tf.float32) * validf
    hops = tf.cast(tf.reduce_max(depth, axis=1), tf.float32)
    steps_used = tf.cast(outputs["steps_used"], tf.float32)
    return {"token_accuracy": tf.reduce_sum(correct, 1) / tf.maximum(tf.reduce_sum(validf, 1), 1.0),
            "exact_match": tf.cast(tf.reduce_all(tf.equal(predicted, target) | ~valid, axis=1), tf.float32),
            "steps_used": steps_used,
            "halting_error": tf.abs(steps_used - hops)}


def chain_dataset(config: ChainConfig, split: str, batch_size: int, seed: int = 0, start_batch: int = 0):
    return chains.chain_dataset(config.task, split, batch_size, seed=seed, start_batch=start_batch,
                                train_min_len=config.train_min_len, train_max_len=config.train_max_len,
                                test_max_len=config.test_max_len, modulus=config.modulus,
                                num_names=config.num_names, eval_examples=config.eval_examples)


def count_parameters(config: ChainConfig) -> int:
    model = build_chain_transformer(config)
    return int(sum(np.prod(v.shape) for v in model.weights))


@register("chain_transformer", config_class=ChainConfig, loss=chain_loss, dataset=chain_dataset,
          presets={
              "tiny": dict(train_max_len=3, test_max_len=6, num_names=16, width=16, heads=2, mlp_dim=32,
                           layers=4, train_loops=4, max_loops=12),
              # Looped, ~0.1M parameters.
              "default": dict(width=64, heads=2, mlp_dim=256),
              # Non-looped stack of `layers` distinct blocks with about the looped default's parameter count.
              "baseline": dict(looped=False, width=24, heads=2, mlp_dim=64, layers=10),
          })
def build_chain_transformer(config: ChainConfig) -> keras.Model:
    """Looped Transformer with learned halting for multi-hop chains (or its stacked baseline)."""
    model = ChainTransformer(config)
    model.build()
    return model
