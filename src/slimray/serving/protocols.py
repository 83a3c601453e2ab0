"""The HTTP ingress: every protocol's routes over one ``ModelServer``, built per replica by ``build_api``.

Protocols call only the codec (``slimray.serving.codecs``) and ``ModelServer.infer``, so they work for every
model kind. Routes (one model per application; its name is the ``name`` option):

* native v1: ``POST /v1/<verb>`` (``/v1/predict`` for a classifier: ``{"inputs": [...]}``, or a binary body —
  raw little-endian float32 with ``X-Shape: N,C,H,W``, or ``.npy`` as ``application/x-npy``, never pickle;
  ``/v1/embed`` for a sentence encoder: ``{"texts": [...]}``), ``GET /healthz``, ``GET /v1/models``,
  ``GET /v1/replica`` (which replica and node answered);
* KServe v1 / TF Serving REST: ``POST /v1/models/{name}:predict`` ``{"instances": [...]}`` ->
  ``{"predictions": [...]}``, ``GET /v1/models/{name}``;
* Open Inference Protocol (KServe v2) REST, JSON or with the binary tensor data extension
  (``Inference-Header-Content-Length``, ``binary_data_size`` inputs, ``binary_data`` / ``binary_data_output``
  outputs): ``GET /v2/health/live``, ``/v2/health/ready``, ``/v2/models/{name}``, ``/v2/models/{name}/ready``,
  ``POST /v2/models/{name}/infer``.

Bad input gets a 4xx JSON ``{"error": ...}``; the optional API key is checked on every route except the health
checks. Metrics (requests by route and status, latency, batch sizes) go to Ray's Prometheus exporter.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from slimray.serving.codecs import v2_datatype
from slimray.serving.http import (
    RequestError,
    api_key_denied,
    error_response,
    install_error_handlers,
    json_bytes,
    json_response,
    parse_json,
    read_body,
    AllowOptions,
    unknown_model,
    validation_message,
)
from slimray.serving.model import ModelServer

NPY_TYPES = ("application/x-npy", "application/npy")
RAW_TYPE = "application/octet-stream"
SHAPE_HEADER = "x-shape"
HEADER_LENGTH = "inference-header-content-length"

# ----------------------------------------------------------------------------------------- schemas (OpenAPI + V2 checks)


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: list[Any] = Field(description="a non-empty batch of examples as nested lists, in the dataset's raw units",
                              json_schema_extra={"minItems": 1})


class PredictResponse(BaseModel):
    model: str
    predictions: list[int]
    probabilities: list[list[float | None]]


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[Any] = Field(description="sentences to embed (strings), at least one", json_schema_extra={"minItems": 1})


class EmbedResponse(BaseModel):
    model: str
    dim: int
    embeddings: list[list[float | None]]
    truncated: list[bool]


class InstancesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instances: list[Any] = Field(description="examples (classifier) or strings (sentence encoder), at least one",
                                 json_schema_extra={"minItems": 1})


class PredictionsResponse(BaseModel):
    predictions: list[Any]


class V2Tensor(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr
    shape: list[StrictInt]
    datatype: StrictStr
    data: list[Any] | None = Field(None, description="row-major values, flat or nested (absent with binary_data_size)")
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
    data: list[float | int | None] | None = None
    parameters: dict[str, Any] | None = None


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    outputs: list[V2OutputTensor]


class ErrorResponse(BaseModel):
    error: str


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


class MetricsMiddleware:
    """Pure ASGI middleware: counts every answer (404/405 from routing too) by route template and status."""

    def __init__(self, app: Callable, metrics: _Metrics | None = None) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or self.metrics is None:
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
            self.metrics.record(getattr(route, "path", "unmatched"), status, (time.perf_counter() - start) * 1000)


# ----------------------------------------------------------------------------------------- binary bodies


def parse_binary_array(body: bytes, *, content_type: str, shape_header: str | None) -> np.ndarray:
    """A binary ``/v1/<verb>`` body as an array: ``.npy`` (``np.load(allow_pickle=False)``) or raw little-endian
    float32 whose shape is the ``X-Shape`` header (``N,C,H,W``)."""
    if not body:
        raise RequestError(400, "empty request body")
    if content_type in NPY_TYPES:
        try:
            arr = np.load(io.BytesIO(body), allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise RequestError(400, f"body is not a valid .npy array (object arrays are refused): {err}") from None
        if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "iuf":
            raise RequestError(422, "the .npy array must hold numbers")
        return arr
    if not shape_header:
        raise RequestError(400, "a raw float32 body needs the X-Shape header, e.g. X-Shape: 1,1,28,28")
    try:
        dims = [int(d) for d in shape_header.replace("x", ",").split(",") if d.strip()]
    except ValueError:
        raise RequestError(400, f"X-Shape must be comma-separated integers, got {shape_header[:100]!r}") from None
    if not dims or any(d < 0 for d in dims):
        raise RequestError(400, f"X-Shape must list positive dimensions, batch first; got {shape_header[:100]!r}")
    if len(body) != math.prod(dims) * 4:
        raise RequestError(422, f"body has {len(body)} bytes but X-Shape {dims} of float32 needs {math.prod(dims) * 4}")
    return np.frombuffer(body, dtype="<f4").reshape(dims)


def split_v2_body(body: bytes, header_length: str | None) -> tuple[Any, bytes | None]:
    """(JSON part parsed, binary part or None) of an Open Inference Protocol request body."""
    hint = '{"inputs": [{"name", "shape", "datatype", "data"}]}'
    if header_length is None:
        return parse_json(body, hint=hint), None
    if not header_length.isdigit() or int(header_length) > len(body):
        raise RequestError(400, f"Inference-Header-Content-Length {header_length[:20]!r} does not fit a body of {len(body)} bytes")
    n = int(header_length)
    return parse_json(body[:n], hint=hint), body[n:]


def _flag(params: dict[str, Any] | None, key: str) -> bool:
    return bool(params and params.get(key) is True)


# ----------------------------------------------------------------------------------------- the API


def ingress_for(codec: Any) -> Callable[..., FastAPI]:
    """The HTTP ingress builder of ``codec``'s family: its ``ingress`` import path (default: ``build_api``)."""
    from slimray.families import resolve

    path = getattr(codec, "ingress", None)
    return build_api if path in (None, "slimray.serving.protocols:build_api") else resolve(path)


def build_api(server: ModelServer, *, api_key: str | None, metrics: bool = False) -> FastAPI:
    """The FastAPI app of one replica (or an in-process server): routes for ``server``'s model kind."""
    codec, options = server.codec, server.options
    served = options.name
    limit = options.max_body_bytes
    api = FastAPI(title=f"slimray {codec.kind}",
                  description="A slimray-compressed model on Ray Serve: native v1, KServe v1 and Open Inference Protocol v2.")
    install_error_handlers(api)
    m = _Metrics() if metrics else None
    if m is not None:
        server.on_batch = m.batch.observe
    api.add_middleware(MetricsMiddleware, metrics=m)
    api.add_middleware(AllowOptions, api=api)

    def guard(request: Request, model: str | None = None) -> Response | None:
        if denied := api_key_denied(request, api_key):
            return denied
        if model is not None:
            return unknown_model(model, served)
        return None

    # -- health and discovery

    async def healthz():
        if not server.ready:
            return error_response(503, "model is not healthy")
        return {"status": "ok", "model": served}

    async def models(request: Request):
        if denied := guard(request):
            return denied
        return {"models": [{"name": served, **codec.describe()}]}

    async def replica(request: Request):
        if denied := guard(request):
            return denied
        return server.info()

    # -- native v1

    async def v1_native(request: Request):
        if denied := guard(request):
            return denied
        try:
            body = await read_body(request, limit=limit)
            ctype = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
            if ctype in NPY_TYPES or ctype == RAW_TYPE:
                if not codec.binary_bodies:
                    raise RequestError(415, f"a {codec.kind} takes JSON bodies only: send {codec.v1_hint}")
                items = codec.parse_array(parse_binary_array(body, content_type=ctype, shape_header=request.headers.get(SHAPE_HEADER)))
            else:
                items = codec.parse_v1(parse_json(body, hint=codec.v1_hint))
        except RequestError as err:
            return error_response(err.status, err.message)
        out = await server.infer(items)
        return json_response({"model": served, **codec.v1_answer(out)})

    # -- KServe v1 / TF Serving REST

    async def v1_model(name: str, request: Request):
        if denied := guard(request, name):
            return denied
        state = "AVAILABLE" if server.ready else "UNAVAILABLE"
        return JSONResponse({"name": served, "ready": server.ready, "model_version_status": [
            {"version": "1", "state": state, "status": {"error_code": "OK", "error_message": ""}}]},
            status_code=200 if server.ready else 503)

    async def v1_predict(name: str, request: Request):
        if denied := guard(request, name):
            return denied
        try:
            payload = parse_json(await read_body(request, limit=limit), hint='{"instances": [...]}')
            try:
                req = InstancesRequest.model_validate(payload)
            except ValidationError as err:
                raise RequestError(422, validation_message(err)) from None
            items = codec.parse_instances(req.instances)
        except RequestError as err:
            return error_response(err.status, err.message)
        return json_response({"predictions": codec.predictions(await server.infer(items))})

    # -- Open Inference Protocol v2

    async def v2_live():
        return {"live": True}

    async def v2_ready():
        return JSONResponse({"ready": server.ready}, status_code=200 if server.ready else 503)

    async def v2_model(name: str, request: Request):
        if denied := guard(request, name):
            return denied
        return {"name": served, "versions": ["1"], "platform": "pytorch", **codec.v2_metadata()}

    async def v2_model_ready(name: str, request: Request):
        if denied := guard(request, name):
            return denied
        return JSONResponse({"name": served, "ready": server.ready}, status_code=200 if server.ready else 503)

    async def v2_infer(name: str, request: Request):
        if denied := guard(request, name):
            return denied
        try:
            payload, binary = split_v2_body(await read_body(request, limit=limit), request.headers.get(HEADER_LENGTH))
            try:
                req = V2InferRequest.model_validate(payload)
            except ValidationError as err:
                raise RequestError(422, validation_message(err)) from None
            tensor = req.inputs[0]
            raw = None
            size = (tensor.parameters or {}).get("binary_data_size")
            if size is not None:
                if binary is None:
                    raise RequestError(400, "binary_data_size given without the Inference-Header-Content-Length header")
                if type(size) is not int or size < 0 or size != len(binary):
                    raise RequestError(400, f"binary_data_size {size!r} does not match the {len(binary)} bytes after the JSON header")
                raw = binary
            elif binary:
                raise RequestError(400, f"{len(binary)} bytes after the JSON header but no input has binary_data_size")
            wanted = [o.name for o in req.outputs] if req.outputs else list(codec.output_names)
            if unknown := [w for w in wanted if w not in codec.output_names]:
                raise RequestError(422, f"unknown outputs {unknown}; this model has {list(codec.output_names)}")
            items = codec.parse_v2(tensor, raw)
        except RequestError as err:
            return error_response(err.status, err.message)
        out = await server.infer(items)
        all_binary = _flag(req.parameters, "binary_data_output")
        per_output = {o.name: o.parameters for o in req.outputs or []}
        tensors, blobs = [], []
        for w in wanted:
            arr = out[w]
            t: dict[str, Any] = {"name": w, "datatype": v2_datatype(arr), "shape": list(arr.shape)}
            params = per_output.get(w)
            if (params and "binary_data" in params and params["binary_data"] is True) or (all_binary and not (params and params.get("binary_data") is False)):
                blob = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()
                t["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                t["data"] = arr.ravel().tolist()
            tensors.append(t)
        answer: dict[str, Any] = {"model_name": served, "model_version": "1"}
        if req.id is not None:
            answer["id"] = req.id
        answer["outputs"] = tensors
        if not blobs:
            return json_response(answer)
        header = json_bytes(answer)
        return Response(header + b"".join(blobs), media_type=RAW_TYPE, headers={"Inference-Header-Content-Length": str(len(header))})

    # -- routes and their documentation

    err = {"model": ErrorResponse}
    errors = {
        400: {**err, "description": "unparseable or empty body"},
        401: {**err, "description": "missing or wrong API key"},
        413: {**err, "description": "body or batch too large"},
        415: {**err, "description": "binary body sent to a model that takes JSON only"},
        422: {**err, "description": "invalid inputs"},
    }
    auth = {401: errors[401]}
    missing = {404: {**err, "description": "unknown model"}}
    unready = {503: {**err, "description": "model not ready"}}
    defs: dict[str, Any] = {}

    def body(schema: type[BaseModel], *, binary: bool = False) -> dict:
        doc = schema.model_json_schema(ref_template="#/components/schemas/{model}")
        defs.update(doc.pop("$defs", {}))
        content: dict[str, Any] = {"application/json": {"schema": doc}}
        if binary:
            content[RAW_TYPE] = {"schema": {"type": "string", "format": "binary"}}
        return {"requestBody": {"required": True, "content": content}}

    native_req, native_resp = (PredictRequest, PredictResponse) if codec.v1_verb == "predict" else (EmbedRequest, EmbedResponse)
    native_body = body(native_req)
    if codec.v1_verb == "predict":
        example = ",".join(map(str, [1, *getattr(getattr(getattr(codec, "spec", None), "input", None), "shape", [1, 28, 28])]))
        native_body["requestBody"]["content"].update({
            RAW_TYPE: {"schema": {"type": "string", "format": "binary",
                                  "description": "raw little-endian float32, row-major; needs the X-Shape header"}},
            NPY_TYPES[0]: {"schema": {"type": "string", "format": "binary", "description": "a .npy array (no pickle)"}}})
        native_body["parameters"] = [{
            "name": "X-Shape", "in": "header", "required": False,
            "description": "required with an application/octet-stream body: its shape, batch first "
                           f"(e.g. {example}); ignored with JSON and .npy bodies",
            "schema": {"type": "string", "pattern": "^[0-9]+(,[0-9]+)*$", "example": example}}]
    api.add_api_route("/healthz", healthz, methods=["GET"], tags=["health"], responses=unready)
    api.add_api_route("/v1/models", models, methods=["GET"], tags=["v1"], responses=auth)
    api.add_api_route("/v1/replica", replica, methods=["GET"], tags=["v1"], summary="which replica and node answered", responses=auth)
    api.add_api_route(f"/v1/{codec.v1_verb}", v1_native, methods=["POST"], tags=["v1"], response_model=native_resp,
                      openapi_extra=native_body, responses=errors)
    api.add_api_route("/v1/models/{name}", v1_model, methods=["GET"], tags=["kserve-v1"], responses={**auth, **missing, **unready})
    api.add_api_route("/v1/models/{name}:predict", v1_predict, methods=["POST"], tags=["kserve-v1"], response_model=PredictionsResponse,
                      openapi_extra=body(InstancesRequest), responses={**errors, **missing})
    api.add_api_route("/v2/health/live", v2_live, methods=["GET"], tags=["v2"])
    api.add_api_route("/v2/health/ready", v2_ready, methods=["GET"], tags=["v2"], responses=unready)
    api.add_api_route("/v2/models/{name}", v2_model, methods=["GET"], tags=["v2"], responses={**auth, **missing})
    api.add_api_route("/v2/models/{name}/ready", v2_model_ready, methods=["GET"], tags=["v2"], responses={**auth, **missing, **unready})
    api.add_api_route("/v2/models/{name}/infer", v2_infer, methods=["POST"], tags=["v2"], response_model=V2InferResponse,
                      openapi_extra=body(V2InferRequest, binary=True), responses={**errors, **missing})

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            doc = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
            doc.setdefault("components", {}).setdefault("schemas", {}).update(defs)
            api.openapi_schema = doc
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]
    return api
