"""Experiments on the looped chain reasoner (a compact copy of the model), one run per command, a JSON line
appended to --out:
  python discrete_state.py --task=parity --steps=1000 [--discrete=1 --groups=4 --codes=16]
  --win/--pwin N: core/prelude attention local to +-N tokens (--local_heads: only that many heads local)
  --curriculum S: the longest trained k rises from 1 to train_max over the first S steps
  --fixed_logn 1: no length-scaled softmax; --state_noise s: Gaussian noise on the state per iteration
  --bos 1: a learned start vector before the first token (the first token's "previous" exists)
  --exact_k 1: the answer supervised only after exactly k iterations (Fan et al. 2024)
  --still W: a cost (weight W) on the state's mean change per iteration after iteration k
  --save/--load F: the trained weights (--load skips training); every evaluation also reports the
    fixed-point rule (stop when no token's state moved by eps) at three eps"""
import argparse, json, time, sys, os
import numpy as np
import tensorflow as tf
import keras
from tfmstep.data import chains
from tfmstep.models.chain_transformer.model import Block, chain_loss

p = argparse.ArgumentParser()
p.add_argument("--task", default="parity"); p.add_argument("--steps", type=int, default=1000)
p.add_argument("--batch", type=int, default=64); p.add_argument("--width", type=int, default=64)
p.add_argument("--heads", type=int, default=4); p.add_argument("--mlp", type=int, default=256)
p.add_argument("--prelude", type=int, default=2); p.add_argument("--groups", type=int, default=4)
p.add_argument("--codes", type=int, default=16); p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--loops", type=int, default=16); p.add_argument("--train_max", type=int, default=8)
p.add_argument("--discrete", type=int, default=1); p.add_argument("--tau", type=float, default=1.0)
p.add_argument("--gumbel", type=float, default=0.0); p.add_argument("--seed", type=int, default=0)
p.add_argument("--eval_n", type=int, default=128); p.add_argument("--tests", default="8,12,16,32")
p.add_argument("--win", type=int, default=0); p.add_argument("--pwin", type=int, default=0)
p.add_argument("--soft_train", type=int, default=0); p.add_argument("--exact_k", type=int, default=0)
p.add_argument("--coda", type=int, default=0); p.add_argument("--out", default="")
p.add_argument("--curriculum", type=int, default=0); p.add_argument("--local_heads", type=int, default=0)
p.add_argument("--still", type=float, default=0.0)  # weight of the state's mean change after iteration k
p.add_argument("--save", default=""); p.add_argument("--load", default="")
p.add_argument("--bos", type=int, default=0); p.add_argument("--causal", type=int, default=0); p.add_argument("--fixed_logn", type=int, default=0); p.add_argument("--state_noise", type=float, default=0.0)
args = p.parse_args()
keras.utils.set_random_seed(args.seed)
A = chains.ANSWER_LENGTH[args.task]

class FSM(keras.Model):
    def __init__(self):
        super().__init__()
        W = args.width
        self.emb = keras.layers.Embedding(chains.VOCAB_SIZE, W, embeddings_initializer=keras.initializers.RandomNormal(stddev=0.5))
        self.prelude = [Block(W, args.heads, args.mlp) for _ in range(args.prelude)]
        self.core = Block(W, args.heads, args.mlp)
        self.to_codes = keras.layers.Dense(args.groups * args.codes)
        self.codebook = self.add_weight(shape=(args.groups, args.codes, W // args.groups), initializer=keras.initializers.RandomNormal(stddev=1.0), name="codebook")
        self.coda = Block(W, args.heads, args.mlp) if args.coda else None
        self.hnorm = keras.layers.LayerNormalization(); self.head = keras.layers.Dense(chains.VOCAB_SIZE); self.halt = keras.layers.Dense(1)
        if args.bos:  # created only when used: the other runs' initial weights stay as they were
            self.bos_vec = self.add_weight(shape=(1, 1, W), initializer=keras.initializers.RandomNormal(stddev=0.5), name="bos")
        self.amlp = keras.Sequential([keras.layers.Dense(args.mlp, activation="gelu"), keras.layers.Dense(args.width)])
        for b in self.prelude + [self.core] + ([self.coda] if self.coda else []):
            b.build()

    def call(self, tokens, loops=16, training=False):
        if args.bos:  # a placeholder (any id not PAD nor an answer slot) that the masks and positions count; its embedding is replaced by bos_vec below
            tokens = tf.concat([tf.fill([tf.shape(tokens)[0], 1], chains.FIRST_CHAR_ID), tokens], 1)
        B, T = tf.shape(tokens)[0], tf.shape(tokens)[1]
        mask = tokens != chains.PAD
        apos = tf.math.top_k(tf.where((tokens >= 1) & (tokens <= 8), tf.expand_dims(T - tf.range(T), 0), 0), k=A).indices
        pos = tf.range(T); rel = tf.expand_dims(pos[None, :] - pos[:, None], 0)
        n = tf.reduce_sum(tf.cast(mask, tf.float32), 1); logn = tf.reshape(tf.math.log(tf.maximum(n, 2.0)), [B, 1, 1, 1])
        if args.fixed_logn:  # no length-dependent softmax temperature
            logn = tf.fill([B, 1, 1, 1], float(np.log(30.0)))
        def local(bias, w):
            if not w:
                return bias
            far = tf.abs(rel) > w
            if args.causal:
                far = far | (rel > 0)
            cut = tf.where(far, -1e9, 0.0)[:, None]  # [1, 1, T, T]
            if args.local_heads:  # only the first local_heads heads are local; the rest stay global
                sel = tf.reshape(tf.cast(tf.range(args.heads) < args.local_heads, tf.float32), [1, args.heads, 1, 1])
                cut = cut * sel
            return bias + cut
        h = self.emb(tokens)
        if args.bos:
            first = tf.reshape(tf.cast(tf.range(T) == 0, h.dtype), [1, T, 1])
            h = h * (1 - first) + self.bos_vec * first
        for b in self.prelude:
            h = b(h, h, local(b.position_bias(rel), args.pwin), mask, logn, training=training)
        e = h; cb = local(self.core.position_bias(rel), args.win)
        G, K, D = args.groups, args.codes, args.width // args.groups
        def quant(x):
            logits = tf.reshape(self.to_codes(x), [B, T, G, K]) / args.tau
            if training and args.gumbel:
                u = tf.random.uniform(tf.shape(logits), 1e-6, 1 - 1e-6)
                logits = logits - args.gumbel * tf.math.log(-tf.math.log(u))
            soft = tf.nn.softmax(logits, -1)
            hard = tf.one_hot(tf.argmax(logits, -1), K)
            st = (soft if args.soft_train else hard + soft - tf.stop_gradient(soft)) if training else hard
            return tf.reshape(tf.einsum("btgk,gkd->btgd", st, self.codebook), [B, T, G * D])
        s = tf.zeros_like(e) if not args.discrete else tf.reshape(tf.tile(self.codebook[:, 0][None, None], [B, T, 1, 1]), [B, T, args.width])
        outs, halts, deltas, moves = [], [], [], []
        rela = tf.reshape(pos, [1, 1, T]) - tf.expand_dims(apos, 2)
        for _ in range(loops):
            x = s + e
            hh = self.core(x, x, cb, mask, logn, training=training)
            new_s = quant(hh) if args.discrete else hh
            # largest per-token change of the state this iteration (mean |diff| over width): the fixed-point rule
            change = tf.where(mask, tf.reduce_mean(tf.abs(new_s - s), -1), 0.0)  # [B, T]
            deltas.append(tf.reduce_max(change, 1))
            moves.append(tf.reduce_sum(change, 1) / tf.reduce_sum(tf.cast(mask, tf.float32), 1))
            s = new_s
            if training and args.state_noise:  # perturbed states must be pulled back: an error-correcting loop
                s = s + args.state_noise * tf.random.normal(tf.shape(s))
            q = tf.gather(s, apos, batch_dims=1)
            if self.coda is not None:
                q = self.coda(q, s, self.coda.position_bias(rela), mask, logn, training=training)
            z = self.hnorm(q + self.amlp(q))
            outs.append(self.head(z)); halts.append(self.halt(tf.reduce_mean(z, 1))[:, 0])
        if training and args.still:
            return tf.stack(outs, 1), tf.stack(halts, 1), tf.stack(moves, 1)
        if self.return_deltas:
            return tf.stack(outs, 1), tf.stack(halts, 1), tf.stack(deltas, 1)
        return tf.stack(outs, 1), tf.stack(halts, 1)

model = FSM()
model.return_deltas = False
pad_train = chains.max_text_length(args.task, args.train_max) + A
sched = keras.optimizers.schedules.CosineDecay(0.0, args.steps, alpha=0.05, warmup_target=args.lr, warmup_steps=min(200, args.steps // 10))
opt = keras.optimizers.AdamW(sched, weight_decay=0.01, clipnorm=1.0)

@tf.function(jit_compile=True)
def train_step(tokens, answers, steps):
    with tf.GradientTape() as tape:
        if args.still:
            logits, halts, moves = model(tokens, loops=args.loops, training=True)
        else:
            logits, halts = model(tokens, loops=args.loops, training=True)
        out = {"step_logits": logits, "step_halt_logits": halts, "logits": logits[:, -1], "steps_used": tf.zeros([tf.shape(tokens)[0]])}
        per, m = chain_loss({"answers": answers, "steps": steps}, out)
        if args.exact_k:  # Fan et al.: the answer after exactly k iterations only (+ halting)
            at_k = tf.gather(logits, steps - 1, batch_dims=1)
            ce = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=answers, logits=at_k), 1)
            it = tf.range(1, args.loops + 1)[None]
            hl = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=tf.cast(it >= steps[:, None], tf.float32), logits=halts), 1)
            per = ce + 0.5 * hl
        if args.still:  # the state should stop moving once the answer is due: a fixed point after k
            after = tf.cast(tf.range(1, args.loops + 1)[None] > steps[:, None], tf.float32)
            per = per + args.still * tf.reduce_sum(moves * after, 1) / tf.maximum(tf.reduce_sum(after, 1), 1.0)
        loss = tf.reduce_mean(per)
    g = tape.gradient(loss, model.trainable_variables)
    opt.apply_gradients(zip(g, model.trainable_variables))
    return loss, tf.reduce_mean(m["exact_match"])

rng = np.random.default_rng(args.seed)
def train_batch(i):
    top = args.train_max if i >= args.curriculum else min(args.train_max, 1 + int(args.train_max * i / args.curriculum))
    x, y = chains.generate_batch(args.task, rng.integers(1, top + 1, size=args.batch), rng, A, pad_train)
    return x["tokens"], y["answers"], y["steps"]
t0 = time.time()
if args.load:
    model(tf.constant(train_batch(0)[0]), loops=1)
    model.load_weights(args.load); args.steps = 0
for i in range(args.steps):
    loss, em = train_step(*train_batch(i))
    if i % 100 == 0 or i == args.steps - 1:
        print(f"step {i} loss {float(loss):.4f} em(last loop) {float(em):.3f} {time.time()-t0:.0f}s", flush=True)
train_time = time.time() - t0
if args.save:
    model.save_weights(args.save)
model.return_deltas = True

@tf.function(jit_compile=True, reduce_retracing=True)
def infer(tokens, loops):
    return model(tokens, loops=loops, training=False)

res = {}
for k in [int(v) for v in args.tests.split(",")]:
    (x, y), = chains.fixed_length_batches(args.task, k, args.eval_n, args.eval_n, answer_length=A, seed=1)
    L = 2 * k + 4
    logits, halts, deltas = infer(tf.constant(x["tokens"]), L)
    deltas = deltas.numpy()
    pred = tf.argmax(logits, -1, output_type=tf.int32).numpy()  # [B, L, A]
    right = (pred == y["answers"][:, None, :]).all(-1)  # [B, L]
    halted = tf.sigmoid(halts).numpy() > 0.5
    stop = np.where(halted.any(1), halted.argmax(1), L - 1)
    em_halt = right[np.arange(len(stop)), stop].mean()
    res[k] = dict(halt=round(float(em_halt), 3), at_k=round(float(right[:, k - 1].mean()), 3), at_2k=round(float(right[:, 2 * k - 1].mean()), 3),
                  steps_pm1=round(float((np.abs(stop + 1 - k) <= 1).mean()), 3))
    for eps in (0.003, 0.01, 0.03):  # fixed-point rule: stop at the first iteration whose state barely moved
        still = deltas < eps
        fp_stop = np.where(still.any(1), still.argmax(1), L - 1)
        res[k][f"fp{eps}"] = round(float(right[np.arange(len(fp_stop)), fp_stop].mean()), 3)
        res[k][f"fp{eps}_steps"] = round(float(np.mean(fp_stop + 1)), 1)
    res[k]["delta_at_k,2k"] = [round(float(np.median(deltas[:, k - 1])), 4), round(float(np.median(deltas[:, 2 * k - 1])), 4)]
    print(k, res[k], flush=True)
print(json.dumps({"args": vars(args), "train_s": round(train_time), "res": res}))
if args.out:
    with open(args.out, "a") as f: f.write(json.dumps({"args": vars(args), "train_s": round(train_time), "res": res}) + "\n")
