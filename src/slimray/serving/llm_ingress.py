"""Ray Serve LLM's OpenAI ingress with slimray's optional API key (imported only where vLLM is installed: the
``ray.serve.llm`` modules import vLLM).

Every route method of ``OpenAiIngress`` (``ROUTES``: the names ``make_fastapi_ingress`` maps to paths) is wrapped:
the wrapper takes the parent's exact signature (so FastAPI parses the same bodies), plus the request when the
parent does not take it, checks ``Authorization: Bearer <key>`` in constant time and calls the parent. The key is
read by the replica from its own environment or a file, never passed through Ray."""

from __future__ import annotations

import hmac
import inspect
from typing import Any

from fastapi import HTTPException, Request
from ray.serve.llm.ingress import OpenAiIngress

from slimray.serving.http import read_api_key

# the routes of Ray 2.60's OpenAiIngress (ray.llm ... ingress.DEFAULT_ENDPOINTS); tests/serving checks none is left unkeyed
ROUTES = ("models", "model_data", "completions", "chat", "embeddings", "transcriptions", "score", "tokenize", "detokenize")


def _keyed(name: str):
    parent = getattr(OpenAiIngress, name)
    sig = inspect.signature(parent)
    takes_request = "request" in sig.parameters

    async def route(self, **kwargs: Any):
        request = kwargs["request"] if takes_request else kwargs.pop("request")
        self._check(request)
        return await parent(self, **kwargs)

    params = list(sig.parameters.values())
    if not takes_request:
        params.append(inspect.Parameter("request", inspect.Parameter.KEYWORD_ONLY, annotation=Request))
    route.__signature__ = sig.replace(parameters=params)
    route.__name__ = name
    # Serve binds a route to the class by its method's __qualname__ prefix
    route.__qualname__ = f"KeyedOpenAiIngress.{name}"
    route.__doc__ = parent.__doc__
    return route


class KeyedOpenAiIngress(OpenAiIngress):
    """``OpenAiIngress`` whose every route checks the API key when one is configured."""

    def __init__(self, *args: Any, api_key_env: str, api_key_file: str | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._slimray_key = read_api_key(env=api_key_env, file=api_key_file)

    def _check(self, request: Request) -> None:
        if not self._slimray_key:
            return
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {self._slimray_key}".encode()):
            raise HTTPException(status_code=401, detail="missing or wrong API key (Authorization: Bearer <key>)")


for _name in ROUTES:
    if hasattr(OpenAiIngress, _name):
        setattr(KeyedOpenAiIngress, _name, _keyed(_name))
