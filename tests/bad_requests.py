"""The bad-request tables of the CNN's and the LSTM LM's signatures (and REST bodies for the chain
reasoner's), shared by the in-process tests (tests/test_export_bad_requests.py) and the server tests
(tests/test_serve.py).

``TENSOR_CASES``: tensors handed straight to a signature (what a gRPC or Python caller can send: any
shape, any value) -> the InvalidArgument the graph answers. ``REST_CASES``: TF Serving REST bodies ->
the one-line 400 message. Tiny presets: 8x8x1 digits, byte LM, chain reasoner (lego, one answer slot).
The chain reasoner's tensor table is in tests/test_chain_transformer.py, beside the model.
"""

import numpy as np

from tfmstep.data import chains

BYTE_PROMPT = "def main("


def _images(shape, value=0.5, dtype=np.float32):
    return np.full(shape, value, dtype)


def _generate(text=(BYTE_PROMPT,), max_length=4, beam_width=1):
    return {"text": np.array([t.encode() if isinstance(t, str) else t for t in text], object),
            "max_length": np.asarray(max_length, np.int32), "beam_width": np.asarray(beam_width, np.int32)}


SHAPE = r"input 'images' must have shape \[batch, 8, 8, 1\], got "

# (id, model, signature, inputs, message regex)
TENSOR_CASES = [
    ("cnn-rank3", "cnn_classifier", "serving_default", {"images": _images([2, 8, 8])}, SHAPE + r"\[2, 8, 8\]"),
    ("cnn-rank5", "cnn_classifier", "serving_default", {"images": _images([2, 8, 8, 1, 1])},
     SHAPE + r"\[2, 8, 8, 1, 1\]"),
    ("cnn-16x16", "cnn_classifier", "serving_default", {"images": _images([2, 16, 16, 1])},
     SHAPE + r"\[2, 16, 16, 1\]"),
    ("cnn-3-channels", "cnn_classifier", "serving_default", {"images": _images([1, 8, 8, 3])},
     SHAPE + r"\[1, 8, 8, 3\]"),
    ("cnn-scalar", "cnn_classifier", "serving_default", {"images": _images([])}, SHAPE + r"\[\]"),
    ("cnn-empty-batch", "cnn_classifier", "serving_default", {"images": _images([0, 8, 8, 1])},
     r"empty batch: input 'images' has no examples"),
    ("cnn-huge-batch", "cnn_classifier", "serving_default", {"images": _images([1025, 8, 8, 1])},
     r"input 'images': a batch of 1025 examples is over the limit of 1024"),
    ("cnn-nan", "cnn_classifier", "serving_default", {"images": _images([2, 8, 8, 1], np.nan)},
     r"input 'images' has NaN or infinite values"),
    ("cnn-inf", "cnn_classifier", "serving_default", {"images": _images([2, 8, 8, 1], -np.inf)},
     r"input 'images' has NaN or infinite values"),
    ("cnn-0-255-pixels", "cnn_classifier", "serving_default", {"images": _images([1, 8, 8, 1], 255.0)},
     r"input 'images': pixel values must be in \[0, 1\], got 255 to 255"),
    ("cnn-negative-pixels", "cnn_classifier", "serving_default", {"images": _images([1, 8, 8, 1], -0.5)},
     r"input 'images': pixel values must be in \[0, 1\]"),
    ("lm-text-rank2", "lstm_lm", "next_token_logits", {"text": np.array([[b"a", b"b"]], object)},
     r"input 'text' must have shape \[batch\], got \[1, 2\]"),
    ("lm-text-scalar", "lstm_lm", "next_token_logits", {"text": np.array(b"abc", object)},
     r"input 'text' must have shape \[batch\], got \[\]"),
    ("lm-empty-batch", "lstm_lm", "next_token_logits", {"text": np.array([], object)},
     r"empty batch: input 'text' has no examples"),
    ("lm-huge-batch", "lstm_lm", "next_token_logits", {"text": np.array([b"a"] * 257, object)},
     r"input 'text': a batch of 257 examples is over the limit of 256"),
    ("lm-empty-text", "lstm_lm", "next_token_logits", {"text": np.array([b"abc", b""], object)},
     r"input 'text': every text must have at least 1 byte"),
    ("lm-over-long-text", "lstm_lm", "next_token_logits", {"text": np.array([b"x" * 4097], object)},
     r"input 'text': a text of 4097 bytes is over the limit of 4096"),
    ("gen-max-length-0", "lstm_lm", "generate", _generate(max_length=0),
     r"input 'max_length' must be in \[1, 1024\], got 0"),
    ("gen-max-length-negative", "lstm_lm", "generate", _generate(max_length=-3),
     r"input 'max_length' must be in \[1, 1024\], got -3"),
    ("gen-max-length-huge", "lstm_lm", "generate", _generate(max_length=2**31 - 1),
     r"input 'max_length' must be in \[1, 1024\], got 2147483647"),
    ("gen-max-length-rank1", "lstm_lm", "generate", _generate(max_length=[4]),
     r"input 'max_length' must have shape \[\], got \[1\]"),
    ("gen-beam-0", "lstm_lm", "generate", _generate(beam_width=0),
     r"input 'beam_width' must be one of 1, 2, 4, 8, got 0"),
    ("gen-beam-negative", "lstm_lm", "generate", _generate(beam_width=-2),
     r"input 'beam_width' must be one of 1, 2, 4, 8, got -2"),
    ("gen-beam-3", "lstm_lm", "generate", _generate(beam_width=3),
     r"input 'beam_width' must be one of 1, 2, 4, 8, got 3"),
    ("gen-beam-huge", "lstm_lm", "generate", _generate(beam_width=2**31 - 1),
     r"input 'beam_width' must be one of 1, 2, 4, 8, got 2147483647"),
    ("gen-beam-rank2", "lstm_lm", "generate", _generate(beam_width=[[2]]),
     r"input 'beam_width' must have shape \[\], got \[1, 1\]"),
    ("gen-empty-text", "lstm_lm", "generate", _generate(text=("",)),
     r"input 'text': every text must have at least 1 byte"),
    ("gen-empty-batch", "lstm_lm", "generate", _generate(text=()), r"empty batch: input 'text' has no examples"),
    ("gen-over-long-text", "lstm_lm", "generate", _generate(text=("x" * 4097,)),
     r"input 'text': a text of 4097 bytes is over the limit of 4096"),
]

DIGIT = [[[0.0]] * 8] * 8  # one 8x8x1 image


# (id, model, JSON body text, message regex). Bodies are text so that NaN, Infinity, 1e400 and integers
# beyond 64 bits reach the parser as a client would send them.
REST_CASES = [
    ("cnn-wrong-dtype", "cnn_classifier", '{"instances": [[[["x"]]]]}', r"input 'images' must be float32"),
    ("cnn-wrong-rank", "cnn_classifier", '{"instances": [[[0.0]]]}',
     r"input 'images' must have rank 4 \(shape \[batch, 8, 8, 1\]\), got shape \[1, 1, 1\]"),
    ("cnn-wrong-dims", "cnn_classifier", '{"instances": [[[[0.0]]]]}', r"input 'images' must have shape"),
    ("cnn-empty-instances", "cnn_classifier", '{"instances": []}', r"empty batch"),
    ("cnn-nan-pixel", "cnn_classifier", None, r"input 'images' has NaN or infinite values"),
    ("cnn-inf-1e400", "cnn_classifier", None, r"(input 'images' has NaN or infinite values|not JSON|"
                                               r"Unrecognized request format)"),
    ("cnn-out-of-range-pixels", "cnn_classifier", None, r"pixel values must be in \[0, 1\]"),
    ("cnn-huge-batch", "cnn_classifier", None, r"over the limit of 1024"),
    ("cnn-not-json", "cnn_classifier", '{"instances": [', r"(not JSON|Unrecognized request format)"),
    ("cnn-no-instances", "cnn_classifier", '{"examples": [1]}', r'exactly one of "instances" or "inputs"'),
    ("lm-unknown-signature", "lstm_lm", '{"signature_name": "nope", "inputs": {"text": ["a"]}}',
     r"unknown signature_name 'nope'"),
    ("lm-unknown-input", "lstm_lm", '{"inputs": {"text": ["a"], "nonsense": [1]}}', r"unknown: nonsense"),
    ("lm-text-not-string", "lstm_lm", '{"instances": [1, 2]}', r"input 'text' must be string"),
    ("lm-text-rank2", "lstm_lm", '{"inputs": {"text": [["a"]]}}', r"input 'text' must have rank 1"),
    ("lm-empty-text", "lstm_lm", '{"instances": ["abc", ""]}', r"every text must have at least 1 byte"),
    ("lm-over-long-text", "lstm_lm", None, r"a text of 4097 bytes is over the limit of 4096"),
    ("gen-max-length-2**32+5", "lstm_lm", None,
     r"input 'max_length': 4294967301 is outside the int32 range"),
    ("gen-beam-width-2**32+2", "lstm_lm", None, r"input 'beam_width': 4294967298 is outside the int32 range"),
    ("gen-max-length-1e12", "lstm_lm", None, r"input 'max_length': 1000000000000 is outside the int32 range"),
    ("gen-max-length-2**70", "lstm_lm", None, r"input 'max_length': .* is outside the int32 range"),
    ("gen-max-length-1.5", "lstm_lm", None, r"input 'max_length' must be int32 .*expected integers"),
    ("gen-max-length-Infinity", "lstm_lm", None, r"input 'max_length' must be int32 .*expected integers"),
    ("gen-max-length-0", "lstm_lm", None, r"input 'max_length' must be in \[1, 1024\], got 0"),
    ("gen-max-length-1025", "lstm_lm", None, r"input 'max_length' must be in \[1, 1024\], got 1025"),
    ("gen-beam-width-3", "lstm_lm", None, r"input 'beam_width' must be one of 1, 2, 4, 8, got 3"),
    ("gen-beam-width-0", "lstm_lm", None, r"input 'beam_width' must be one of 1, 2, 4, 8, got 0"),
    ("gen-beam-width-negative", "lstm_lm", None, r"input 'beam_width' must be one of 1, 2, 4, 8, got -4"),
    ("gen-max-length-vector", "lstm_lm", None, r"input 'max_length' must have rank 0"),
    ("gen-row-format-scalars", "lstm_lm", None, r"not batched: use the columnar format"),
    ("chain-text-not-ascii", "chain_transformer", '{"signature_name": "answer_text", "instances": ["b=\\u00e9;?b"]}',
     r"input 'text'.*outside printable ASCII"),
    ("chain-empty-problem", "chain_transformer", '{"signature_name": "answer_text", "instances": [""]}',
     r"input 'text'.*empty problem"),
    ("chain-text-not-string", "chain_transformer", '{"signature_name": "answer_text", "instances": [3]}',
     r"input 'text' must be string"),
    ("chain-id-out-of-vocabulary", "chain_transformer", None,
     r"input 'tokens'.*token ids must be in \[0, %d\], got .* to %d" % (chains.VOCAB_SIZE - 1, chains.VOCAB_SIZE)),
    ("chain-negative-id", "chain_transformer", None, r"input 'tokens'.*token ids must be in \[0, %d\], got -1"
     % (chains.VOCAB_SIZE - 1)),
    ("chain-no-answer-slot", "chain_transformer", None, r"input 'tokens'.*each answer slot"),
    ("chain-ragged-tokens", "chain_transformer", None, r"input 'tokens'"),
    ("chain-tokens-float", "chain_transformer", None, r"input 'tokens' must be int32"),
]

_BODIES = {
    "cnn-nan-pixel": '{"instances": [' + str([[[0.0]] * 7 + [[float("nan")]]] * 8).replace("nan", "NaN") + ']}',
    "cnn-inf-1e400": '{"instances": [' + str([[[0.0]] * 7 + [[1e400]]] * 8).replace("inf", "1e400") + ']}',
    "cnn-out-of-range-pixels": '{"instances": [' + str([[[255.0]] * 8] * 8) + ']}',
    "cnn-huge-batch": '{"instances": [' + ", ".join([str(DIGIT)] * 1025) + ']}',
    "lm-over-long-text": '{"instances": ["' + "x" * 4097 + '"]}',
    "gen-row-format-scalars": ('{"signature_name": "generate", "instances": [{"text": "a", "max_length": 4, '
                               '"beam_width": 1}]}'),
}
_GENERATE_VALUES = {
    "gen-max-length-2**32+5": ("max_length", str(2**32 + 5)), "gen-beam-width-2**32+2": ("beam_width", str(2**32 + 2)),
    "gen-max-length-1e12": ("max_length", "1e12"), "gen-max-length-2**70": ("max_length", str(2**70)),
    "gen-max-length-1.5": ("max_length", "1.5"), "gen-max-length-Infinity": ("max_length", "Infinity"),
    "gen-max-length-0": ("max_length", "0"), "gen-max-length-1025": ("max_length", "1025"),
    "gen-beam-width-3": ("beam_width", "3"), "gen-beam-width-0": ("beam_width", "0"),
    "gen-beam-width-negative": ("beam_width", "-4"), "gen-max-length-vector": ("max_length", "[4, 5]"),
}
for _key, (_name, _value) in _GENERATE_VALUES.items():
    _others = {"max_length": "4", "beam_width": "1", _name: _value}
    _BODIES[_key] = ('{"signature_name": "generate", "inputs": {"text": ["' + BYTE_PROMPT + '"], '
                     + ", ".join(f'"{k}": {v}' for k, v in _others.items()) + "}}")
CHAIN_PROBLEM = "b=-a+2;a=3;?b"
CHAIN_TOKENS = chains.encode(CHAIN_PROBLEM) + chains.answer_slots(1)  # the problem, then its answer slot
_BODIES.update({
    "chain-id-out-of-vocabulary": '{"instances": [%s]}' % (CHAIN_TOKENS[:-1] + [chains.VOCAB_SIZE] + [1]),
    "chain-negative-id": '{"instances": [%s]}' % ([-1] + CHAIN_TOKENS[1:]),
    "chain-no-answer-slot": '{"instances": [%s]}' % (CHAIN_TOKENS[:-1] + [chains.PAD]),
    "chain-ragged-tokens": '{"instances": [%s, %s]}' % (CHAIN_TOKENS, CHAIN_TOKENS[1:]),
    "chain-tokens-float": '{"instances": [%s]}' % [t + 0.5 for t in CHAIN_TOKENS],
})
REST_CASES = [(case_id, model, body if body is not None else _BODIES[case_id], message)
              for case_id, model, body, message in REST_CASES]

# The README's requests (export/README.md): (id, model, body) -> answered with 200.
README_REQUESTS = [
    ("classify", "cnn_classifier", {"instances": [DIGIT]}),
    ("next-token", "lstm_lm", {"instances": ["def main(", "import os\n"]}),
    ("generate-greedy", "lstm_lm", {"signature_name": "generate",
                                    "inputs": {"text": ["def main("], "max_length": 40, "beam_width": 1}}),
    ("generate-beam", "lstm_lm", {"signature_name": "generate",
                                  "inputs": {"text": ["def main("], "max_length": 40, "beam_width": 4}}),
    ("next-token-b64", "lstm_lm", {"instances": [{"b64": "ZGVmIG1haW4o"}]}),
    ("chain-answer-text", "chain_transformer", {"signature_name": "answer_text",
                                                "instances": [CHAIN_PROBLEM, "b=-a+2;a=3;c=+b+0;?c"]}),
    ("chain-tokens", "chain_transformer", {"instances": [CHAIN_TOKENS]}),
]
