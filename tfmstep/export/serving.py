"""TF Serving's REST request/response JSON, checked against a signature without a server.

``parse_rest_request`` turns a ``{"instances": ...}`` (row) or ``{"inputs": ...}`` (columnar) body into
tensors for a signature and rejects what TF Serving would reject -- wrong dtype, wrong rank or shape, an
empty batch, unknown or missing inputs -- with one clear line (``BadRequest``). ``rest_response`` formats
the outputs the way the server answers (``{"predictions": ...}`` / ``{"outputs": ...}``).
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any, Mapping

import numpy as np
import tensorflow as tf

from tfmstep.errors import UserError


class BadRequest(UserError):
    """A request that does not fit the signature."""


def signature_inputs(signature) -> dict:
    """{input_name: TensorSpec} of a loaded signature (ConcreteFunction)."""
    return dict(signature.structured_input_signature[1])


def _is_b64(value) -> bool:
    return isinstance(value, Mapping) and set(value) == {"b64"}


def _decode_value(value):
    """TF Serving's JSON for binary data is {"b64": "..."}."""
    if _is_b64(value):
        try:
            return base64.b64decode(value["b64"], validate=True)
        except (ValueError, TypeError):
            raise ValueError("expected base64 in {\"b64\": ...}") from None
    if isinstance(value, list):
        return [_decode_value(v) for v in value]
    return value


def _to_array(name: str, value: Any, spec: tf.TensorSpec) -> np.ndarray:
    value = _decode_value(value)
    dtype = spec.dtype
    try:
        if dtype == tf.string:
            array = np.asarray(value, dtype=object)
            flat = array.reshape(-1)
            if not all(isinstance(v, (str, bytes)) for v in flat):
                raise ValueError("expected strings")
            array = np.vectorize(lambda v: v.encode("utf-8") if isinstance(v, str) else v,
                                 otypes=[object])(array) if array.size else array
        else:
            array = np.asarray(value)
            if array.dtype == object and dtype.is_integer:  # integers beyond 64 bits (JSON has no limit)
                flat = [v for v in array.reshape(-1)]
                if flat and all(isinstance(v, int) and not isinstance(v, bool) for v in flat):
                    info = np.iinfo(dtype.as_numpy_dtype)
                    worst = max(flat, key=abs)
                    raise BadRequest(f"input {name!r}: {worst} is outside the {dtype.name} range "
                                     f"[{info.min}, {info.max}]")
            if array.dtype == object or array.dtype.kind in "US":
                raise ValueError("expected numbers")
            if dtype.is_integer:
                if array.dtype.kind == "b" or (array.dtype.kind == "f" and not (
                        np.all(np.isfinite(array)) and np.all(np.equal(np.mod(array, 1), 0)))):
                    raise ValueError("expected integers")
                info = np.iinfo(dtype.as_numpy_dtype)
                # JSON numbers are unbounded: never let a cast wrap 2**32 + 5 to 5.
                if array.size and (array.min() < info.min or array.max() > info.max):
                    worst = array.max() if array.max() > info.max else array.min()
                    raise BadRequest(f"input {name!r}: {_number_text(worst)} is outside the {dtype.name} "
                                     f"range [{info.min}, {info.max}]")
            elif dtype.is_floating:
                if array.dtype.kind == "b":
                    raise ValueError("expected numbers")
                if array.size and not np.all(np.isfinite(array.astype(np.float64))):
                    raise BadRequest(f"input {name!r} has NaN or infinite values")
            array = array.astype(dtype.as_numpy_dtype)
            if dtype.is_floating and array.size and not np.all(np.isfinite(array)):
                raise BadRequest(f"input {name!r} has values beyond the {dtype.name} range")
    except BadRequest:
        raise
    except (ValueError, TypeError) as e:
        raise BadRequest(f"input {name!r} must be {dtype.name} with shape {_shape_text(spec)}: "
                         f"{e if str(e).startswith('expected') else 'ragged or non-numeric values'}") from None
    if spec.shape.rank and array.ndim >= 1 and array.shape[0] == 0:  # JSON [] has rank 1 whatever the spec
        raise BadRequest(f"empty batch: input {name!r} has no examples")
    if array.ndim != spec.shape.rank:
        raise BadRequest(f"input {name!r} must have rank {spec.shape.rank} (shape {_shape_text(spec)}), "
                         f"got shape {list(array.shape)}")
    for axis, (want, got) in enumerate(zip(spec.shape.as_list(), array.shape)):
        if want is not None and want != got:
            raise BadRequest(f"input {name!r} must have shape {_shape_text(spec)}, got {list(array.shape)} "
                             f"(axis {axis})")
    return array


def _number_text(value) -> str:
    value = float(value) if isinstance(value, (float, np.floating)) else int(value)
    return str(int(value)) if isinstance(value, float) and value.is_integer() and abs(value) < 1e300 else str(value)


def _shape_text(spec: tf.TensorSpec) -> str:
    return "[" + ", ".join("batch" if i == 0 and d is None else ("?" if d is None else str(d))
                           for i, d in enumerate(spec.shape.as_list())) + "]"


def parse_rest_request(body: str | bytes | Mapping, signature) -> tuple[dict, str]:
    """(feeds {input_name: np.ndarray}, "row" | "columnar") for a TF Serving REST predict body."""
    if isinstance(body, (str, bytes)):
        try:
            body = json.loads(body)
        except ValueError as e:
            raise BadRequest(f"request body is not JSON: {e}") from None
    if not isinstance(body, Mapping) or (("instances" in body) == ("inputs" in body)):
        raise BadRequest('request must be a JSON object with exactly one of "instances" or "inputs"')
    extra = sorted(set(body) - {"instances", "inputs", "signature_name"})
    if extra:
        raise BadRequest(f"unknown request field(s) {', '.join(extra)}; expected \"signature_name\" and "
                         f"one of \"instances\" / \"inputs\"")
    specs = signature_inputs(signature)
    if "instances" in body:
        instances = body["instances"]
        if not isinstance(instances, list):
            raise BadRequest('"instances" must be a list (one entry per example)')
        if not instances:
            raise BadRequest("empty batch: \"instances\" is an empty list")
        if len(specs) == 1 and (not isinstance(instances[0], Mapping) or _is_b64(instances[0])):
            columns = {next(iter(specs)): instances}
        else:
            if not all(isinstance(row, Mapping) for row in instances):
                raise BadRequest(f"with several inputs ({', '.join(sorted(specs))}) every instance must be "
                                 f"an object keyed by input name")
            columns = {name: [row.get(name) for row in instances] for name in specs}
            missing = [name for name, column in columns.items() if any(v is None for v in column)]
            if missing:
                raise BadRequest(f"instances are missing input(s) {', '.join(missing)}")
            scalar_inputs = [name for name, spec in specs.items() if spec.shape.rank == 0]
            if scalar_inputs:
                raise BadRequest(f"inputs {', '.join(scalar_inputs)} are not batched: use the columnar "
                                 f"format {{\"inputs\": {{...}}}}")
        fmt = "row"
    else:
        inputs = body["inputs"]
        if len(specs) == 1 and not isinstance(inputs, Mapping):
            columns = {next(iter(specs)): inputs}
        elif isinstance(inputs, Mapping):
            columns = dict(inputs)
        else:
            raise BadRequest(f"\"inputs\" must be an object keyed by input name ({', '.join(sorted(specs))})")
        fmt = "columnar"
    unknown = sorted(set(columns) - set(specs))
    missing = sorted(set(specs) - set(columns))
    if unknown or missing:
        raise BadRequest(f"signature inputs are {', '.join(sorted(specs))}"
                         + (f"; unknown: {', '.join(unknown)}" if unknown else "")
                         + (f"; missing: {', '.join(missing)}" if missing else ""))
    return {name: _to_array(name, columns[name], specs[name]) for name in specs}, fmt


def _jsonable(array: np.ndarray):
    if array.dtype == object:
        return np.vectorize(lambda v: v.decode("utf-8", errors="replace") if isinstance(v, bytes) else v,
                            otypes=[object])(array).tolist() if array.size else array.tolist()
    return array.tolist()


def rest_response(outputs: Mapping, fmt: str) -> dict:
    """TF Serving's response: row format {"predictions": [per example]}, columnar {"outputs": {...}}."""
    arrays = {name: np.asarray(value.numpy() if hasattr(value, "numpy") else value)
              for name, value in outputs.items()}
    if fmt == "columnar":
        return {"outputs": {name: _jsonable(a) for name, a in arrays.items()}}
    if len(arrays) == 1:
        return {"predictions": _jsonable(next(iter(arrays.values())))}
    batch = len(next(iter(arrays.values())))
    return {"predictions": [{name: _jsonable(a[i]) if a.ndim > 1 else _jsonable(a[i:i + 1])[0]
                             for name, a in arrays.items()} for i in range(batch)]}


_ENSURE_SHAPE = re.compile(r"Shape of tensor (\S+) (\[[^\]]*\]) is not compatible with expected shape "
                           r"(\[[^\]]*\])")


def graph_error_line(error: tf.errors.OpError) -> str:
    """One line from an in-graph check's error (not "Graph execution error:"): the Assert's own message,
    or EnsureShape's shape mismatch, naming the input."""
    lines = [line.strip() for line in error.message.strip().splitlines() if line.strip()]
    for line in lines:
        shape = _ENSURE_SHAPE.search(line)
        if shape:
            name, got, want = shape.groups()
            name = re.sub(r"_\d+$", "", name.split("/")[-1].split(":")[0])
            want = want.replace("?", "batch", 1)
            return f"input '{name}' must have shape {want.replace(',', ', ')}, got {got.replace(',', ', ')}"
        if "assertion failed" in line or line.startswith("Condition x"):
            line = line.split("assertion failed: ", 1)[-1]
            line = re.sub(r"\s*\[\[\{\{.*$", "", line)  # the node name TF appends
            line = line.replace("\\'", "'")  # Assert prints its string data with escaped quotes
            return line[1:-1] if line.startswith("[") and line.endswith("]") else line
    return lines[-1] if lines else type(error).__name__


def predict_rest(signature_or_loaded, body: str | bytes | Mapping) -> dict:
    """Parse a REST body, run the signature, format the response: the server's path, without a server.

    ``signature_or_loaded``: one signature, or a loaded SavedModel whose signature is picked by the
    body's "signature_name" (default "serving_default"), as TF Serving does."""
    if isinstance(body, (str, bytes)):
        try:
            body = json.loads(body)
        except ValueError as e:
            raise BadRequest(f"request body is not JSON: {e}") from None
    signature = signature_or_loaded
    if hasattr(signature_or_loaded, "signatures"):
        name = body.get("signature_name", "serving_default") if isinstance(body, Mapping) else ""
        if name not in signature_or_loaded.signatures:
            raise BadRequest(f"unknown signature_name {name!r}; the model serves "
                             f"{', '.join(sorted(signature_or_loaded.signatures))}")
        signature = signature_or_loaded.signatures[name]
    feeds, fmt = parse_rest_request(body, signature)
    try:
        outputs = signature(**{name: tf.constant(value) for name, value in feeds.items()})
    except tf.errors.InvalidArgumentError as e:  # in-graph checks (empty text, bad beam width, ...)
        raise BadRequest(graph_error_line(e)) from None
    return rest_response(outputs, fmt)
