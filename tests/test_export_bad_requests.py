"""Every CNN and LSTM LM signature under bad requests (tables in tests/bad_requests.py): straight to the
reloaded signature (a gRPC or Python caller), each is an InvalidArgument naming the input, raised by the
in-graph checks before any kernel reads the input -- never a process abort, never an answer; as REST
bodies, each is one line (``BadRequest``)."""

import json

import numpy as np
import pytest
import tensorflow as tf

from bad_requests import README_REQUESTS, REST_CASES, TENSOR_CASES
from tfmstep.export import serving


@pytest.fixture
def loaded(exported_tiny):
    """name -> the reloaded SavedModel of its tiny preset (exported once per session, in conftest)."""
    return lambda name: exported_tiny(name)[4]


@pytest.mark.parametrize("case_id,name,signature,inputs,message", TENSOR_CASES,
                         ids=[case[0] for case in TENSOR_CASES])
def test_signature_refuses_a_bad_tensor_in_the_graph(case_id, name, signature, inputs, message, loaded):
    function = loaded(name).signatures[signature]
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        function(**{k: tf.constant(v) for k, v in inputs.items()})
    line = serving.graph_error_line(error.value)
    assert "\n" not in line
    assert __import__("re").search(message, line), line


@pytest.mark.parametrize("case_id,name,body,message", REST_CASES, ids=[case[0] for case in REST_CASES])
def test_rest_body_is_refused_with_one_line(case_id, name, body, message, loaded):
    with pytest.raises(serving.BadRequest, match=message) as error:
        serving.predict_rest(loaded(name), body)
    assert "\n" not in str(error.value)


def test_wrong_dtype_is_refused_by_the_signature_itself(loaded):
    with pytest.raises((TypeError, ValueError, tf.errors.InvalidArgumentError)):
        loaded("cnn_classifier").signatures["serving_default"](images=tf.zeros([1, 8, 8, 1], tf.int32))
    with pytest.raises((TypeError, ValueError, tf.errors.InvalidArgumentError)):
        loaded("lstm_lm").signatures["next_token_logits"](text=tf.constant([1, 2]))


@pytest.mark.parametrize("case_id,name,body", README_REQUESTS, ids=[case[0] for case in README_REQUESTS])
def test_readme_requests_are_answered(case_id, name, body, loaded):
    reply = json.loads(json.dumps(serving.predict_rest(loaded(name), json.dumps(body))))
    assert "predictions" in reply or "outputs" in reply


def test_a_good_request_still_works_after_the_bad_ones(loaded):
    """The checks leave no state behind: the same signatures answer normally afterwards."""
    out = loaded("cnn_classifier").signatures["serving_default"](images=tf.fill([3, 8, 8, 1], 0.5))
    np.testing.assert_allclose(out["probabilities"].numpy().sum(-1), 1.0, rtol=1e-5)
    gen = loaded("lstm_lm").signatures["generate"](text=tf.constant(["a", "def "]), max_length=tf.constant(3),
                                                   beam_width=tf.constant(8))
    assert gen["tokens"].shape == (2, 3)
