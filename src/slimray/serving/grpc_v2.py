"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService``) through Ray Serve's gRPC proxy.

``GrpcInference`` is a mixin of the replica class: Serve's gRPC proxy calls the replica method named like the RPC
(``ServerLive``, ``ServerReady``, ``ModelReady``, ``ServerMetadata``, ``ModelMetadata``, ``ModelInfer``) with the
request message. Inputs come as typed ``contents`` or ``raw_input_contents`` (tritonclient's default); outputs go
back as ``raw_output_contents`` (little-endian bytes), as standard clients expect. Bad input sets a gRPC status
(INVALID_ARGUMENT, NOT_FOUND, UNAUTHENTICATED, RESOURCE_EXHAUSTED) with the message.

Serve's proxy is started with ``grpc_options`` naming ``SERVICER_FUNCTION`` (``deploy(..., grpc_port=N)``; from the
command line ``serve.grpc_port`` / ``--grpc-port``). In Ray 2.60 that proxy binds every interface (``[::]:N``): its
options have no host. The proxy pickles each request message to the replica, so the generated classes carry their
package module name (``slimray.serving.grpc.inference_pb2``). The generated message modules are imported lazily
(inside the proxy and the replica): a client process that loads another copy of the same ``inference`` package
(e.g. tritonclient.grpc) never imports them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from slimray.serving.codecs import v2_datatype
from slimray.serving.http import RequestError

SERVICER_FUNCTION = "slimray.serving.grpc.inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server"

_CONTENTS = {  # datatype -> the InferTensorContents field that carries it
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


@dataclass
class _Tensor:
    """What the codecs read of a V2 input tensor (the JSON route passes its pydantic model instead)."""

    name: str
    datatype: str
    shape: list[int]
    data: list[Any] | None


def _pb():
    from slimray.serving.grpc import inference_pb2

    return inference_pb2


def _status(code_name: str):
    import grpc

    return getattr(grpc.StatusCode, code_name)


_HTTP_TO_GRPC = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 413: "RESOURCE_EXHAUSTED",
                 415: "INVALID_ARGUMENT", 422: "INVALID_ARGUMENT"}


class GrpcInference:
    """Mixin for the replica class: needs ``self.server`` (a ``ModelServer``) and ``self.api_key``."""

    def _fail(self, grpc_context, status: int, message: str, response):
        if grpc_context is not None:
            grpc_context.set_code(_status(_HTTP_TO_GRPC.get(status, "INVALID_ARGUMENT")))
            grpc_context.set_details(message)
        return response

    def _denied(self, grpc_context) -> bool:
        import hmac

        if self.api_key is None:
            return False
        meta = dict(grpc_context.invocation_metadata()) if grpc_context is not None else {}
        given = meta.get("x-api-key") or ""
        auth = meta.get("authorization") or ""
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        return not hmac.compare_digest(given.encode(), self.api_key.encode())

    async def ServerLive(self, request, grpc_context=None):
        return _pb().ServerLiveResponse(live=True)

    async def ServerReady(self, request, grpc_context=None):
        return _pb().ServerReadyResponse(ready=bool(self.server.ready))

    async def ServerMetadata(self, request, grpc_context=None):
        return _pb().ServerMetadataResponse(name="slimray", version="1", extensions=[])

    def _check_model(self, name: str, grpc_context, empty) -> Any | None:
        if self._denied(grpc_context):
            return self._fail(grpc_context, 401, "missing or wrong API key", empty)
        if name != self.server.options.name:
            return self._fail(grpc_context, 404, f"unknown model {name[:100]!r}; this endpoint serves {self.server.options.name!r}", empty)
        return None

    async def ModelReady(self, request, grpc_context=None):
        pb = _pb()
        if (failed := self._check_model(request.name, grpc_context, pb.ModelReadyResponse())) is not None:
            return failed
        return pb.ModelReadyResponse(ready=bool(self.server.ready))

    async def ModelMetadata(self, request, grpc_context=None):
        pb = _pb()
        if (failed := self._check_model(request.name, grpc_context, pb.ModelMetadataResponse())) is not None:
            return failed
        meta = self.server.codec.v2_metadata()
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=self.server.options.name, versions=["1"], platform="pytorch",
            inputs=[tensor(**t) for t in meta["inputs"]], outputs=[tensor(**t) for t in meta["outputs"]],
        )

    async def ModelInfer(self, request, grpc_context=None):
        pb = _pb()
        empty = pb.ModelInferResponse()
        if (failed := self._check_model(request.model_name, grpc_context, empty)) is not None:
            return failed
        codec = self.server.codec
        try:
            if len(request.inputs) != 1:
                raise RequestError(422, f"send exactly one input tensor, got {len(request.inputs)}")
            t = request.inputs[0]
            raw = None
            if request.raw_input_contents:
                if len(request.raw_input_contents) != 1:
                    raise RequestError(422, "raw_input_contents must hold one entry per input")
                raw = request.raw_input_contents[0]
                data = None
            else:
                field = _CONTENTS.get(t.datatype.upper())
                if field is None:
                    raise RequestError(422, f"datatype {t.datatype!r} is not supported")
                values = list(getattr(t.contents, field))
                data = [v.decode("utf-8", "replace") for v in values] if field == "bytes_contents" else values
            wanted = [o.name for o in request.outputs] or list(codec.output_names)
            if unknown := [w for w in wanted if w not in codec.output_names]:
                raise RequestError(422, f"unknown outputs {unknown}; this model has {list(codec.output_names)}")
            items = codec.parse_v2(_Tensor(name=t.name, datatype=t.datatype, shape=list(t.shape), data=data), raw)
        except RequestError as err:
            return self._fail(grpc_context, err.status, err.message, empty)
        out = await self.server.infer(items)
        answer = pb.ModelInferResponse(model_name=self.server.options.name, model_version="1", id=request.id)
        for w in wanted:
            arr = np.ascontiguousarray(out[w])
            answer.outputs.add(name=w, datatype=v2_datatype(arr), shape=list(arr.shape))
            answer.raw_output_contents.append(arr.astype(arr.dtype.newbyteorder("<")).tobytes())
        return answer
