"""Sentence embeddings on Ray Serve: the text pipeline's winner behind ``POST /v1/embed``.

``EmbedModel`` is left undecorated; ``build_embed_app(EmbedOptions(...), loader=...)`` applies the deployment
options to the module-level ingress class and returns a bound application, so nothing is deployed on
import (``embed_app_builder`` is the ``serve run`` / ``serve deploy`` entry point:
``slimray.serving.embed:embed_app_builder`` with the options as ``args``).

Routes (one model per application, named by the ``name`` option):

* ``POST /v1/embed`` ``{"texts": ["...", ...]}`` answers ``{"model", "dim", "embeddings": [[...]], "truncated": [...]}``:
  normalised mean-pooled embeddings; texts longer than the model's ``max_seq_len`` tokens are truncated
  (and flagged);
* ``POST /v2/models/{name}/infer`` (Open Inference Protocol): one ``BYTES`` input named ``text`` of shape
  ``[N]`` or ``[N, 1]``; the output ``embedding`` is ``FP32`` ``[N, dim]``;
* ``GET /healthz``, ``GET /v1/models``, ``GET /v2/health/live``, ``GET /v2/health/ready``, ``GET /v2/models/{name}``.

Tokenisation happens in the replica. Requests' texts are gathered into one forward pass by ``@serve.batch``
(``max_batch_size`` texts, ``batch_wait_timeout_s``), padded to the longest text of the batch, and split back.
Bad input gets a 4xx JSON ``{"error": ...}``: 400 unparseable/empty body, 422 missing or extra fields,
empty list, non-strings, empty strings, a text over ``max_text_chars``; 413 too many texts or too large a body.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, StrictStr, ValidationError
from ray import serve

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
INPUT_NAME = "text"
OUTPUT_NAME = "embedding"


class EmbedOptions(StrictModel):
    model_dir: str = Field(description="text artifact folder (model.safetensors + spec.json + tokenizer.json)")
    name: str = Field("minilm", pattern=NAME_PATTERN, description="model and application name (the V2 model name)")
    num_replicas: PositiveInt = 1
    num_cpus_per_replica: float = Field(1.0, ge=0)
    num_threads: PositiveInt = 1
    max_batch_size: PositiveInt = Field(32, description="most texts one batched forward pass takes")
    batch_wait_timeout_s: float = Field(0.005, ge=0, le=10)
    forward_in_thread: bool = True
    max_texts: PositiveInt = Field(256, description="most texts per request (413 above)")
    max_text_chars: PositiveInt = Field(4096, description="longest text accepted, in characters (422 above)")
    max_body_bytes: PositiveInt = 4 * 1024 * 1024
    max_ongoing_requests: PositiveInt = 16
    max_queued_requests: int = Field(256, ge=-1)
    health_check_period_s: PositiveFloat = 5.0
    health_check_timeout_s: PositiveFloat = 30.0
    api_key_env: str = "SLIMRAY_API_KEY"
    request_timeout_s: PositiveFloat | None = None


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[Any] = Field(description="sentences to embed (strings)")


class EmbedResponse(BaseModel):
    model: str
    dim: int
    embeddings: list[list[float]]
    truncated: list[bool]


class V2Tensor(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr
    shape: list[int]
    datatype: StrictStr
    data: list[Any]
    parameters: dict[str, Any] | None = None


class V2InferRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[V2Tensor] = Field(min_length=1, max_length=1, description="exactly one BYTES input named 'text'")
    outputs: list[dict[str, Any]] | None = None


def check_texts(texts: list[Any], *, max_texts: int, max_chars: int, where: str = "texts") -> list[str]:
    """Validate a request's texts; raises ``RequestError`` (422 / 413) naming the first bad item."""
    if len(texts) == 0:
        raise RequestError(422, f"{where} is empty: send at least one text")
    if len(texts) > max_texts:
        raise RequestError(413, f"{len(texts)} texts is more than the allowed {max_texts} per request")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise RequestError(422, f"{where}[{i}] must be a string, got {type(t).__name__}")
        if not t.strip():
            raise RequestError(422, f"{where}[{i}] is empty or whitespace")
        if len(t) > max_chars:
            raise RequestError(422, f"{where}[{i}] has {len(t)} characters, more than the allowed {max_chars}")
    return list(texts)


def _default_loader(model_dir: str):
    from slimray.text.models import load_text_artifact

    return load_text_artifact(model_dir)


class EmbedModel:
    """One replica: loads the text artifact and its tokenizer once, answers requests. Undecorated."""

    def __init__(self, options: dict[str, Any], loader: Callable[[str], tuple[torch.nn.Module, Any]] | None = None):
        from slimray.text.models import load_tokenizer

        self.options = EmbedOptions.model_validate(options)
        torch.set_num_threads(self.options.num_threads)
        self.model, self.spec = (loader or _default_loader)(self.options.model_dir)
        self.model.eval()
        self.max_seq_len = int(self.spec.max_seq_len)
        self.tokenizer = load_tokenizer(Path(self.options.model_dir), max_seq_len=self.max_seq_len)
        self.api_key = os.environ.get(self.options.api_key_env) or None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slimray-embed")
        probe, _ = self.embed(["ready"])
        self.embed(["warm-up batch of two", "texts of different lengths"])  # compiled models build their graphs now
        self.dim = int(probe.shape[1])
        self.ready = bool(np.isfinite(probe).all())
        self.batches_run = 0
        self.largest_batch = 0
        try:
            ctx = serve.get_replica_context()
        except Exception:
            ctx = None
        self._batched = None
        if ctx is not None:
            self._batched = serve.batch(
                max_batch_size=self.options.max_batch_size, batch_wait_timeout_s=self.options.batch_wait_timeout_s,
                batch_size_fn=lambda items: sum(len(x) for x in items),
            )(self._run_batch)

    # -- model

    def embed(self, texts: list[str]) -> tuple[np.ndarray, list[bool]]:
        """Tokenise (truncate at ``max_seq_len``, pad to the longest) and embed: float32 (N, dim), truncated flags."""
        from slimray.text.models import encode_batch, tokenize

        encs = self.tokenizer.encode_batch(texts)
        truncated = [len(e.overflowing) > 0 for e in encs]
        ids, mask = tokenize(self.tokenizer, texts, max_seq_len=self.max_seq_len)
        return encode_batch(self.model, ids, mask).numpy(), truncated

    async def _embed_async(self, texts: list[str]) -> tuple[np.ndarray, list[bool]]:
        self.batches_run += 1
        self.largest_batch = max(self.largest_batch, len(texts))
        if self.options.forward_in_thread:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self.embed, texts)
        return self.embed(texts)

    async def _run_batch(self, groups: list[list[str]]) -> list[tuple[np.ndarray, list[bool]]]:
        emb, trunc = await self._embed_async([t for g in groups for t in g])
        out, start = [], 0
        for g in groups:
            out.append((emb[start : start + len(g)], trunc[start : start + len(g)]))
            start += len(g)
        return out

    async def infer(self, texts: list[str]) -> tuple[np.ndarray, list[bool]]:
        if self._batched is None or len(texts) > self.options.max_batch_size:
            return await self._embed_async(texts)
        return await self._batched(texts)

    def check_health(self) -> None:
        emb, _ = self.embed(["health check"])
        self.ready = bool(np.isfinite(emb).all())
        if not self.ready:
            raise RuntimeError("model answers NaN/Inf on a probe text")

    # -- helpers

    def _denied(self, request: Request) -> JSONResponse | None:
        return api_key_denied(request, self.api_key)

    async def _json_body(self, request: Request, hint: str) -> Any:
        return await read_json_body(request, limit=self.options.max_body_bytes, hint=hint)

    def _unknown_model(self, name: str) -> JSONResponse | None:
        return unknown_model(name, self.options.name)

    # -- routes

    async def healthz(self):
        if not self.ready:
            return error_response(503, "model is not healthy")
        return {"status": "ok", "model": self.options.name}

    async def models(self, request: Request):
        if denied := self._denied(request):
            return denied
        return {"models": [{"name": self.options.name, "dim": self.dim, "max_seq_len": self.max_seq_len,
                            "quantization": self.spec.quantization, "max_texts": self.options.max_texts}]}

    async def embed_route(self, request: Request):
        if denied := self._denied(request):
            return denied
        try:
            payload = await self._json_body(request, '{"texts": ["...", ...]}')
            try:
                req = EmbedRequest.model_validate(payload)
            except ValidationError as err:
                raise RequestError(422, validation_message(err)) from None
            texts = check_texts(req.texts, max_texts=self.options.max_texts, max_chars=self.options.max_text_chars)
        except RequestError as err:
            return error_response(err.status, err.message)
        emb, trunc = await self.infer(texts)
        return json_response({"model": self.options.name, "dim": self.dim, "embeddings": emb.tolist(), "truncated": trunc})

    async def v2_live(self):
        return {"live": True}

    async def v2_ready(self):
        return JSONResponse({"ready": self.ready}, status_code=200 if self.ready else 503)

    async def v2_model(self, name: str, request: Request):
        if denied := self._denied(request):
            return denied
        if missing := self._unknown_model(name):
            return missing
        return {
            "name": self.options.name, "versions": ["1"], "platform": "pytorch",
            "inputs": [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, self.dim]}],
        }

    async def v2_infer(self, name: str, request: Request):
        if denied := self._denied(request):
            return denied
        if missing := self._unknown_model(name):
            return missing
        try:
            payload = await self._json_body(request, '{"inputs": [{"name": "text", "shape": [N], "datatype": "BYTES", "data": [...]}]}')
            try:
                req = V2InferRequest.model_validate(payload)
            except ValidationError as err:
                raise RequestError(422, validation_message(err)) from None
            t = req.inputs[0]
            if t.name != INPUT_NAME:
                raise RequestError(422, f"unknown input {t.name!r}: this model has one input named {INPUT_NAME!r}")
            if t.datatype.upper() != "BYTES":
                raise RequestError(422, f"datatype {t.datatype!r} is not supported: send BYTES (UTF-8 strings)")
            if t.shape not in ([len(t.data)], [len(t.data), 1]):
                raise RequestError(422, f"shape {t.shape} does not match {len(t.data)} data items; use [N] or [N, 1]")
            if req.outputs and any(o.get("name") != OUTPUT_NAME for o in req.outputs):
                raise RequestError(422, f"unknown outputs; this model has one output named {OUTPUT_NAME!r}")
            texts = check_texts(t.data, max_texts=self.options.max_texts, max_chars=self.options.max_text_chars, where="data")
        except RequestError as err:
            return error_response(err.status, err.message)
        emb, _ = await self.infer(texts)
        answer: dict[str, Any] = {"model_name": self.options.name, "model_version": "1"}
        if req.id is not None:
            answer["id"] = req.id
        answer["outputs"] = [{"name": OUTPUT_NAME, "shape": list(emb.shape), "datatype": "FP32", "data": emb.ravel().tolist()}]
        return json_response(answer)


def _make_api() -> FastAPI:
    api = FastAPI(title="slimray embeddings", description="Sentence embeddings from a slimray-compressed encoder on Ray Serve.")
    install_error_handlers(api)
    errors = {400: {"description": "unparseable or empty body"}, 401: {"description": "missing or wrong API key"},
              413: {"description": "too many texts or body too large"}, 422: {"description": "invalid texts"}}

    def body(schema: type[BaseModel]) -> dict:
        return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema.model_json_schema()}}}}

    api.add_api_route("/healthz", EmbedModel.healthz, methods=["GET"], tags=["health"])
    api.add_api_route("/v1/models", EmbedModel.models, methods=["GET"], tags=["v1"])
    api.add_api_route("/v1/embed", EmbedModel.embed_route, methods=["POST"], tags=["v1"], response_model=EmbedResponse,
                      openapi_extra=body(EmbedRequest), responses=errors)
    api.add_api_route("/v2/health/live", EmbedModel.v2_live, methods=["GET"], tags=["v2"])
    api.add_api_route("/v2/health/ready", EmbedModel.v2_ready, methods=["GET"], tags=["v2"])
    api.add_api_route("/v2/models/{name}", EmbedModel.v2_model, methods=["GET"], tags=["v2"])
    api.add_api_route("/v2/models/{name}/infer", EmbedModel.v2_infer, methods=["POST"], tags=["v2"],
                      openapi_extra=body(V2InferRequest), responses={**errors, 404: {"description": "unknown model"}})
    return api


api = _make_api()
EmbedIngress = serve.ingress(api)(EmbedModel)


def deployment_options(options: EmbedOptions) -> dict[str, Any]:
    actor_options: dict[str, Any] = {"num_cpus": options.num_cpus_per_replica}
    if os.environ.get(options.api_key_env):
        actor_options["runtime_env"] = {"env_vars": {options.api_key_env: os.environ[options.api_key_env]}}
    return {
        "name": options.name, "num_replicas": options.num_replicas, "ray_actor_options": actor_options,
        "max_ongoing_requests": options.max_ongoing_requests, "max_queued_requests": options.max_queued_requests,
        "health_check_period_s": options.health_check_period_s, "health_check_timeout_s": options.health_check_timeout_s,
    }


def build_embed_app(options: EmbedOptions, *, loader: Callable[[str], tuple[torch.nn.Module, Any]] | None = None) -> serve.Application:
    """Apply the deployment options to the ingress class and bind it; deploys nothing."""
    app = serve.deployment(EmbedIngress, **deployment_options(options)).bind(options.model_dump(), loader)
    app._slimray_http_options = {"request_timeout_s": options.request_timeout_s}
    return app


def embed_app_builder(args: dict[str, Any]) -> serve.Application:
    """Entry point for ``serve run`` / ``serve deploy``: ``import_path: slimray.serving.embed:embed_app_builder``."""
    return build_embed_app(EmbedOptions.from_dict(args, source="serve application args"))


def embed_options_for_run(run_dir: str | Path, *, serve_config: Any = None, **overrides: Any) -> EmbedOptions:
    """Options serving the winner of a finished text run: ``serve_config`` is the run's ``TextServeConfig``
    (or None: read from ``run_dir/config.json``); ``overrides`` (e.g. ``num_replicas``) win over both."""
    run_dir = Path(run_dir)
    if serve_config is None:
        from slimray.text.config import TextPipelineConfig

        cfg = TextPipelineConfig.from_file(run_dir / "config.json")
        serve_config, name = cfg.serve, cfg.name
    else:
        name = run_dir.name
    opts = {
        "model_dir": str(run_dir / "winner"), "name": name, "num_replicas": serve_config.num_replicas,
        "num_cpus_per_replica": serve_config.num_cpus_per_replica, "num_threads": serve_config.num_threads,
        "max_batch_size": serve_config.max_batch_size, "batch_wait_timeout_s": serve_config.batch_wait_timeout_s,
        "max_texts": serve_config.max_texts, "max_text_chars": serve_config.max_text_chars,
    }
    opts.update({k: v for k, v in overrides.items() if v is not None})
    return EmbedOptions.model_validate(opts)
