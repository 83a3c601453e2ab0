"""The HTTP endpoint on Ray Serve.

``SlimrayModel`` is left undecorated; ``build_app(ServeOptions(...))`` applies the FastAPI ingress and the
deployment options and returns a bound application, so nothing is deployed on import. For ``serve run``
and ``serve deploy`` the import path is ``slimray.serving.app:app_builder`` with the options as ``args``
(see ``serve/*.yaml``).

Routes: ``POST /v1/predict`` (``{"inputs": [...]}``, examples in the dataset's raw units; normalisation
happens here), ``GET /healthz``, ``GET /v1/models``, and the OpenAPI page at ``/docs``.
Every malformed request gets a 4xx JSON ``{"error": ...}``; an optional API key (environment variable
named by ``api_key_env``) is checked with ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``.
"""

from __future__ import annotations

import hmac
import json
import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError
from ray import serve

from slimray.artifacts import load_artifact
from slimray.data import normalize
from slimray.schema import StrictModel


class ServeOptions(StrictModel):
    model_dir: str = Field(description="artifact folder (model.safetensors + spec.json) to serve")
    name: str = Field("slimray", description="model and application name")
    num_replicas: PositiveInt = 1
    num_cpus_per_replica: float = Field(1.0, ge=0)
    num_threads: PositiveInt = 1
    max_batch_examples: PositiveInt = 1024
    max_body_bytes: PositiveInt = 16 * 1024 * 1024
    max_ongoing_requests: PositiveInt = 16
    api_key_env: str = "SLIMRAY_API_KEY"


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: list[Any] = Field(description="a batch of examples as nested lists, in the dataset's raw units")


class PredictResponse(BaseModel):
    model: str
    predictions: list[int]
    probabilities: list[list[float | None]]


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def parse_inputs(raw: Any, *, shape: list[int], min_value: float, max_value: float, max_examples: int) -> np.ndarray:
    """Validate ``inputs`` and return a float32 array of shape (N, *shape); raises ``RequestError``."""
    if len(raw) == 0:
        raise RequestError(422, "inputs is empty: send at least one example")
    if len(raw) > max_examples:
        raise RequestError(413, f"batch of {len(raw)} examples is larger than the allowed {max_examples}")
    try:
        arr = np.asarray(raw)
    except ValueError:
        raise RequestError(422, "inputs must be a rectangular nested list of numbers (rows of unequal length)") from None
    if arr.dtype.kind not in "iuf":
        raise RequestError(422, f"inputs must hold only numbers (got {arr.dtype.kind!r} values: strings, booleans, nulls or ragged rows)")
    arr = arr.astype(np.float32)
    example = tuple(arr.shape[1:])
    squeezed = tuple(d for d in shape if d != 1) if len(shape) > 1 else tuple(shape)
    accepted = {tuple(shape), squeezed, (math.prod(shape),)}
    if example not in accepted:
        allowed = " or ".join(str(list(s)) for s in sorted(accepted, key=len, reverse=True))
        raise RequestError(422, f"each example must have shape {allowed}; got {list(example)}")
    if not np.isfinite(arr).all():
        raise RequestError(422, "inputs contain NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < min_value or hi > max_value:
        raise RequestError(422, f"input values must lie in [{min_value:g}, {max_value:g}] (raw units); got [{lo:g}, {hi:g}]")
    return arr.reshape(len(arr), *shape)


class SlimrayModel:
    """One replica: loads the artifact once, answers requests. Undecorated; see ``build_app``."""

    def __init__(self, options: dict[str, Any], loader: Callable[[str], tuple[torch.nn.Module, Any]] | None = None):
        self.options = ServeOptions.model_validate(options)
        torch.set_num_threads(self.options.num_threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.spec = (loader or load_artifact)(self.options.model_dir)
        if self.device.type == "cuda" and self.spec.quantization.method in ("none", "bf16"):
            self.model = self.model.to(self.device)
        else:
            self.device = torch.device("cpu")
        self.api_key = os.environ.get(self.options.api_key_env) or None

    def _authorised(self, request: Request) -> bool:
        if self.api_key is None:
            return True
        given = request.headers.get("x-api-key") or ""
        auth = request.headers.get("authorization") or ""
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        return hmac.compare_digest(given.encode(), self.api_key.encode())

    def predict_array(self, arr: np.ndarray) -> dict[str, Any]:
        x = normalize(torch.from_numpy(arr), self.spec.input).to(self.device)
        with torch.inference_mode():
            logits = self.model(x).float().cpu()
        probs = torch.softmax(logits, dim=1)
        finite = torch.isfinite(probs).all(dim=1)
        preds = [int(p) if ok else -1 for p, ok in zip(probs.argmax(1).tolist(), finite.tolist())]
        return {
            "model": self.options.name,
            "predictions": preds,
            "probabilities": [[v if math.isfinite(v) else None for v in row] for row in probs.tolist()],
        }

    async def healthz(self) -> dict[str, str]:
        return {"status": "ok", "model": self.options.name}

    async def models(self, request: Request):
        if not self._authorised(request):
            return _error(401, "missing or wrong API key")
        return {"models": [{"name": self.options.name, "input_shape": self.spec.input.shape, "quantization": self.spec.quantization.method}]}

    async def predict(self, request: Request):
        if not self._authorised(request):
            return _error(401, "missing or wrong API key")
        body = await request.body()
        if len(body) > self.options.max_body_bytes:
            return _error(413, f"request body of {len(body)} bytes exceeds the limit of {self.options.max_body_bytes}")
        if not body:
            return _error(400, "empty request body: send JSON {\"inputs\": [...]}")
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return _error(400, f"request body is not valid JSON: {err}")
        try:
            req = PredictRequest.model_validate(payload)
        except ValidationError as err:
            msgs = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in err.errors())
            return _error(422, msgs)
        try:
            arr = parse_inputs(
                req.inputs, shape=self.spec.input.shape, min_value=self.spec.input.min_value,
                max_value=self.spec.input.max_value, max_examples=self.options.max_batch_examples,
            )
        except RequestError as err:
            return _error(err.status, err.message)
        return self.predict_array(arr)


def _make_api() -> FastAPI:
    """The FastAPI app whose routes are ``SlimrayModel``'s methods."""
    api = FastAPI(title="slimray", description="Compressed model served by slimray on Ray Serve.")
    api.add_api_route("/healthz", SlimrayModel.healthz, methods=["GET"])
    api.add_api_route("/v1/models", SlimrayModel.models, methods=["GET"])
    api.add_api_route(
        "/v1/predict",
        SlimrayModel.predict,
        methods=["POST"],
        response_model=PredictResponse,
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": PredictRequest.model_json_schema()}}}},
        responses={
            400: {"description": "unparseable or empty body"},
            401: {"description": "missing or wrong API key"},
            413: {"description": "body or batch too large"},
            422: {"description": "invalid inputs"},
        },
    )
    return api


api = _make_api()
# The HTTP binding is made once per process at import (Serve resolves the class by reference inside each
# replica, so the route rewrite must happen there too); every deployment option is applied in build_app.
SlimrayIngress = serve.ingress(api)(SlimrayModel)


def build_app(options: ServeOptions, *, loader: Callable | None = None) -> serve.Application:
    """Apply ingress and deployment options to ``SlimrayModel`` and bind it; deploys nothing."""
    env = {}
    if os.environ.get(options.api_key_env):
        env[options.api_key_env] = os.environ[options.api_key_env]
    actor_options: dict[str, Any] = {"num_cpus": options.num_cpus_per_replica}
    if env:
        actor_options["runtime_env"] = {"env_vars": env}
    deployment = serve.deployment(
        SlimrayIngress,
        name=options.name,
        num_replicas=options.num_replicas,
        ray_actor_options=actor_options,
        max_ongoing_requests=options.max_ongoing_requests,
        health_check_period_s=5,
    )
    return deployment.bind(options.model_dump(), loader)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Entry point for ``serve run`` / ``serve deploy``: ``import_path: slimray.serving.app:app_builder``."""
    return build_app(ServeOptions.from_dict(args, source="serve application args"))


def deploy(app: serve.Application, *, name: str, host: str = "127.0.0.1", port: int = 8000, route_prefix: str = "/") -> str:
    """Start Serve's HTTP proxy on ``host:port`` (loopback by default), run ``app``, return its URL."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=name, route_prefix=route_prefix, blocking=False)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{shown}:{port}{route_prefix.rstrip('/')}"
