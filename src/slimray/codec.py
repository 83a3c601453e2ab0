"""What a model family gives serving: the ``Codec`` contract (load an artifact, run a batch, translate between
the batch and the protocols' data) and ``RequestError``, the 4xx with a message every bad input raises.

It lives below both sides: a family's codec (``slimray.families.causal_lm.serving``) subclasses ``Codec`` without
importing serving, and serving (``slimray.serving.codecs`` for the classifier and the sentence encoder,
``protocols``, ``http``) calls it through the family registry. The methods are described in
``slimray.serving.codecs``. Below them, the validation of numeric tensors every tensor codec shares (``parse_inputs``
for JSON rows, ``parse_array`` for binary bodies, ``parse_v2_tensor`` for Open Inference Protocol tensors) and
``TensorCodec``, the base of every codec whose items are numeric arrays. Core: numpy
only, no ray, no family.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np


class RequestError(Exception):
    """A bad request: ``status`` (4xx) and a message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class Codec:
    """Base class: one served model of one kind. Subclasses set ``kind``, ``v1_verb`` and the methods below."""

    kind: ClassVar[str]
    v1_verb: ClassVar[str]  # the native route is POST /v1/<verb>
    v1_hint: ClassVar[str]  # what the native body looks like, for error messages
    input_name: ClassVar[str]
    output_names: ClassVar[tuple[str, ...]]  # the V2 outputs, in their default order
    binary_bodies: ClassVar[bool] = False  # whether the native route takes raw float32 / .npy bodies (parse_array)
    #: the family's HTTP ingress, ``"module:function"`` with ``build_api``'s signature ``(server, *, api_key, metrics)``;
    #: the default is the tensor protocols (``slimray.serving.protocols:build_api``); a text generator names its own
    ingress: ClassVar[str] = "slimray.serving.protocols:build_api"

    def __init__(self, options: Any, loader: Any = None):
        self.options = options

    # items are np.ndarray (N, ...) or list[str]: both have len() and slice
    def concat(self, parts: list[Any]) -> Any:
        raise NotImplementedError

    def forward(self, items: Any) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def probe(self) -> Any:
        raise NotImplementedError

    def healthy(self, out: dict[str, np.ndarray]) -> bool:
        return all(np.isfinite(v).all() for v in out.values() if v.dtype.kind == "f")

    def parse_v1(self, payload: Any) -> Any:
        raise NotImplementedError

    def parse_array(self, arr: np.ndarray) -> Any:
        raise RequestError(415, f"a {self.kind} takes JSON bodies only: send {self.v1_hint}")

    def parse_instances(self, instances: list[Any]) -> Any:
        raise NotImplementedError

    def parse_v2(self, tensor: Any, raw: bytes | None) -> Any:
        raise NotImplementedError

    def v1_answer(self, out: dict[str, np.ndarray]) -> dict[str, Any]:
        raise NotImplementedError

    def predictions(self, out: dict[str, np.ndarray]) -> list[Any]:
        raise NotImplementedError

    def v2_metadata(self) -> dict[str, list[dict[str, Any]]]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        """Counters of the codec's own machinery (e.g. a decode engine), merged into the replica's info."""
        return {}

    def _check_count(self, n: int, what: str = "examples") -> None:
        if n == 0:
            raise RequestError(422, f"inputs is empty: send at least one of the {what}")
        if n > self.options.max_batch_examples:
            raise RequestError(413, f"batch of {n} {what} is larger than the allowed {self.options.max_batch_examples}")


# ------------------------------------------------------- numeric tensors from any protocol (shared by tensor codecs)


# Open Inference Protocol datatypes as little-endian numpy types (the binary extension's wire format)
FLOAT_TYPES = {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64}
INT_TYPES = {
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
}
V2_DATATYPES = {**FLOAT_TYPES, **INT_TYPES, "BOOL": np.bool_}


def v2_datatype(arr: np.ndarray) -> str:
    for name, t in V2_DATATYPES.items():
        if arr.dtype == np.dtype(t):
            return name
    raise TypeError(f"no V2 datatype for {arr.dtype}")


def decode_bytes_tensor(raw: bytes) -> list[bytes]:
    """The binary extension's BYTES layout: each element a 4-byte little-endian length, then its bytes."""
    out, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise RequestError(400, "binary BYTES tensor is truncated (length prefix cut off)")
        n = int.from_bytes(raw[i : i + 4], "little")
        if i + 4 + n > len(raw):
            raise RequestError(400, "binary BYTES tensor is truncated (element shorter than its length)")
        out.append(raw[i + 4 : i + 4 + n])
        i += 4 + n
    return out


def _accepted_example_shapes(shape: list[int]) -> set[tuple[int, ...]]:
    squeezed = tuple(d for d in shape if d != 1) if len(shape) > 1 else tuple(shape)
    return {tuple(shape), squeezed, (math.prod(shape),)}


def _shape_message(shape: list[int], got: Any) -> str:
    allowed = " or ".join(str(list(s)) for s in sorted(_accepted_example_shapes(shape), key=len, reverse=True))
    return f"each example must have shape {allowed}; got {list(got)}"


def _check_values(arr: np.ndarray, *, shape: list[int], min_value: float, max_value: float) -> np.ndarray:
    if not np.isfinite(arr).all():
        raise RequestError(422, "inputs contain NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < min_value or hi > max_value:
        raise RequestError(422, f"input values must lie in [{min_value:g}, {max_value:g}] (raw units); got [{lo:g}, {hi:g}]")
    return arr.reshape(len(arr), *shape)


def parse_inputs(raw: Any, *, shape: list[int], min_value: float, max_value: float, max_examples: int) -> np.ndarray:
    """Validate ``inputs`` (nested lists) and return a float32 array of shape (N, *shape); raises ``RequestError``."""
    if not isinstance(raw, list):
        raise RequestError(422, "inputs must be a list of examples")
    if len(raw) == 0:
        raise RequestError(422, "inputs is empty: send at least one example")
    if len(raw) > max_examples:
        raise RequestError(413, f"batch of {len(raw)} examples is larger than the allowed {max_examples}")
    try:
        arr = np.asarray(raw)
    except (ValueError, OverflowError):
        raise RequestError(422, "inputs must be a rectangular nested list of numbers (rows of unequal length)") from None
    if arr.dtype.kind not in "iuf":
        raise RequestError(422, f"inputs must hold only numbers (got {arr.dtype.kind!r} values: strings, booleans, nulls or ragged rows)")
    return parse_array(arr, shape=shape, min_value=min_value, max_value=max_value, max_examples=max_examples)


def parse_array(arr: np.ndarray, *, shape: list[int], min_value: float, max_value: float, max_examples: int) -> np.ndarray:
    """Validate a numeric array (N, *example) from any protocol; float32 (N, *shape) or ``RequestError``."""
    if arr.ndim == 0 or len(arr) == 0:
        raise RequestError(422, "inputs is empty: send at least one example")
    if len(arr) > max_examples:
        raise RequestError(413, f"batch of {len(arr)} examples is larger than the allowed {max_examples}")
    if arr.dtype.kind not in "iuf":
        raise RequestError(422, "inputs must hold only numbers")
    with np.errstate(over="ignore"):
        arr = arr.astype(np.float32)
    if tuple(arr.shape[1:]) not in _accepted_example_shapes(shape):
        raise RequestError(422, _shape_message(shape, arr.shape[1:]))
    return _check_values(arr, shape=shape, min_value=min_value, max_value=max_value)


def parse_v2_tensor(t: Any, *, shape: list[int], min_value: float, max_value: float, max_examples: int,
                    raw: bytes | None = None, input_name: str = "input") -> np.ndarray:
    """Validate one Open Inference Protocol input tensor (JSON ``data``, or ``raw`` little-endian bytes from the
    binary extension); returns float32 (N, *shape) or raises ``RequestError``."""
    dtype_name = t.datatype.upper()
    if dtype_name not in FLOAT_TYPES and dtype_name not in INT_TYPES:
        raise RequestError(422, f"datatype {t.datatype!r} is not supported; use FP32 (or FP16/FP64/INT*/UINT*)")
    if t.name != input_name:
        raise RequestError(422, f"unknown input {t.name!r}: this model has one input named {input_name!r}")
    dims = t.shape
    if not dims:
        raise RequestError(422, "shape must list the batch size first, e.g. [N, *example_shape]")
    if any(d < 0 for d in dims):
        raise RequestError(422, f"shape {dims} has negative dimensions")
    if dims[0] == 0:
        raise RequestError(422, "shape has a batch of 0 examples: send at least one")
    if dims[0] > max_examples:
        raise RequestError(413, f"batch of {dims[0]} examples is larger than the allowed {max_examples}")
    if tuple(dims[1:]) not in _accepted_example_shapes(shape):
        raise RequestError(422, _shape_message(shape, dims[1:]))
    expected = math.prod(dims)
    if raw is not None:
        item = np.dtype(V2_DATATYPES[dtype_name]).newbyteorder("<")
        if len(raw) != expected * item.itemsize:
            raise RequestError(422, f"binary data has {len(raw)} bytes but shape {dims} of {dtype_name} needs {expected * item.itemsize}")
        arr = np.frombuffer(raw, dtype=item).astype(np.float64).reshape(dims[0], -1)
    else:
        if t.data is None:
            raise RequestError(422, "input tensor has no data (send data, or binary_data_size with the binary extension)")
        try:
            arr = np.asarray(t.data)
        except (ValueError, OverflowError):
            raise RequestError(422, "data must be a flat or rectangular nested list of numbers") from None
        if arr.dtype.kind not in "iuf":
            raise RequestError(422, "data must hold only numbers (no strings, booleans, nulls or ragged rows)")
        if arr.size != expected:
            raise RequestError(422, f"data has {arr.size} values but shape {dims} needs {expected}")
        if dtype_name in INT_TYPES:
            if arr.dtype.kind == "f":
                raise RequestError(422, f"datatype {dtype_name} needs integer data; got floating-point values")
            info = np.iinfo(INT_TYPES[dtype_name])
            if arr.min() < info.min or arr.max() > info.max:
                raise RequestError(422, f"data values do not fit datatype {dtype_name}")
        arr = arr.astype(np.float64).reshape(dims[0], -1)
        if dtype_name in FLOAT_TYPES:  # FP16/FP32 values beyond the type's range are rejected, not clipped
            finite = np.isfinite(arr).all()
            with np.errstate(over="ignore"):
                arr = arr.astype(FLOAT_TYPES[dtype_name])
            if finite and not np.isfinite(arr).all():
                raise RequestError(422, f"data values overflow datatype {dtype_name}")
    return _check_values(arr.astype(np.float32), shape=shape, min_value=min_value, max_value=max_value)


class TensorCodec(Codec):
    """A codec whose items are float32 arrays (N, *example shape) in the data's raw units: the parsing every tensor
    model shares (JSON ``inputs`` rows, binary bodies, KServe v1 instances, OIP v2 tensors). Subclasses give
    ``_limits()`` (``shape``, ``min_value``, ``max_value``, ``max_examples``) and the forward pass."""

    input_name: ClassVar[str] = "input"
    binary_bodies: ClassVar[bool] = True

    def _limits(self) -> dict[str, Any]:
        raise NotImplementedError

    def concat(self, parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def parse_v1(self, payload: Any) -> np.ndarray:
        if not isinstance(payload, dict) or set(payload) != {"inputs"}:
            extra = sorted(set(payload) - {"inputs"}) if isinstance(payload, dict) else []
            where = f"extra fields {extra} not allowed" if extra else "send an object with one field"
            raise RequestError(422, f"body: {where}: {self.v1_hint} (inputs)")
        return parse_inputs(payload["inputs"], **self._limits())

    def parse_array(self, arr: np.ndarray) -> np.ndarray:
        return parse_array(arr, **self._limits())

    def parse_instances(self, instances: list[Any]) -> np.ndarray:
        return parse_inputs(instances, **self._limits())

    def parse_v2(self, tensor: Any, raw: bytes | None) -> np.ndarray:
        return parse_v2_tensor(tensor, raw=raw, input_name=self.input_name, **self._limits())
