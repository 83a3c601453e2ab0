"""The HTTP endpoint on Ray Serve.

``SlimrayModel`` is left undecorated; ``build_app(ServeOptions(...))`` applies the deployment options to the
module-level ingress class and returns a bound application, so nothing is deployed on import. For
``serve run`` and ``serve deploy`` the import path is ``slimray.serving.app:app_builder`` with the options as
``args`` (see ``serve/*.yaml``).

Routes (one model per application; its name is the ``name`` option):

* ``POST /v1/predict`` (``{"inputs": [...]}``, examples in the dataset's raw units; normalisation happens
  here) answers ``{"model", "predictions", "probabilities"}``;
* ``GET /healthz``, ``GET /v1/models``, ``GET /v1/replica`` (which replica and node answered), ``/docs``;
* the Open Inference Protocol (KServe v2) REST routes: ``GET /v2/health/live``, ``GET /v2/health/ready``,
  ``GET /v2/models/{name}``, ``GET /v2/models/{name}/ready``, ``POST /v2/models/{name}/infer``.

Requests' examples are concatenated into one forward pass by ``@serve.batch`` (``max_batch_size`` examples,
``batch_wait_timeout_s``) and split back; the forward runs on one dedicated thread so the replica's event loop
keeps parsing requests meanwhile (``forward_in_thread``). Every malformed request gets a 4xx JSON
``{"error": ...}``; an optional API key (environment variable named by ``api_key_env``) is checked on every
route except the health checks, with ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``.
Metrics (requests by route and status, latency, batch sizes, errors) go to Ray's Prometheus exporter.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)
from ray import serve

from slimray.artifacts import load_runnable, load_spec
from slimray.data import normalize
from slimray.schema import StrictModel
from slimray.serving.http import (
    RequestError,
    api_key_denied,
    error_response,
    install_error_handlers,
    json_response,
    read_json_body,
    unknown_model,
    validation_message,
)

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class ServeOptions(StrictModel):
    model_dir: str = Field(description="artifact folder (model.safetensors + spec.json) to serve")
    name: str = Field("slimray", pattern=NAME_PATTERN, description="model and application name (the V2 model name)")
    # placement and scaling
    num_replicas: PositiveInt = Field(1, description="fixed replica count (ignored when max_replicas is set)")
    min_replicas: NonNegativeInt | None = Field(None, description="autoscaling lower bound (needs max_replicas)")
    max_replicas: PositiveInt | None = Field(None, description="turns autoscaling on: replicas between min and max")
    target_ongoing_requests: PositiveFloat = Field(2.0, description="autoscaling target of requests per replica")
    num_cpus_per_replica: float = Field(1.0, ge=0)
    gpus_per_replica: float = Field(0.0, ge=0, description="GPUs per replica; fractions below 1 share a GPU")
    max_replicas_per_node: PositiveInt | None = Field(None, description="1 = one replica per node (e.g. per GPU node)")
    num_threads: PositiveInt = 1
    # batching
    max_batch_size: PositiveInt = Field(16, description="most examples one batched forward pass takes")
    batch_wait_timeout_s: float = Field(0.002, ge=0, le=10, description="how long a batch waits to fill up")
    forward_in_thread: bool = Field(True, description="run the forward pass off the replica's event loop")
    # limits
    max_batch_examples: PositiveInt = 1024
    max_body_bytes: PositiveInt = 16 * 1024 * 1024
    max_ongoing_requests: PositiveInt = 16
    max_queued_requests: int = Field(256, ge=-1, description="requests waiting for a replica before 503; -1: no limit")
    request_timeout_s: PositiveFloat | None = Field(None, description="HTTP timeout (408); set on the proxy by deploy()")
    health_check_period_s: PositiveFloat = 5.0
    health_check_timeout_s: PositiveFloat = 30.0
    api_key_env: str = "SLIMRAY_API_KEY"
    access_log: bool = Field(True, description="log every request in the replica (costs CPU under load)")

    @field_validator("gpus_per_replica")
    @classmethod
    def _gpus(cls, v: float) -> float:
        if v > 1 and not float(v).is_integer():
            raise ValueError("gpus_per_replica above 1 must be a whole number (fractions only below 1)")
        return v

    @model_validator(mode="after")
    def _autoscaling(self) -> ServeOptions:
        if self.min_replicas is not None and self.max_replicas is None:
            raise ValueError("min_replicas needs max_replicas (autoscaling); for a fixed count use num_replicas")
        if self.max_replicas is not None and (self.min_replicas or 0) > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


# ----------------------------------------------------------------------------------------- request schemas


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: list[Any] = Field(description="a batch of examples as nested lists, in the dataset's raw units")


class PredictResponse(BaseModel):
    model: str
    predictions: list[int]
    probabilities: list[list[float | None]]


class V2Tensor(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr
    shape: list[StrictInt]
    datatype: StrictStr
    data: list[Any] = Field(description="row-major values, flat or nested")
    parameters: dict[str, Any] | None = None


class V2RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr
    parameters: dict[str, Any] | None = None


class V2InferRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[V2Tensor] = Field(min_length=1, max_length=1, description="exactly one input tensor")
    outputs: list[V2RequestedOutput] | None = None


class V2OutputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[float | int | None]


class V2InferResponse(BaseModel):
    model_name: str
    id: str | None = None
    outputs: list[V2OutputTensor]


INPUT_NAME = "input"
OUTPUT_NAMES = ("probabilities", "predictions")
FLOAT_TYPES = {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64}
INT_TYPES = {
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
}


# ----------------------------------------------------------------------------------------- input parsing


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
    """Validate ``inputs`` and return a float32 array of shape (N, *shape); raises ``RequestError``."""
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
    arr = arr.astype(np.float32)
    if tuple(arr.shape[1:]) not in _accepted_example_shapes(shape):
        raise RequestError(422, _shape_message(shape, arr.shape[1:]))
    return _check_values(arr, shape=shape, min_value=min_value, max_value=max_value)


def parse_v2_tensor(t: V2Tensor, *, shape: list[int], min_value: float, max_value: float, max_examples: int) -> np.ndarray:
    """Validate one Open Inference Protocol input tensor; returns float32 (N, *shape) or raises ``RequestError``."""
    dtype_name = t.datatype.upper()
    if dtype_name not in FLOAT_TYPES and dtype_name not in INT_TYPES:
        raise RequestError(422, f"datatype {t.datatype!r} is not supported; use FP32 (or FP16/FP64/INT*/UINT*)")
    if t.name != INPUT_NAME:
        raise RequestError(422, f"unknown input {t.name!r}: this model has one input named {INPUT_NAME!r}")
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
    try:
        arr = np.asarray(t.data)
    except (ValueError, OverflowError):
        raise RequestError(422, "data must be a flat or rectangular nested list of numbers") from None
    expected = math.prod(dims)
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


# ----------------------------------------------------------------------------------------- metrics


class _Metrics:
    """Per-replica Prometheus metrics (exported by Ray as ``ray_slimray_*``); created only inside a replica."""

    LATENCY_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
    BATCH = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Histogram

        self.requests = Counter("slimray_requests", description="HTTP requests by route and status", tag_keys=("route", "status"))
        self.errors = Counter("slimray_request_errors", description="4xx/5xx answers by route and status", tag_keys=("route", "status"))
        self.latency = Histogram(
            "slimray_request_latency_ms", description="time in the replica per request", boundaries=self.LATENCY_MS, tag_keys=("route",)
        )
        self.batch = Histogram("slimray_batch_size", description="examples per forward pass", boundaries=self.BATCH)

    def record(self, route: str, status: int, ms: float) -> None:
        tags = {"route": route, "status": str(status)}
        self.requests.inc(tags=tags)
        if status >= 400:
            self.errors.inc(tags=tags)
        self.latency.observe(ms, tags={"route": route})


_METRICS: _Metrics | None = None  # one replica per process: set by SlimrayModel.__init__ inside a replica


class MetricsMiddleware:
    """Pure ASGI middleware: counts every answer (404/405 from routing too) by route template and status."""

    def __init__(self, app: Callable) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or _METRICS is None:
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            # the template, never the raw path: no unbounded label values from arbitrary URLs
            _METRICS.record(getattr(route, "path", "unmatched"), status, (time.perf_counter() - start) * 1000)


# ----------------------------------------------------------------------------------------- the replica


def _count_examples(arrays: list[np.ndarray]) -> int:
    return sum(len(a) for a in arrays)


class SlimrayModel:
    """One replica: loads the artifact once, answers requests. Undecorated; see ``build_app``."""

    def __init__(self, options: dict[str, Any], loader: Callable[[str], tuple[torch.nn.Module, Any]] | None = None):
        global _METRICS
        self.options = ServeOptions.model_validate(options)
        torch.set_num_threads(self.options.num_threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if loader is None:
            # the artifact's runtime: ONNX Runtime session (threads from the replica's options; CUDA provider
            # on a GPU replica), compiled module, or torch. CPU-only int8 kernels stay on the CPU.
            spec = load_spec(self.options.model_dir)
            cpu_only = spec.quantization.method in ("dynamic_int8", "static_int8") or spec.runtime.name == "onnxruntime"
            device = "cpu" if cpu_only else self.device.type
            self.model, self.spec = load_runnable(self.options.model_dir, num_threads=self.options.num_threads, device=device)
            if spec.runtime.name == "onnxruntime" or device == "cpu":
                self.device = torch.device("cpu")  # ONNX Runtime takes CPU tensors and moves them itself
        else:
            self.model, self.spec = loader(self.options.model_dir)
            if self.device.type == "cuda" and self.spec.quantization.method in ("none", "bf16", "fp16"):
                self.model = self.model.to(self.device)
            else:
                self.device = torch.device("cpu")
        self.model.eval()
        self.api_key = os.environ.get(self.options.api_key_env) or None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slimray-forward")
        self._probe = np.full((1, *self.spec.input.shape), self.spec.input.min_value, dtype=np.float32)
        probs, _ = self.forward(self._probe)
        self.num_classes = probs.shape[1]
        self.ready = bool(np.isfinite(probs).all())
        self.batches_run = 0
        self.largest_batch = 0
        self.replica_id, self.metrics = None, None
        try:
            ctx = serve.get_replica_context()
        except Exception:
            ctx = None  # in-process use (tests, benchmarks): no Serve context, no metrics
        self._batched = None
        if ctx is not None:
            self.replica_id = ctx.replica_id.to_full_id_str()
            self.metrics = _METRICS = _Metrics()
            # Per-instance batcher (not a class-level decorator): it reads this replica's options and its
            # queue belongs to this instance only. @serve.batch works only inside a replica.
            self._batched = serve.batch(
                max_batch_size=self.options.max_batch_size,
                batch_wait_timeout_s=self.options.batch_wait_timeout_s,
                batch_size_fn=_count_examples,
            )(self._run_batch)

    # -- model

    def forward(self, arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One forward pass on raw-unit examples: (probabilities float32 (N, C), predictions int64 (N,), -1 if non-finite)."""
        x = normalize(torch.from_numpy(arr), self.spec.input).to(self.device)
        with torch.inference_mode():
            logits = self.model(x).float().cpu()
        probs = torch.softmax(logits, dim=1).numpy()
        preds = probs.argmax(1).astype(np.int64)
        preds[~np.isfinite(probs).all(1)] = -1
        return probs, preds

    async def _forward_async(self, arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.metrics is not None:
            self.metrics.batch.observe(len(arr))
        self.batches_run += 1
        self.largest_batch = max(self.largest_batch, len(arr))
        if self.options.forward_in_thread:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self.forward, arr)
        return self.forward(arr)

    async def _run_batch(self, arrays: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """``@serve.batch`` target: concatenate the requests' examples, one forward pass, split back."""
        probs, preds = await self._forward_async(np.concatenate(arrays) if len(arrays) > 1 else arrays[0])
        out, start = [], 0
        for a in arrays:
            out.append((probs[start : start + len(a)], preds[start : start + len(a)]))
            start += len(a)
        return out

    async def infer(self, arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Batched inference for one request's examples (a request larger than a batch, or any request outside
        a Serve replica, runs on its own)."""
        if self._batched is None or len(arr) > self.options.max_batch_size:
            return await self._forward_async(arr)
        return await self._batched(arr)

    def check_health(self) -> None:
        """Serve calls this every ``health_check_period_s``; raising makes Serve replace the replica."""
        probs, _ = self.forward(self._probe)
        if not np.isfinite(probs).all():
            self.ready = False
            raise RuntimeError("model answers NaN/Inf on a probe input")
        self.ready = True

    # -- request helpers

    def _denied(self, request: Request) -> JSONResponse | None:
        return api_key_denied(request, self.api_key)

    async def _json_body(self, request: Request, hint: str) -> Any:
        return await read_json_body(request, limit=self.options.max_body_bytes, hint=hint)

    def _unknown_model(self, name: str) -> JSONResponse | None:
        return unknown_model(name, self.options.name)

    def _probabilities_json(self, probs: np.ndarray) -> list[list[float | None]]:
        rows = probs.tolist()
        if np.isfinite(probs).all():
            return rows
        return [[v if math.isfinite(v) else None for v in row] for row in rows]

    def predict_array(self, arr: np.ndarray) -> dict[str, Any]:
        """Unbatched, in-process: the /v1/predict answer for ``arr``."""
        probs, preds = self.forward(arr)
        return {"model": self.options.name, "predictions": preds.tolist(), "probabilities": self._probabilities_json(probs)}

    # -- routes

    async def healthz(self):
        if not self.ready:
            return error_response(503, "model is not healthy")
        return {"status": "ok", "model": self.options.name}

    async def models(self, request: Request):
        if denied := self._denied(request):
            return denied
        return {"models": [{"name": self.options.name, "input_shape": self.spec.input.shape, "quantization": self.spec.quantization.method, "runtime": self.spec.runtime.name}]}

    def replica_info(self) -> dict[str, Any]:
        import ray

        return {
            "model": self.options.name,
            "replica_id": self.replica_id,
            "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else None,
            "device": str(self.device),
            "runtime": self.spec.runtime.name,
            "batches_run": self.batches_run,
            "largest_batch": self.largest_batch,
            "max_batch_size": self.options.max_batch_size,
        }

    async def replica(self, request: Request):
        if denied := self._denied(request):
            return denied
        return self.replica_info()

    async def predict(self, request: Request):
        if denied := self._denied(request):
            return denied
        try:
            payload = await self._json_body(request, '{"inputs": [...]}')
            try:
                req = PredictRequest.model_validate(payload)
            except ValidationError as err:
                raise RequestError(422, validation_message(err)) from None
            arr = parse_inputs(
                req.inputs, shape=self.spec.input.shape, min_value=self.spec.input.min_value,
                max_value=self.spec.input.max_value, max_examples=self.options.max_batch_examples,
            )
        except RequestError as err:
            return error_response(err.status, err.message)
        probs, preds = await self.infer(arr)
        return json_response({"model": self.options.name, "predictions": preds.tolist(), "probabilities": self._probabilities_json(probs)})

    async def v2_live(self):
        return {"live": True}

    async def v2_ready(self):
        return JSONResponse({"ready": self.ready}, status_code=200 if self.ready else 503)

    async def v2_model(self, name: str, request: Request):
        if denied := self._denied(request):
            return denied
        if missing := self._unknown_model(name):
            return missing
        n = -1
        return {
            "name": self.options.name,
            "versions": ["1"],
            "platform": "pytorch",
            "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [n, *self.spec.input.shape]}],
            "outputs": [
                {"name": "probabilities", "datatype": "FP32", "shape": [n, self.num_classes]},
                {"name": "predictions", "datatype": "INT64", "shape": [n]},
            ],
        }

    async def v2_model_ready(self, name: str, request: Request):
        if denied := self._denied(request):
            return denied
        if missing := self._unknown_model(name):
            return missing
        return JSONResponse({"name": self.options.name, "ready": self.ready}, status_code=200 if self.ready else 503)

    async def v2_infer(self, name: str, request: Request):
        if denied := self._denied(request):
            return denied
        if missing := self._unknown_model(name):
            return missing
        try:
            payload = await self._json_body(request, '{"inputs": [{"name", "shape", "datatype", "data"}]}')
            try:
                req = V2InferRequest.model_validate(payload)
            except ValidationError as err:
                raise RequestError(422, validation_message(err)) from None
            wanted = [o.name for o in req.outputs] if req.outputs else list(OUTPUT_NAMES)
            if unknown := [w for w in wanted if w not in OUTPUT_NAMES]:
                raise RequestError(422, f"unknown outputs {unknown}; this model has {list(OUTPUT_NAMES)}")
            arr = parse_v2_tensor(
                req.inputs[0], shape=self.spec.input.shape, min_value=self.spec.input.min_value,
                max_value=self.spec.input.max_value, max_examples=self.options.max_batch_examples,
            )
        except RequestError as err:
            return error_response(err.status, err.message)
        probs, preds = await self.infer(arr)
        tensors = {
            "probabilities": {"name": "probabilities", "shape": list(probs.shape), "datatype": "FP32",
                              "data": [v if math.isfinite(v) else None for v in probs.ravel().tolist()]},
            "predictions": {"name": "predictions", "shape": [len(preds)], "datatype": "INT64", "data": preds.tolist()},
        }
        answer: dict[str, Any] = {"model_name": self.options.name, "model_version": "1"}
        if req.id is not None:
            answer["id"] = req.id
        answer["outputs"] = [tensors[w] for w in wanted]
        return json_response(answer)


# ----------------------------------------------------------------------------------------- the FastAPI app


def _make_api() -> FastAPI:
    """The FastAPI app whose routes are ``SlimrayModel``'s methods."""
    api = FastAPI(title="slimray", description="Compressed model served by slimray on Ray Serve (v1 and Open Inference Protocol v2).")
    install_error_handlers(api)
    api.add_middleware(MetricsMiddleware)
    errors = {
        400: {"description": "unparseable or empty body"},
        401: {"description": "missing or wrong API key"},
        413: {"description": "body or batch too large"},
        422: {"description": "invalid inputs"},
    }

    def body(schema: type[BaseModel]) -> dict:
        return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema.model_json_schema()}}}}

    api.add_api_route("/healthz", SlimrayModel.healthz, methods=["GET"], tags=["health"])
    api.add_api_route("/v1/models", SlimrayModel.models, methods=["GET"], tags=["v1"])
    api.add_api_route("/v1/replica", SlimrayModel.replica, methods=["GET"], tags=["v1"], summary="which replica and node answered")
    api.add_api_route(
        "/v1/predict", SlimrayModel.predict, methods=["POST"], tags=["v1"], response_model=PredictResponse,
        openapi_extra=body(PredictRequest), responses=errors,
    )
    api.add_api_route("/v2/health/live", SlimrayModel.v2_live, methods=["GET"], tags=["v2"])
    api.add_api_route("/v2/health/ready", SlimrayModel.v2_ready, methods=["GET"], tags=["v2"])
    api.add_api_route("/v2/models/{name}", SlimrayModel.v2_model, methods=["GET"], tags=["v2"], responses={404: {"description": "unknown model"}})
    api.add_api_route("/v2/models/{name}/ready", SlimrayModel.v2_model_ready, methods=["GET"], tags=["v2"])
    api.add_api_route(
        "/v2/models/{name}/infer", SlimrayModel.v2_infer, methods=["POST"], tags=["v2"], response_model=V2InferResponse,
        openapi_extra=body(V2InferRequest), responses={**errors, 404: {"description": "unknown model"}},
    )
    return api


api = _make_api()
# The HTTP binding is made once per process at import (Serve resolves the class by reference inside each
# replica, so the route rewrite must happen there too); every deployment option is applied in build_app.
SlimrayIngress = serve.ingress(api)(SlimrayModel)


def deployment_options(options: ServeOptions) -> dict[str, Any]:
    """``serve.deployment`` keyword arguments for ``options`` (placement, scaling, limits, health checks)."""
    actor_options: dict[str, Any] = {"num_cpus": options.num_cpus_per_replica}
    if options.gpus_per_replica:
        actor_options["num_gpus"] = options.gpus_per_replica
    if os.environ.get(options.api_key_env):
        actor_options["runtime_env"] = {"env_vars": {options.api_key_env: os.environ[options.api_key_env]}}
    kwargs: dict[str, Any] = {
        "name": options.name,
        "ray_actor_options": actor_options,
        "max_ongoing_requests": options.max_ongoing_requests,
        "max_queued_requests": options.max_queued_requests,
        "health_check_period_s": options.health_check_period_s,
        "health_check_timeout_s": options.health_check_timeout_s,
    }
    if options.max_replicas is not None:
        kwargs["autoscaling_config"] = {
            "min_replicas": options.min_replicas if options.min_replicas is not None else 1,
            "max_replicas": options.max_replicas,
            "target_ongoing_requests": options.target_ongoing_requests,
        }
    else:
        kwargs["num_replicas"] = options.num_replicas
    if options.max_replicas_per_node is not None:
        kwargs["max_replicas_per_node"] = options.max_replicas_per_node
    if not options.access_log:
        kwargs["logging_config"] = {"enable_access_log": False}
    return kwargs


def build_app(options: ServeOptions, *, loader: Callable | None = None) -> serve.Application:
    """Apply the deployment options to the ingress class and bind it; deploys nothing."""
    app = serve.deployment(SlimrayIngress, **deployment_options(options)).bind(options.model_dump(), loader)
    # HTTP-level options live on the proxy, not the deployment: deploy() reads them from here.
    app._slimray_http_options = {"request_timeout_s": options.request_timeout_s}
    return app


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Entry point for ``serve run`` / ``serve deploy``: ``import_path: slimray.serving.app:app_builder``.

    ``request_timeout_s`` is an HTTP (proxy) option: in a Serve config file set ``http_options.request_timeout_s``.
    """
    return build_app(ServeOptions.from_dict(args, source="serve application args"))


def deploy(
    app: serve.Application,
    *,
    name: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    route_prefix: str = "/",
    request_timeout_s: float | None = None,
) -> str:
    """Start Serve's HTTP proxy on ``host:port`` (loopback by default), run ``app``, return its URL.

    ``request_timeout_s`` (default: the app's ``ServeOptions.request_timeout_s``) makes the proxy answer 408;
    it is set when the proxy starts, so an already running Serve keeps its value.
    """
    if request_timeout_s is None:
        request_timeout_s = getattr(app, "_slimray_http_options", {}).get("request_timeout_s")
    http_options: dict[str, Any] = {"host": host, "port": port}
    if request_timeout_s is not None:
        http_options["request_timeout_s"] = request_timeout_s
    serve.start(http_options=http_options)
    serve.run(app, name=name, route_prefix=route_prefix, blocking=False)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{shown}:{port}{route_prefix.rstrip('/')}"
