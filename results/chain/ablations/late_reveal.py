"""Does a chain resolved late, amid clauses settled for many iterations, lose accuracy? Lego problems of
k = K (no negation, as the recipe); phase 1: N iterations on the text with the queried chain's clause at depth 2
renamed (the chain below it cannot resolve, everything above it settles); phase 2: from that state, K + 2 / K + 6
/ K + 12 iterations on the real text, the answer read then (N = 0: the model as it always runs).
  python late_reveal.py <workdir> <K> <problems> <N,N,...>     (results/chain/README.md: K = 8, 128, 0,8,16,32)
The loop is run here step by step (the model's inference path, copied: call() always starts from zeros)."""
import sys
import numpy as np
import tensorflow as tf
from tfmstep import saving
from tfmstep.data import chains
from tfmstep.models.chain_transformer import model as cm

workdir, K, P, Ns = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), [int(n) for n in sys.argv[4].split(",")]
model, config, _ = saving.load_trained(workdir)
c = model.config
assert c.looped and c.value_feedback and c.readout != "attention" and not c.prelude_layers, \
    "the copied inference path covers the lego recipe's options only"


def forward_parts(tokens):
    key_mask = tokens != chains.PAD
    length = tf.shape(tokens)[1]
    batch = tf.shape(tokens)[0]
    positions = tf.range(length)
    relative_self = tf.expand_dims(tf.expand_dims(positions, 0) - tf.expand_dims(positions, 1), 0)
    count = tf.reduce_sum(tf.cast(key_mask, tf.float32), axis=1)
    log_tokens = tf.reshape(tf.math.log(tf.maximum(count, 2.0)), [batch, 1, 1, 1]) if c.length_scaled_softmax \
        else tf.fill([batch, 1, 1, 1], cm.FIXED_LOG_TOKENS)
    reach = model.reach_mask(relative_self)
    same = cm.same_token_mask(tokens, c.start_token) if c.token_match else None

    def bias_of(block):
        b = block.position_bias(relative_self)
        if c.token_match:
            b += tf.cast(block.match_bias(same) * (log_tokens / cm.FIXED_LOG_TOKENS), b.dtype)
        return b if reach is None else b + tf.cast(reach, b.dtype)
    h = model.embedding(tokens)
    if c.start_token:
        first = tf.reshape(tf.cast(positions == 0, h.dtype), [1, length, 1])
        h = h * (1 - first) + tf.cast(model.start_vector, h.dtype) * first
    if c.conv_kernel:
        h = model.conv_norm(h + model.conv_out(model.conv(cm.zero_padding(h, key_mask))))
    return h, [bias_of(b) for b in model.core], key_mask, log_tokens


def run(tokens, state, n):
    injected, biases, key_mask, log_tokens = forward_parts(tokens)
    if state is None:
        state = tf.zeros_like(injected)
    emb = model.embedding.embeddings[:c.num_classes]
    for _ in range(n):
        x = state + injected
        probs = tf.nn.softmax(model.head(model.head_norm(state)))
        x += tf.einsum("btc,cw->btw", probs, emb)
        h = model.core[0](x if c.residual_state else injected, x, biases[0], key_mask, log_tokens)
        for block, b in zip(model.core[1:], biases[1:]):
            h = block(h, h, b, key_mask, log_tokens)
        state = h
    return state


def answers(tokens, state):
    pos = model.answer_positions(tokens)
    q = tf.gather(state, pos, batch_dims=1)
    out = model.head_norm(q + model.slot_mlp_out(model.slot_mlp_in(q)))
    return np.argmax(model.head(out).numpy(), -1)[:, 0]


rng = np.random.default_rng(5)
J = 2  # the chain clause at this depth is renamed in phase 1: the chain below it cannot resolve
real, hidden, truth = [], [], []
for _ in range(P):
    text, answer = chains.generate_problem("lego", K, rng, negation_rate=0)
    body, query = text.rsplit("?", 1)
    clauses = [x for x in body.split(";") if x]
    parent = {x.split("=")[0]: x.split("=")[1][1] for x in clauses if not x.split("=")[1].isdigit()}
    chain = [query]
    while chain[-1] in parent:
        chain.append(parent[chain[-1]])
    target = chain[::-1][J]  # depth J
    used = {x.split("=")[0] for x in clauses}
    spare = next(n for n in chains.NAMES if n not in used)
    hid = text.replace(";" + target + "=", ";" + spare + "=") if (";" + target + "=") in text \
        else spare + text[1:]
    assert hid != text and len(hid) == len(text)
    real.append(text); hidden.append(hid); truth.append(chains.encode(answer, "answer")[0])

width = max(len(t) for t in real) + c.answers
def ids(texts):
    t = tf.constant(np.array([chains.pad_problem(chains.problem_ids(t, c.answers), width, c.answers)
                              for t in texts], np.int32))
    return tf.pad(t, [[0, 0], [1, 0]], constant_values=chains.FIRST_CHAR_ID) if c.start_token else t
real_ids, hidden_ids = ids(real), ids(hidden)
truth = np.array(truth)
# The copied loop must be the model's own: from zeros it answers as call() does.
reference = model({"tokens": real_ids[:, 1:] if c.start_token else real_ids}, training=False, num_loops=K + 2,
                  use_halting=False)["logits"].numpy().argmax(-1)[:, 0]
assert (answers(real_ids, run(real_ids, None, K + 2)) == reference).all(), "the copied inference path differs"
print(f"lego K={K}, {P} problems (chain clause at depth {J} hidden first), text {width} tokens; {workdir}")
for N in Ns:
    state = run(hidden_ids, None, N) if N else None
    accs = []
    for more in (K + 2, 4, 6):  # read after K + 2, K + 6 and K + 12 iterations, each run once
        state = run(real_ids, state, more)
        accs.append((answers(real_ids, state) == truth).mean())
    print(f"N={N:3d} hidden iterations first: accuracy after K+2/K+6/K+12 more = "
          + " / ".join(f"{a:.3f}" for a in accs), flush=True)
