"""Chain reasoner: a looped Transformer that reads a problem as plain tokens and answers at the end.

    tokens [B, T] -> [start vector] + prelude (a few blocks: parses the text locally) -> e
    state_0 = 0;  state_t = core(state_{t-1} + e)        (one weight-shared block, input injection;
                                                          core_layers > 1: that many blocks in turn)
    (residual_state=False: state_t = core(queries e, context state_{t-1} + e), each token recomputed)
    answers_t, halt_t = readout(state_t at the answer slots)

A problem of k steps needs about k iterations of the core. By default every head is causal and local
(it sees itself and the token before it), so one iteration is a per-token state machine that moves
information one token along: nothing in it depends on absolute position or on the problem's length, and
a problem four times longer than any trained one looks locally the same. ``global_heads`` keep some
heads global, for dependencies found by content (names, pointers), which ``window=0, causal=False``
gives every head. Every attention also has a clipped learned relative-position bias and learned
per-head distance slopes in each direction (ALiBi-like; they let a global head prefer "the most recent
match before me"), and, with ``length_scaled_softmax``, logits that grow with log(tokens).

For lookups by name (clauses shuffled, so a parent is found by matching its name), ``token_match`` gives
every attention a learned bonus for another occurrence of the query's own token, and convolutions
(``conv_kernel`` over the embeddings, ``block_conv_kernel`` inside each block after the attention) carry
what a name looked up across its clause within the iteration: one iteration per step, with no positions
at all (models/chain_lookup.flags).

Training runs ``train_loops`` iterations and supervises only the answers: with the chain length k of an
example known (a generator knows it), the answer after every iteration t >= k (so it is found by
iteration k and stays put after, which is what makes extra loops harmless) and a halting head, read
where the answers are (the pooled answer-slot state), taught "t >= k". Without k (a user file that
gives none) the answer after the last iteration, and halting taught "the answer is right by now". At
inference each problem stops at the first iteration whose halting probability passes
``halt_threshold`` -- or, with ``halting="fixed_point"``, whose state stopped moving (a confidence
rule, which ``fixed_point_weight`` trains for by pricing the state's change after k) -- at most
``max_loops``, and reports it as ``steps_used`` (fixed point: the iterations until the state settled,
not the one more that saw it settle); k is never an input. ``halt_confidence`` adds a
confidence rule to either: wait until every answer slot's top class is that probable.

``looped=False`` is the baseline: the same prelude and readout around ``layers`` distinct blocks run
once. The attention is written out (not keras-hub's TransformerEncoder) because it needs the relative
bias, the distance slopes, the reach mask and the length-scaled softmax inside the logits.
"""

from __future__ import annotations

import dataclasses
import os

import keras
import numpy as np
import tensorflow as tf

from tfmstep.data import chains
from tfmstep.errors import UserError

HALT_WEIGHT = 0.5  # halting loss relative to the answer loss
READOUTS = ("slot", "attention")
HALTING_RULES = ("learned", "ready", "fixed_point")
FIXED_LOG_TOKENS = float(np.log(30.0))  # the softmax scale without length scaling (its init is 1 here)
# How a trained model runs (its weights do not depend on these): what evaluation may override.
INFERENCE_FIELDS = ("halting", "max_loops", "halt_threshold", "fixed_point_tolerance", "halt_confidence")


@dataclasses.dataclass(frozen=True)
class ChainConfig:
    # Task: a generated family, or "file" (JSONL lines {"input", "answer", "steps"?}).
    task: str = "lego"  # lego | parity | pointer | kinship | registers | reassign | file
    train_file: str = ""
    test_file: str = ""
    # How a problem's text becomes ids: "char" (one per character), or "sentencepiece" (file tasks: pieces
    # of a vocabulary trained on the train file's inputs and written to vocab_file if it is missing).
    # Answers are characters either way.
    tokenizer: str = "char"
    vocab_file: str = ""
    vocab_size: int = 512  # sentencepiece pieces (256 byte pieces + specials + every character, then merges)
    # 0 adds zero-step problems (the lookup alone: pointer "a=3;b=1;?a"), which is how a model first learns
    # to read an answer when no shortcut leads there; validation and the card still count k >= 1.
    train_min_len: int = 1
    train_max_len: int = 8
    test_max_len: int = 32  # longest chain of the generated "test" split
    modulus: int = 5  # answer classes of lego, pointer labels and reassign values
    answer_length: int = 0  # answer slots A (0: the task's own; file tasks: the longest answer allowed, 8)
    max_tokens: int = 1024  # longest tokenised problem (text + answer slots) accepted
    eval_examples: int = 512
    curriculum_steps: int = 0  # training steps over which the longest trained k rises to train_max_len
    # Or the curriculum in stages, "top:steps,...": k up to each top for that many steps (then up to
    # train_max_len), each stage's problems padded to its top. A fixed schedule rather than "move on
    # once training is exact" keeps batch b a function of (seed, b), which exact resume rests on.
    # Lego without negation, the same schedule in separate runs ("1:600,2:2400,3:1200,5:1200", then
    # k <= 8 for 1200): 0.75 at k = 16 (results/chain/README.md).
    curriculum_stages: str = ""
    # lego: no negated clauses ("b=-a+1") in the first half of these training steps, then their share rises
    # to negation_rate (measured on the generator before its distractor clauses -- results/chain/README.md).
    negation_curriculum_steps: int = 0
    # lego: the share of negated clauses in every split (0: x = parent + c only, the cyclic group Z5).
    negation_rate: float = chains.LEGO_NEGATION_RATE
    # registers: the share of copies ("C=A", "B=7") among training instructions; validation and test keep
    # the generator's own third, so scores compare across recipes. A digit copy resets the depth of the value
    # it writes (the sums and differences it has been through), and errors grow with that depth
    # (results/chain/README.md, "Fewer copies in training").
    train_copy_rate: float = chains.REGISTERS_COPY_RATE
    # lego, reassign: training problems get m times the generator's distractor clauses, m uniform in 1..this,
    # so the lookup is trained on texts as long as the tested chains' (1: the generator's own problems).
    train_distractor_scale: int = 1
    # Training batches in groups of this many, each group sorted by text length and every batch padded to
    # the shortest of as many evenly spaced lengths that holds it (1: each batch padded to its stage's
    # longest text, or a file task's longest line). A step's cost grows with its padded length, and a
    # stage's texts average well under its longest (reassign with train_distractor_scale=3: 77 of 195
    # tokens at k <= 8).
    train_length_buckets: int = 1
    # Model.
    looped: bool = True  # False: the stacked baseline
    width: int = 64
    heads: int = 4
    mlp_dim: int = 256
    prelude_layers: int = 2
    # A convolution over the embeddings before the prelude (0: none): each token then holds exactly its
    # +-conv_kernel//2 neighbours (the conv_kernel - 1 before it, when causal), so a clause such as
    # "b>c;" is parsed into every one of its tokens at once; attention blurs positions, a kernel does not.
    conv_kernel: int = 0
    # A convolution sublayer of this kernel in every self-attention block (prelude, core, stack; 0: none),
    # so one iteration also moves what a token learnt across its clause: a lookup answered at one token
    # of "b>c;" reaches b's own token in the same iteration.
    block_conv_kernel: int = 0
    # A learned per-head logit bonus for a key that is another occurrence of the query's own token: the
    # "same name" primitive every lookup by name rests on, given rather than learnt from random weights
    # (pointer, k = 1: random query/key weights sat at the 85% a model reaches without matching names).
    token_match: float = 0.0  # the bonus's initial value (0: no bonus)
    # Iterations beyond k before the answer is due (training: answers, halting and the settling cost are
    # counted from iteration k + answer_lag): a lookup model needs one more than k hops, to bring the
    # answer from the queried clause to its slot.
    answer_lag: int = 0
    # True: an iteration adds to each token's state (state_t = core(state_{t-1} + e)). False: it recomputes
    # each token from its input alone plus what it attends to in the previous state (queries e, context
    # state_{t-1} + e): a synchronous fixed-point update, where a value computed from a stale parent is
    # replaced once the parent is right and, once every value is, another iteration changes nothing
    # (pointer: 2x loops forced keep k = 24 exact; kinship learned slower with it -- results/chain/README.md).
    residual_state: bool = True
    layers: int = 4  # distinct blocks between prelude and coda in the baseline
    # Distinct blocks one iteration applies in turn (looped only): the step as a deeper function of the
    # state, while the loop still ties one iteration to one step.
    core_layers: int = 1
    train_loops: int = 0  # core iterations in training (0: 2 x train_max_len, so 2x loops are trained)
    max_loops: int = 128  # inference cap; halting usually stops at about k
    halt_threshold: float = 0.5
    # Stopping at inference: "fixed_point" (the state stopped moving: no token's mean |change| over an
    # iteration reaches fixed_point_tolerance) or "learned" (the halting head passes halt_threshold), or
    # "ready": the halting head gives each answer slot one more class, "not yet", beside the answers, and a
    # problem stops once every slot's answers outweigh it (P(not yet) < 1 - halt_threshold); the same
    # halting loss then also teaches a slot to hold no confident answer before its answer is due.
    # Parity in the ablation harness (1500 steps, trained k <= 8): fixed point 0.98 / 0.94 exact match at
    # k = 16 / 32, learned 0.46 / 0.57.
    halting: str = "fixed_point"
    fixed_point_tolerance: float = 0.01
    # A confidence rule on top of either: also wait until every answer slot's top class has at least this
    # probability (0: off). Pointer at k = 16 (trained k <= 8): the learned head stopped at k + 1 on
    # problems whose answer was still arriving (top probability ~0.8, right two iterations later).
    halt_confidence: float = 0.0
    # Training cost of the state's mean |change| per iteration after iteration k, which teaches the loop
    # to settle once the answer is due (what the fixed-point rule reads); 0: none (lego / kinship: k = 16 at
    # 0.16 / 0.15 against 0.54 / 0.39 with it, though a clause deeper than k is charged too -- results/chain/README.md).
    fixed_point_weight: float = 0.5
    relative_clip: int = 8  # relative offsets beyond +-clip share one learned bias (plus the slopes)
    # Attention reach of the prelude and core (the stack, in the baseline). All heads but `global_heads`
    # are local: they see tokens within +-window (0: any distance) and, if causal, none after their own.
    # Causal local heads make an iteration a per-token state machine, state_i = f(token_i, state_{i-1}),
    # which looks the same on any length (parity, 3000 steps: 0.98 / 0.84 exact match at 1.5x / 2x the
    # trained length, against chance for global attention; results/chain/ablations/). Global heads are
    # for what is found by content (names, pointers).
    window: int = 1
    causal: bool = True
    # False: the convolutions see both sides even when the heads are causal, so a statement is parsed into
    # every one of its tokens while a read still finds only what came before it (reassign: "a=b+2;").
    causal_convolutions: bool = True
    global_heads: int = 0
    start_token: bool = True  # a learned vector before the first token, so the first one has a "previous"
    length_scaled_softmax: bool = False  # logits times log(tokens) (Scalable-Softmax); off: a fixed log(30)
    # Answers read by "slot": an MLP on each answer slot's own state (what causal local heads carry there),
    # or "attention": a coda block whose answer-slot queries attend over the whole state.
    readout: str = "slot"
    # Each iteration also reads every token's answer-head distribution from the last one, embedded as the
    # input embeds those characters, so a value the loop computed reaches the next step in the form a
    # written digit has (lego, no negation, k <= 2 after 1500 steps: k = 2 at 0.94 exact, 0.73 without;
    # once both fit k = 2, k = 3 was no better: 0.38 against 0.45 -- results/chain/README.md).
    value_feedback: bool = False
    dropout: float = 0.0

    def __post_init__(self):
        if self.task not in chains.TASKS + (chains.FILE_TASK,):
            raise UserError(f"unknown chain task {self.task!r}; choose one of "
                            f"{', '.join(chains.TASKS + (chains.FILE_TASK,))}")
        if self.tokenizer not in ("char", "sentencepiece"):
            raise UserError(f"unknown tokenizer {self.tokenizer!r}; choose char or sentencepiece")
        if self.tokenizer == "sentencepiece":
            if self.task != chains.FILE_TASK:
                raise UserError("tokenizer=sentencepiece is for task=file (the generated tasks are "
                                "character problems)")
            if not self.vocab_file:
                raise UserError("tokenizer=sentencepiece needs vocab_file, e.g. "
                                "--config=vocab_file=<workdir>/vocab.spm (trained there if missing)")
            if self.vocab_size < 260:
                raise UserError(f"tokenizer=sentencepiece needs vocab_size >= 260, got {self.vocab_size}")
        if self.train_min_len < 0 or self.test_max_len < 1:
            raise UserError("train_min_len must be >= 0 and test_max_len >= 1")
        if self.task in chains.TASKS and self.train_min_len < chains.min_chain_length(self.task):
            raise UserError(f"task {self.task!r} has no zero-step problems: train_min_len must be >= "
                            f"{chains.min_chain_length(self.task)}")
        if self.train_max_len < self.train_min_len:
            raise UserError(f"train_max_len ({self.train_max_len}) must be >= train_min_len "
                            f"({self.train_min_len})")
        if self.modulus < 2 or self.modulus > 10:
            raise UserError(f"modulus must be in 2..10 (answers are digits), got {self.modulus}")
        if not 0 <= self.answer_length <= chains.MAX_ANSWER_LENGTH:
            raise UserError(f"answer_length must be in 0..{chains.MAX_ANSWER_LENGTH}, got {self.answer_length}")
        if self.task in chains.TASKS:
            longest = max(self.train_max_len, self.test_max_len)
            limit = chains.max_chain_length(self.task)
            if limit is not None and longest > limit:
                raise UserError(f"task {self.task!r} has {len(chains.NAMES)} names: chain lengths up to "
                                f"{limit} (got {longest})")
        if min(self.width, self.heads, self.mlp_dim, self.layers, self.max_loops, self.core_layers) < 1 or \
                self.prelude_layers < 0:
            raise UserError("width, heads, mlp_dim, layers, core_layers and max_loops must be >= 1, "
                            "prelude_layers >= 0")
        if self.core_layers > 1 and not self.looped:
            raise UserError(f"core_layers={self.core_layers} is for the looped model; the stacked baseline "
                            f"sets its depth with layers")
        if self.width % self.heads:
            raise UserError(f"width ({self.width}) must be divisible by heads ({self.heads})")
        if self.curriculum_steps < 0:
            raise UserError(f"curriculum_steps must be >= 0, got {self.curriculum_steps}")
        stages = self.stages  # parsed here so a malformed schedule is refused before anything runs
        if stages and (self.curriculum_steps or self.task == chains.FILE_TASK):
            raise UserError("curriculum_stages is for generated tasks, without curriculum_steps")
        tops = [top for top, _ in stages]
        if any(b <= a for a, b in zip(tops, tops[1:])) or any(
                not self.train_min_len <= top <= self.train_max_len for top in tops):
            raise UserError(f"curriculum_stages tops must rise within train_min_len..train_max_len "
                            f"({self.train_min_len}..{self.train_max_len}), got {self.curriculum_stages!r}")
        if self.negation_curriculum_steps < 0 or (self.negation_curriculum_steps and self.task != "lego"):
            raise UserError(f"negation_curriculum_steps must be >= 0 and applies to task 'lego' only, got "
                            f"{self.negation_curriculum_steps} for task {self.task!r}")
        if not 0.0 <= self.negation_rate <= 1.0 or (self.negation_rate != chains.LEGO_NEGATION_RATE
                                                    and self.task != "lego"):
            raise UserError(f"negation_rate must be in [0, 1] and applies to task 'lego' only, got "
                            f"{self.negation_rate} for task {self.task!r}")
        if not 0.0 <= self.train_copy_rate <= 1.0 or (self.train_copy_rate != chains.REGISTERS_COPY_RATE
                                                      and self.task != "registers"):
            raise UserError(f"train_copy_rate must be in [0, 1] and applies to task 'registers' only, got "
                            f"{self.train_copy_rate} for task {self.task!r}")
        if self.train_distractor_scale < 1 or (self.train_distractor_scale != 1
                                               and self.task not in chains.DISTRACTOR_SCALE_TASKS):
            raise UserError(f"train_distractor_scale must be >= 1 and applies to tasks "
                            f"{', '.join(chains.DISTRACTOR_SCALE_TASKS)} only, got {self.train_distractor_scale} "
                            f"for task {self.task!r}")
        if self.train_length_buckets < 1:
            raise UserError(f"train_length_buckets must be >= 1, got {self.train_length_buckets}")
        if self.task == "lego" and chains.names_needed("lego", self.train_max_len,
                                                       self.train_distractor_scale) > len(chains.NAMES):
            raise UserError(f"train_distractor_scale={self.train_distractor_scale} at train_max_len="
                            f"{self.train_max_len} needs more than the {len(chains.NAMES)} names a lego problem "
                            f"can use")
        if self.answer_lag < 0:
            raise UserError(f"answer_lag must be >= 0, got {self.answer_lag}")
        if self.train_loops < 0:
            raise UserError(f"train_loops must be >= 0, got {self.train_loops}")
        if self.looped and self.task != chains.FILE_TASK and self.loops_in_training < self.train_max_len:
            raise UserError(f"train_loops={self.train_loops} is fewer than train_max_len={self.train_max_len}: "
                            f"one iteration resolves about one step")
        for name in ("conv_kernel", "block_conv_kernel"):
            kernel = getattr(self, name)
            if kernel < 0 or (kernel and not self.convolutions_causal and kernel % 2 == 0):
                raise UserError(f"{name} must be 0 or >= 1 (odd unless the convolutions are causal), got {kernel}")
        if self.window < 0:
            raise UserError(f"window must be >= 0 (0: attention at any distance), got {self.window}")
        if not 0 <= self.global_heads <= self.heads:
            raise UserError(f"global_heads must be in 0..heads={self.heads}, got {self.global_heads}")
        if self.readout not in READOUTS:
            raise UserError(f"unknown readout {self.readout!r}; choose one of {', '.join(READOUTS)}")
        if self.halting not in HALTING_RULES:
            raise UserError(f"unknown halting {self.halting!r}; choose one of {', '.join(HALTING_RULES)}")
        if self.fixed_point_tolerance <= 0 or self.fixed_point_weight < 0:
            raise UserError(f"fixed_point_tolerance must be > 0 and fixed_point_weight >= 0, got "
                            f"{self.fixed_point_tolerance} and {self.fixed_point_weight}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.halt_confidence < 1.0:
            raise UserError(f"halt_confidence must be in [0, 1), got {self.halt_confidence}")
        if not 0.0 < self.halt_threshold < 1.0:
            raise UserError(f"halt_threshold must be in (0, 1), got {self.halt_threshold}")

    @property
    def answers(self) -> int:
        """Answer slots A (the output's second axis)."""
        if self.answer_length:
            return self.answer_length
        return chains.ANSWER_LENGTH.get(self.task, chains.MAX_ANSWER_LENGTH)

    @property
    def generator_options(self) -> dict:
        """What the task's generator is given besides k (the modulus; lego also its negation rate)."""
        return {"modulus": self.modulus, **({"negation_rate": self.negation_rate} if self.task == "lego" else {})}

    @property
    def stages(self) -> tuple:
        """curriculum_stages as ((top, steps), ...)."""
        if not self.curriculum_stages.strip():
            return ()
        stages = []
        for part in self.curriculum_stages.split(","):
            try:
                top, steps = (int(x) for x in part.split(":"))
            except ValueError:
                raise UserError(f"curriculum_stages is 'top:steps,...' (e.g. '1:600,2:2400'), got "
                                f"{self.curriculum_stages!r}") from None
            if steps < 1:
                raise UserError(f"curriculum_stages: each stage needs >= 1 step, got {part!r}")
            stages.append((top, steps))
        return tuple(stages)

    @property
    def convolutions_causal(self) -> bool:
        return self.causal and self.causal_convolutions

    @property
    def loops_in_training(self) -> int:
        return self.train_loops or 2 * self.train_max_len

    @property
    def num_classes(self) -> int:
        return chains.VOCAB_SIZE  # answers are character ids (PAD = an unused slot)

    @property
    def input_vocab_size(self) -> int:
        """Token ids the model reads: characters (and answer slots, PAD), plus the pieces."""
        return chains.VOCAB_SIZE + (self.vocab_size if self.tokenizer == "sentencepiece" else 0)


def chain_tokenizer(config: ChainConfig, check_against_train_file: bool = False):
    """The problem tokenizer of ``config``: ``chains.CHARS``, or the SentencePiece vocabulary in vocab_file
    (trained on the train file's inputs when missing; checked against them when asked, as training does)."""
    if config.tokenizer != "sentencepiece":
        return chains.CHARS
    train_text = b""
    if check_against_train_file or not os.path.exists(config.vocab_file):
        problems = chains.read_jsonl(config.train_file, answer_length=config.answers, max_tokens=None)
        train_text = "\n".join(text for text, _, _ in problems).encode("utf-8")
    from tfmstep.data import text as text_data

    return chains.PieceTokenizer(text_data.load_or_train_sentencepiece(
        config.vocab_file, config.vocab_size, train_text, config.train_file))


def conv_layers(width, mlp_dim, kernel, causal, prefix=""):
    """(norm, conv, out) of a convolution sublayer: LayerNorm, Conv1D width -> mlp_dim (GELU), Dense back."""
    return (keras.layers.LayerNormalization(epsilon=1e-5, name=f"{prefix}conv_norm"),
            keras.layers.Conv1D(mlp_dim, kernel, padding="causal" if causal else "same", activation="gelu",
                                name=f"{prefix}conv"),
            keras.layers.Dense(width, name=f"{prefix}conv_out"))


def build_conv_layers(norm, conv, out, width, mlp_dim):
    norm.build((None, None, width))
    conv.build((None, None, width))
    out.build((None, None, mlp_dim))


def zero_padding(h, key_mask):
    """h [B, T, W] with PAD positions zeroed: what a convolution sees past a problem's end is then the same
    whether the batch pads it or the sequence simply ends (zeros either way)."""
    return h * tf.expand_dims(tf.cast(key_mask, h.dtype), -1)


def same_token_mask(tokens, start_token: bool):
    """tokens [B, T] -> [B, 1, T, T] float: 1 where key j is another occurrence of query i's token (j != i,
    neither PAD; with ``start_token``, column 0 is the start placeholder, which matches nothing)."""
    ids = tf.where(tokens == chains.PAD, -2 - tf.range(tf.shape(tokens)[1])[None, :], tokens)  # PADs all differ
    if start_token:  # the placeholder shares its id with a character
        ids = tf.concat([tf.fill([tf.shape(tokens)[0], 1], -1), ids[:, 1:]], axis=1)
    length = tf.shape(tokens)[1]
    other = tf.expand_dims(tf.range(length), 0) != tf.expand_dims(tf.range(length), 1)
    return tf.expand_dims(tf.cast((tf.expand_dims(ids, 2) == tf.expand_dims(ids, 1)) & other, tf.float32), 1)


@keras.saving.register_keras_serializable("tfmstep")
class Block(keras.layers.Layer):
    """Pre-LN Transformer block (queries attend over a context) with relative-position bias, distance
    slopes and a length-scaled softmax, ending in a LayerNorm so that many more iterations than trained
    keep the state in range."""

    def __init__(self, width, heads, mlp_dim, dropout=0.0, relative_clip=8, conv_kernel=0, causal=False,
                 token_match=0.0, **kwargs):
        super().__init__(**kwargs)
        self.width, self.heads, self.mlp_dim = width, heads, mlp_dim
        self.rate, self.clip = dropout, relative_clip
        self.conv_kernel, self.causal, self.token_match = conv_kernel, causal, token_match
        if conv_kernel:  # a convolution sublayer after the attention (self-attention blocks only)
            self.conv_norm, self.conv, self.conv_out = conv_layers(width, mlp_dim, conv_kernel, causal)
        self.attn_norm = keras.layers.LayerNormalization(epsilon=1e-5, name="attn_norm")
        self.query = keras.layers.Dense(width, name="query")
        self.key_value = keras.layers.Dense(2 * width, name="key_value")
        self.attn_out = keras.layers.Dense(width, name="attn_out")
        self.mlp_norm = keras.layers.LayerNormalization(epsilon=1e-5, name="mlp_norm")
        self.mlp_in = keras.layers.Dense(mlp_dim, activation="gelu", name="mlp_in")
        self.mlp_out = keras.layers.Dense(width, name="mlp_out")
        self.state_norm = keras.layers.LayerNormalization(epsilon=1e-5, name="state_norm")
        self.dropout = keras.layers.Dropout(dropout)

    def get_config(self):
        return {**super().get_config(), "width": self.width, "heads": self.heads, "mlp_dim": self.mlp_dim,
                "dropout": self.rate, "relative_clip": self.clip,
                "conv_kernel": self.conv_kernel, "causal": self.causal, "token_match": self.token_match}

    def build(self, input_shape=None):
        self.relative_bias = self.add_weight(shape=(2 * self.clip + 1, self.heads), initializer="zeros",
                                             name="relative_bias")
        # softplus(-5) ~ 0.007 per token: distance barely matters until a head learns that it should.
        # (ALiBi's geometric 1, 1/4, 1/16, ... start made parity's extra loops drift: 0.58 vs 0.97
        # exact match at k=8 with 2x loops forced.)
        self.distance_slopes = self.add_weight(shape=(2, self.heads), name="distance_slopes",
                                               initializer=keras.initializers.Constant(-5.0))
        # Scalable softmax: logits grow with log(tokens), so attention stays as sharp on a problem four
        # times longer than any trained one (initialised to 1 at about 30 tokens).
        self.length_scale = self.add_weight(shape=(self.heads,), name="length_scale",
                                            initializer=keras.initializers.Constant(1 / np.log(30.0)))
        for layer in (self.attn_norm, self.query, self.key_value, self.attn_out, self.mlp_norm,
                      self.mlp_in, self.state_norm):
            layer.build((None, None, self.width))
        self.mlp_out.build((None, None, self.mlp_dim))
        if self.conv_kernel:
            build_conv_layers(self.conv_norm, self.conv, self.conv_out, self.width, self.mlp_dim)
        if self.token_match:  # per-head logit bonus for a key that is another occurrence of the query's token
            self.match_weight = self.add_weight(shape=(self.heads,), name="match_weight",
                                                initializer=keras.initializers.Constant(self.token_match))
        self.built = True

    def position_bias(self, relative):
        """relative [N, Tq, T] int (key position - query position) -> additive logits [N, H, Tq, T]."""
        index = tf.clip_by_value(relative, -self.clip, self.clip) + self.clip
        table = tf.gather(self.relative_bias, index)  # [N, Tq, T, H]
        distance = tf.expand_dims(tf.cast(relative, table.dtype), -1)
        slopes = tf.nn.softplus(tf.cast(self.distance_slopes, table.dtype))
        table -= tf.nn.relu(-distance) * slopes[0] + tf.nn.relu(distance) * slopes[1]
        return tf.transpose(table, [0, 3, 1, 2])

    def match_bias(self, same_token):
        """same_token [B, 1, T, T] (1 where key j holds the query i's token, j != i) -> [B, H, T, T]."""
        return same_token * tf.reshape(tf.cast(self.match_weight, same_token.dtype), [1, self.heads, 1, 1])

    def call(self, queries, context, bias, key_mask, log_tokens, training=False):
        batch, q_len, k_len = tf.shape(queries)[0], tf.shape(queries)[1], tf.shape(context)[1]
        head_dim = self.width // self.heads
        q = tf.reshape(self.query(self.attn_norm(queries)), [batch, q_len, self.heads, head_dim])
        kv = tf.reshape(self.key_value(self.attn_norm(context)), [batch, k_len, 2, self.heads, head_dim])
        k, v = tf.unstack(kv, axis=2)
        scores = tf.einsum("bqhd,bkhd->bhqk", q, k) * (head_dim ** -0.5)
        scores = scores * (tf.reshape(tf.cast(self.length_scale, scores.dtype), [1, self.heads, 1, 1])
                           * tf.cast(log_tokens, scores.dtype)) + tf.cast(bias, scores.dtype)
        # Reshapes and expand_dims, never x[:, None]: a new-axis strided slice has no TF-Lite builtin.
        scores = tf.where(tf.reshape(key_mask, [batch, 1, 1, k_len]), scores, tf.cast(-1e9, scores.dtype))
        weights = tf.nn.softmax(scores, axis=-1)
        attended = tf.reshape(tf.einsum("bhqk,bkhd->bqhd", weights, v), [batch, q_len, self.width])
        h = queries + self.dropout(self.attn_out(attended), training=training)
        if self.conv_kernel:  # what a token just looked up reaches its neighbours in the same iteration
            h = h + self.dropout(self.conv_out(self.conv(zero_padding(self.conv_norm(h), key_mask))),
                                 training=training)
        h = h + self.dropout(self.mlp_out(self.mlp_in(self.mlp_norm(h))), training=training)
        return self.state_norm(h)


@keras.saving.register_keras_serializable("tfmstep")
class ChainTransformer(keras.Model):
    """inputs {"tokens" [B, T] int, optional "answer_mask" [B, T] bool} -> {"logits" [B, A, C],
    "halt_logits" [B], "steps_used" [B]} and, in training (or when asked), the per-iteration
    {"step_logits" [B, L, A, C], "step_halt_logits" [B, L]}."""

    def __init__(self, config: ChainConfig | dict | None = None, **kwargs):
        kwargs.setdefault("name", "chain_transformer")
        super().__init__(**kwargs)
        if isinstance(config, dict):
            config = ChainConfig(**config)
        self.config = c = config or ChainConfig()
        self.embedding = keras.layers.Embedding(
            c.input_vocab_size, c.width, name="token_embedding",
            embeddings_initializer=keras.initializers.RandomNormal(stddev=0.5))

        def block(name):
            return Block(c.width, c.heads, c.mlp_dim, c.dropout, c.relative_clip,
                         conv_kernel=c.block_conv_kernel, causal=c.convolutions_causal, token_match=c.token_match,
                         name=name)

        if c.conv_kernel:  # post-norm (after the residual), unlike the blocks' pre-norm sublayer
            self.conv_norm, self.conv, self.conv_out = conv_layers(c.width, c.mlp_dim, c.conv_kernel,
                                                                   c.convolutions_causal, prefix="prelude_")
        self.prelude = [block(f"prelude{i}") for i in range(c.prelude_layers)]
        if c.looped:  # the first keeps the name "core", so one-block checkpoints and presets still load
            self.core = [block("core")] + [block(f"core{i}") for i in range(1, c.core_layers)]
        else:
            self.core = [block(f"stack{i}") for i in range(c.layers)]
        if c.readout == "attention":
            self.coda = Block(c.width, c.heads, c.mlp_dim, c.dropout, c.relative_clip, name="coda")
        else:
            self.slot_mlp_in = keras.layers.Dense(c.mlp_dim, activation="gelu", name="slot_mlp_in")
            self.slot_mlp_out = keras.layers.Dense(c.width, name="slot_mlp_out")
        self.head_norm = keras.layers.LayerNormalization(epsilon=1e-5, name="head_norm")
        self.head = keras.layers.Dense(c.num_classes, name="answer_head")
        self.halt_head = keras.layers.Dense(1, name="halt_head")

    @property
    def input_dtype(self):
        """Token ids: what Keras converts array inputs to and types ``model.export()``'s signature with."""
        return "int32"

    def get_config(self):
        return {"config": dataclasses.asdict(self.config), "name": self.name}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """``model.fit`` after ``compile(optimizer)`` (no loss given) trains on the family loss, whose
        labels ({"answers", "steps"}) and per-iteration outputs no Keras built-in loss understands."""
        if self._compile_loss is not None or y is None:
            return super().compute_loss(x, y, y_pred, sample_weight, training)
        per_example, _ = chain_loss(y, y_pred)
        loss = tf.reduce_mean(per_example)
        if self.losses:
            loss += tf.add_n(self.losses)
        return loss

    def build(self, input_shape=None):
        c = self.config
        self.embedding.build((None, None))
        if c.start_token:
            self.start_vector = self.add_weight(shape=(c.width,), name="start_vector",
                                                initializer=keras.initializers.RandomNormal(stddev=0.5))
        if c.conv_kernel:
            build_conv_layers(self.conv_norm, self.conv, self.conv_out, c.width, c.mlp_dim)
        for layer in self.prelude + self.core:
            layer.build()
        if c.readout == "attention":
            self.coda.build()
        else:
            self.slot_mlp_in.build((None, None, c.width))
            self.slot_mlp_out.build((None, None, c.mlp_dim))
        for layer in (self.head_norm, self.head, self.halt_head):
            layer.build((None, None, c.width))
        self.built = True

    def reach_mask(self, relative):
        """[1, H, T, T] additive logits: -1e9 where a local head may not look (beyond +-window, or after
        itself when causal), 0 elsewhere and for the global heads; None when every head sees everything."""
        c = self.config
        if c.global_heads == c.heads or (not c.window and not c.causal):
            return None
        far = tf.zeros_like(relative, tf.bool)
        if c.window:
            far |= tf.abs(relative) > c.window
        if c.causal:
            far |= relative > 0
        local = tf.reshape(tf.range(c.heads) < c.heads - c.global_heads, [1, c.heads, 1, 1])
        return tf.where(tf.expand_dims(far, 1) & local, -1e9, 0.0)

    def answer(self, texts, max_loops: int | None = None):
        """Answers of problems given as text (the serving signature ``answer_text`` does the same in the
        graph): ``model.answer(["10110?"])`` -> (["1"], [5.0]), the answers and the loops each used."""
        if isinstance(texts, str):
            texts = [texts]
        tokenizer = chain_tokenizer(self.config)
        rows = [chains.problem_ids(text, self.config.answers, f"problem {i}", tokenizer)
                for i, text in enumerate(texts)]
        width = max(len(row) for row in rows)
        if width > self.config.max_tokens:
            raise UserError(f"a problem of {width} tokens (text + answer slots) is longer than max_tokens="
                            f"{self.config.max_tokens}")
        tokens = np.array([chains.pad_problem(row, width, self.config.answers) for row in rows], np.int32)
        outputs = self({"tokens": tf.constant(tokens)}, training=False, num_loops=max_loops)
        predicted = np.argmax(outputs["logits"].numpy(), -1)
        return [chains.decode(row) for row in predicted], outputs["steps_used"].numpy().tolist()

    def answer_positions(self, tokens, answer_mask=None):
        """[B, A] positions of the answer slots, in order: the marked positions, else the slot tokens."""
        if answer_mask is None:
            answer_mask = (tokens >= 1) & (tokens <= chains.MAX_ANSWER_LENGTH)
        length = tf.shape(tokens)[1]
        rank = tf.where(tf.cast(answer_mask, tf.bool), tf.expand_dims(length - tf.range(length), 0), 0)
        return tf.math.top_k(rank, k=self.config.answers).indices  # earliest first

    def call(self, inputs, training=False, num_loops=None, use_halting=None, return_steps=None):
        """``num_loops``: core iterations (looped only; default train_loops in training, else max_loops).
        ``use_halting``: stop each problem when it halts (default: not in training); off, exactly
        ``num_loops`` iterations run -- how the evaluation forces extra loops."""
        c = self.config
        tokens = tf.cast(inputs["tokens"], tf.int32)
        answer_mask = inputs.get("answer_mask")
        if c.start_token:  # a placeholder column (neither PAD nor a slot) whose embedding becomes start_vector
            tokens = tf.pad(tokens, [[0, 0], [1, 0]], constant_values=chains.FIRST_CHAR_ID)
            if answer_mask is not None:
                answer_mask = tf.pad(tf.cast(answer_mask, tf.bool), [[0, 0], [1, 0]])
        batch, length = tf.shape(tokens)[0], tf.shape(tokens)[1]
        key_mask = tokens != chains.PAD
        answer_pos = self.answer_positions(tokens, answer_mask)
        positions = tf.range(length)
        relative_self = tf.expand_dims(tf.expand_dims(positions, 0) - tf.expand_dims(positions, 1), 0)  # [1, T, T]
        tokens_count = tf.reduce_sum(tf.cast(key_mask, tf.float32), axis=1)
        if c.length_scaled_softmax:
            log_tokens = tf.reshape(tf.math.log(tf.maximum(tokens_count, 2.0)), [batch, 1, 1, 1])
        else:
            log_tokens = tf.fill([batch, 1, 1, 1], FIXED_LOG_TOKENS)
        reach = self.reach_mask(relative_self)

        if c.token_match:
            same_token = same_token_mask(tokens, c.start_token)

        def self_bias(block):
            bias = block.position_bias(relative_self)
            if c.token_match:  # the bonus grows with log(tokens) as the logits do, so a match stays as sharp
                # among 4x the tokens (pointer, k = 24 / 32: 0.31 / 0.11 exact match with a fixed bonus, 1.0
                # with it 1.3x larger)
                bias += tf.cast(block.match_bias(same_token) * (log_tokens / FIXED_LOG_TOKENS), bias.dtype)
            return bias if reach is None else bias + tf.cast(reach, bias.dtype)

        if use_halting is None:
            use_halting = not training
        if return_steps is None:
            return_steps = bool(training)

        h = self.embedding(tokens)
        if c.start_token:
            first = tf.reshape(tf.cast(positions == 0, h.dtype), [1, length, 1])
            h = h * (1 - first) + tf.cast(self.start_vector, h.dtype) * first
        if c.conv_kernel:
            h = self.conv_norm(h + self.conv_out(self.conv(zero_padding(h, key_mask))))
        for block in self.prelude:
            h = block(h, h, self_bias(block), key_mask, log_tokens, training=training)
        injected = h
        if c.readout == "attention":
            relative_answer = tf.reshape(positions, [1, 1, length]) - tf.expand_dims(answer_pos, 2)  # [B, A, T]
            coda_bias = self.coda.position_bias(relative_answer)

        def read(state):
            queries = tf.gather(state, answer_pos, batch_dims=1)  # [B, A, W]
            if c.readout == "attention":
                out = self.coda(queries, state, coda_bias, key_mask, log_tokens, training=training)
                logits = self.head(self.head_norm(out))
            else:
                out = self.head_norm(queries + self.slot_mlp_out(self.slot_mlp_in(queries)))
                logits = self.head(out)
            if c.halting == "ready":  # log P(some answer) - log P(not yet), of the least ready slot
                return logits, tf.reduce_min(tf.reduce_logsumexp(logits, -1) - self.halt_head(out)[..., 0], 1)
            return logits, self.halt_head(tf.reduce_mean(out, axis=1))[:, 0]

        def state_change(old, new):
            """[B, T] mean |change| of each token's state over one iteration (0 at PAD)."""
            change = tf.reduce_mean(tf.abs(tf.cast(new, tf.float32) - tf.cast(old, tf.float32)), axis=-1)
            return tf.where(key_mask, change, 0.0)

        def halted_now(old_state, new_state, logits, halt_logits):
            if c.halting == "fixed_point":
                halted = tf.reduce_max(state_change(old_state, new_state), axis=1) < c.fixed_point_tolerance
            else:
                halted = tf.sigmoid(tf.cast(halt_logits, tf.float32)) > c.halt_threshold
            if c.halt_confidence:
                top = tf.reduce_max(tf.nn.softmax(tf.cast(logits, tf.float32)), axis=-1)  # [B, A]
                halted &= tf.reduce_all(top >= c.halt_confidence, axis=1)
            return halted

        def settled_steps(iterations_run, halted):
            # The fixed-point rule sees a state settled only by running one iteration that changes
            # nothing; steps_used counts the iterations the state needed, not that check.
            if c.halting == "fixed_point":
                return iterations_run - tf.cast(halted, tf.float32)
            return iterations_run

        if not c.looped:  # a plain stack: every block runs once, no halting
            state = injected
            for block in self.core:
                state = block(state, state, self_bias(block), key_mask, log_tokens, training=training)
            logits, halt_logits = read(state)
            return {"logits": logits, "halt_logits": halt_logits,
                    "steps_used": tf.fill([batch], float(len(self.core)))}

        core_biases = [self_bias(block) for block in self.core]

        if c.value_feedback:  # the answer classes' input embeddings, read by every iteration
            answer_embeddings = tf.cast(self.embedding.embeddings[:c.num_classes], injected.dtype)

        def iterate(state):
            x = state + injected
            if c.value_feedback:  # each token's answer-head distribution, embedded as the characters are
                probs = tf.cast(tf.nn.softmax(self.head(self.head_norm(state))), injected.dtype)
                x += tf.einsum("btc,cw->btw", probs, answer_embeddings)
            h = self.core[0](x if c.residual_state else injected, x, core_biases[0], key_mask, log_tokens,
                             training=training)
            for block, bias in zip(self.core[1:], core_biases[1:]):
                h = block(h, h, bias, key_mask, log_tokens, training=training)
            return h

        if num_loops is None:
            num_loops = c.loops_in_training if training else c.max_loops
        if return_steps:
            # Unrolled: gradients through every iteration, the answers read after each one.
            state = tf.zeros_like(injected)
            step_logits, step_halts, step_costs = [], [], []
            halted = tf.zeros([batch], tf.bool)
            steps_used = tf.zeros([batch], tf.float32)
            for iteration in range(c.answer_lag + num_loops):
                new_state = iterate(state)
                steps_used += 1.0 - tf.cast(halted, tf.float32)  # where halting would stop: a metric
                if iteration >= c.answer_lag:  # step j of the outputs is iteration j + answer_lag
                    logits, halt_logits = read(new_state)
                    step_logits.append(logits)
                    step_halts.append(halt_logits)
                    if c.fixed_point_weight:
                        moved = tf.reduce_sum(state_change(state, new_state), axis=1) / tf.maximum(tokens_count, 1.0)
                        step_costs.append(c.fixed_point_weight * moved)
                    halted = halted | halted_now(state, new_state, logits, halt_logits)
                state = new_state
            steps_used = settled_steps(steps_used, halted)
            outputs = {"logits": logits, "halt_logits": halt_logits, "steps_used": steps_used,
                       "step_logits": tf.stack(step_logits, axis=1), "step_halt_logits": tf.stack(step_halts, 1)}
            if c.fixed_point_weight:
                outputs["step_fixed_point_cost"] = tf.stack(step_costs, axis=1)
            return outputs

        # Inference: a while loop; a problem's state freezes once it halts, the loop ends when all have.
        def body(t, state, halted, steps_used):
            new_state = tf.where(tf.reshape(halted, [batch, 1, 1]), state, iterate(state))
            steps_used += 1.0 - tf.cast(halted, tf.float32)
            if use_halting:
                needs_readout = c.halting != "fixed_point" or c.halt_confidence
                logits, halt_logits = read(new_state) if needs_readout else (None, None)
                # Never before iteration answer_lag + 1: no answer is due earlier, and training reads none.
                halted = halted | (halted_now(state, new_state, logits, halt_logits) & (t >= c.answer_lag))
            return t + 1, new_state, halted, steps_used

        def cond(t, state, halted, steps_used):
            return (t < num_loops) & ~tf.reduce_all(halted)

        _, state, halted, steps_used = tf.while_loop(
            cond, body, (tf.constant(0), tf.zeros_like(injected), tf.zeros([batch], tf.bool),
                         tf.zeros([batch], tf.float32)), maximum_iterations=num_loops)
        logits, halt_logits = read(state)
        return {"logits": logits, "halt_logits": halt_logits, "steps_used": settled_steps(steps_used, halted)}


def chain_loss(labels, outputs):
    """Per-problem loss. Training (per-iteration outputs): answer cross-entropy after every iteration
    t >= k (k = the example's steps; unknown k: the last iteration only) plus the halting loss (target
    t >= k; unknown k: "the answer is right by now") and, with fixed_point_weight, the state's change
    after iteration k (unknown k: at every iteration whose answer is right). Inference outputs:
    cross-entropy of the answers."""
    answers = tf.cast(labels["answers"], tf.int32)
    if "step_logits" not in outputs:
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=answers,
                                                            logits=tf.cast(outputs["logits"], tf.float32))
        return tf.reduce_mean(ce, axis=1), chain_metrics(labels, outputs)
    step_logits = tf.cast(outputs["step_logits"], tf.float32)  # [B, L, A, C]
    loops = tf.shape(step_logits)[1]
    steps = tf.cast(labels["steps"], tf.int32)
    known = steps >= 1
    iteration = tf.range(1, loops + 1)[None, :]  # [1, L]
    first_supervised = tf.where(known, tf.minimum(steps, loops), loops)
    supervised = tf.cast(iteration >= first_supervised[:, None], tf.float32)  # [B, L]
    step_answers = tf.broadcast_to(answers[:, None, :], tf.shape(step_logits)[:3])
    ce = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=step_answers,
                                                                       logits=step_logits), axis=2)
    answer_loss = tf.reduce_sum(ce * supervised, 1) / tf.reduce_sum(supervised, 1)
    right = tf.reduce_all(tf.equal(tf.argmax(step_logits, -1, output_type=tf.int32), step_answers), 2)
    halt_target = tf.where(known[:, None], iteration >= steps[:, None], right)
    halt_loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(
        labels=tf.cast(halt_target, tf.float32), logits=tf.cast(outputs["step_halt_logits"], tf.float32)), 1)
    loss = answer_loss + HALT_WEIGHT * halt_loss
    if "step_fixed_point_cost" in outputs:  # the state's change after iteration k (unknown k: once right)
        after = tf.cast(tf.where(known[:, None], iteration > steps[:, None], right), tf.float32)
        cost = tf.cast(outputs["step_fixed_point_cost"], tf.float32)
        loss += tf.reduce_sum(cost * after, 1) / tf.maximum(tf.reduce_sum(after, 1), 1.0)
    return loss, chain_metrics(labels, outputs)


def chain_metrics(labels, outputs):
    """Per-problem exact match (every answer slot right), slot accuracy, loops used and |loops - k|
    (0 where k is unknown)."""
    answers = tf.cast(labels["answers"], tf.int32)
    predicted = tf.argmax(outputs["logits"], -1, output_type=tf.int32)
    correct = tf.cast(tf.equal(predicted, answers), tf.float32)
    steps = tf.cast(labels["steps"], tf.float32)
    steps_used = tf.cast(outputs["steps_used"], tf.float32)
    return {"exact_match": tf.reduce_min(correct, axis=1), "token_accuracy": tf.reduce_mean(correct, axis=1),
            "steps_used": steps_used, "halting_error": tf.where(steps >= 1, tf.abs(steps_used - steps), 0.0)}


def _file_limits(config: ChainConfig) -> dict:
    """What a file task's lines are checked against: the answer slots, max_tokens and (looped) the loop
    iterations trained, which a line's ``steps`` may not exceed."""
    return dict(answer_length=config.answers, max_tokens=config.max_tokens,
                max_steps=config.loops_in_training if config.looped else None,
                tokenizer=chain_tokenizer(config, check_against_train_file=True))


def chain_dataset(config: ChainConfig, split: str, batch_size: int, seed: int = 0, start_batch: int = 0):
    if config.task == chains.FILE_TASK:
        return chains.file_dataset(config.train_file, config.test_file, split, batch_size, seed=seed,
                                   start_batch=start_batch, length_buckets=config.train_length_buckets,
                                   **_file_limits(config))
    return chains.generated_dataset(config.task, split, batch_size, seed=seed, start_batch=start_batch,
                                    train_min_len=config.train_min_len, train_max_len=config.train_max_len,
                                    test_max_len=config.test_max_len, answer_length=config.answers,
                                    eval_examples=config.eval_examples, curriculum_batches=config.curriculum_steps,
                                    curriculum_stages=config.stages,
                                    negation_curriculum_batches=config.negation_curriculum_steps,
                                    train_copy_rate=config.train_copy_rate if config.task == "registers" else None,
                                    train_distractor_scale=(config.train_distractor_scale if config.task
                                                            in chains.DISTRACTOR_SCALE_TASKS else None),
                                    length_buckets=config.train_length_buckets, **config.generator_options)


def validate_chain_data(config: ChainConfig) -> None:
    """A file task's JSONL files read and checked before anything is written (one error naming the file
    and line); generated tasks are valid by construction."""
    if config.task == chains.FILE_TASK:
        chains.read_file_task(config.train_file, config.test_file, **_file_limits(config))


def build_chain_transformer(config: ChainConfig) -> keras.Model:
    """Looped Transformer reading problems as plain tokens, with learned halting (or its stacked baseline)."""
    model = ChainTransformer(config)
    # Built with the shapes a problem has (any batch, any length), which Keras records for a subclassed
    # model's ``model.export()`` signature, and called once (one loop) because export also wants that.
    model.build({"tokens": (None, None)})
    model({"tokens": tf.constant([chains.answer_slots(config.answers)], tf.int32)}, num_loops=1)
    return model
