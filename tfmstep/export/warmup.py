"""TF Serving warmup requests: ``assets.extra/tf_serving_warmup_requests``, a TFRecord of ``PredictionLog``s.

TF Serving replays these when it loads a version, so the first real request does not pay for graph
initialisation. Built with ``tensorflow-serving-api``'s protos (the same ones the server parses).
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")


def _apis():
    try:
        from tensorflow_serving.apis import predict_pb2, prediction_log_pb2
    except ImportError as e:  # optional dependency: pip install "tfmstep[serving]"
        from tfmstep.errors import UserError
        raise UserError("writing TF Serving warmup requests needs tensorflow-serving-api "
                        "(pip install 'tfmstep[serving]')") from e
    return predict_pb2, prediction_log_pb2


def write_warmup_requests(path: str, model_name: str, requests: dict) -> int:
    """``requests``: {signature_name: {input_name: array}}; writes one PredictionLog each; returns the count."""
    predict_pb2, prediction_log_pb2 = _apis()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    count = 0
    with tf.io.TFRecordWriter(path) as writer:
        for signature_name, inputs in requests.items():
            request = predict_pb2.PredictRequest()
            request.model_spec.name = model_name
            request.model_spec.signature_name = signature_name
            for input_name, value in inputs.items():
                request.inputs[input_name].CopyFrom(tf.make_tensor_proto(np.asarray(value)))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())
            count += 1
    return count


def read_warmup_requests(path: str) -> list:
    """[(signature_name, {input_name: np.ndarray})] parsed back from a warmup file."""
    _, prediction_log_pb2 = _apis()
    requests = []
    for record in tf.data.TFRecordDataset(path):
        log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        request = log.predict_log.request
        requests.append((request.model_spec.signature_name,
                         {name: tf.make_ndarray(proto) for name, proto in request.inputs.items()}))
    return requests
