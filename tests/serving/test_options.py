"""Serving options without Ray: deployment keyword arguments, config-to-options wiring, the proxy timeout,
V2 tensor parsing, and a broken model failing its health check instead of answering NaN as a 500."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from slimray.config import ServeConfig
from slimray.families.classifier.spec import InputSpec
from slimray.serving import app as serving
from slimray.serving.app import RequestError, ServeOptions, V2Tensor, deployment_options, parse_v2_tensor
from slimray.serving.model import ModelServer
from slimray.serving.protocols import build_api


def opts(**kw) -> ServeOptions:
    return ServeOptions(model_dir="/nowhere", name="m", **kw)


def test_fixed_replicas_and_limits():
    kw = deployment_options(opts(num_replicas=3, max_ongoing_requests=32, max_queued_requests=10, health_check_period_s=2))
    assert kw["num_replicas"] == 3 and "autoscaling_config" not in kw
    assert kw["max_ongoing_requests"] == 32 and kw["max_queued_requests"] == 10 and kw["health_check_period_s"] == 2
    assert kw["ray_actor_options"] == {"num_cpus": 1.0} and "max_replicas_per_node" not in kw
    assert kw["logging_config"] == {"enable_access_log": False}  # the fast default: no per-request access log


def test_autoscaling_replaces_num_replicas():
    kw = deployment_options(opts(ingress="proxy", num_replicas=5, min_replicas=0, max_replicas=4, target_ongoing_requests=8))
    assert "num_replicas" not in kw
    assert kw["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 4, "target_ongoing_requests": 8}
    assert deployment_options(opts(ingress="proxy", max_replicas=2))["autoscaling_config"]["min_replicas"] == 1


def test_one_replica_per_gpu_node_is_one_setting():
    kw = deployment_options(opts(ingress="proxy", gpus_per_replica=0.5, max_replicas_per_node=1))
    assert kw["ray_actor_options"]["num_gpus"] == 0.5 and kw["max_replicas_per_node"] == 1


@pytest.mark.parametrize(
    "bad",
    [dict(min_replicas=1), dict(min_replicas=3, max_replicas=2), dict(gpus_per_replica=1.5), dict(gpus_per_replica=-1),
     dict(max_queued_requests=-2), dict(name="../etc"), dict(batch_wait_timeout_s=-1), dict(max_batch_size=0)],
)
def test_bad_options_are_refused(bad):
    with pytest.raises(ValidationError):
        ServeOptions(model_dir="/nowhere", **bad)


def test_one_serve_schema():
    """One schema: the run configs' `serve:` section (every family's subclasses it for defaults only), and
    ServeOptions = the same fields and checks plus which model (model_dir, name, kind)."""
    from slimray.families.causal_lm.config import LMServeConfig
    from slimray.families.sentence_encoder.config import TextServeConfig
    from slimray.serving.options import ServeConfig as Schema

    assert ServeConfig is Schema and issubclass(ServeOptions, ServeConfig)
    assert issubclass(LMServeConfig, ServeConfig) and issubclass(TextServeConfig, ServeConfig)
    assert set(ServeOptions.model_fields) - set(ServeConfig.model_fields) == {"model_dir", "name", "kind"}
    assert set(LMServeConfig.model_fields) == set(TextServeConfig.model_fields) == set(ServeConfig.model_fields)
    ServeOptions(model_dir="/x", name="m", **ServeConfig().model_dump())


@pytest.mark.parametrize(
    ("bad", "field"),
    [(dict(ingress="proxy", min_replicas=3, max_replicas=2), "min_replicas"), (dict(min_replicas=1), "min_replicas"),
     (dict(max_replicas=2), "max_replicas"), (dict(max_replicas_per_node=1), "max_replicas_per_node"),
     (dict(gpus_per_replica=1.5), "gpus_per_replica"), (dict(port=9000, grpc_port=9000), "grpc_port"),
     (dict(max_tokens_limit=8), "default_max_tokens"), (dict(max_context_len=1), "max_context_len")],
)
def test_every_serve_check_names_its_field(bad, field):
    """Checks between fields name the field they refuse (serve.min_replicas in a run config), in every schema use."""
    from slimray.config import PipelineConfig, load_config
    from slimray.schema import ConfigError

    with pytest.raises(ValidationError) as err:
        ServeConfig(**bad)
    assert [e["loc"] for e in err.value.errors()] == [(field,)], err.value
    data = load_config(recipe="digits").model_dump()
    data["serve"].update(bad)
    with pytest.raises(ConfigError, match=rf"serve\.{field}: "):
        PipelineConfig.from_dict(data, source="run.yaml")


def test_deploy_sets_the_proxy_timeout(monkeypatch):
    calls = {}
    monkeypatch.setattr(serving.serve, "start", lambda **kw: calls.setdefault("start", kw))
    monkeypatch.setattr(serving.serve, "run", lambda app, **kw: calls.setdefault("run", kw))
    app = SimpleNamespace(_slimray_http_options={"request_timeout_s": 2.5})
    url = serving.deploy(app, name="m", port=9123, route_prefix="/m/")
    assert calls["start"] == {"http_options": {"host": "127.0.0.1", "port": 9123, "request_timeout_s": 2.5}, "grpc_options": None}
    assert calls["run"]["route_prefix"] == "/m/" and url == "http://127.0.0.1:9123/m"


def tensor(data, shape, datatype="FP32", name="input") -> V2Tensor:
    return V2Tensor(name=name, shape=shape, datatype=datatype, data=data)


def parse(t: V2Tensor, max_examples: int = 4) -> np.ndarray:
    return parse_v2_tensor(t, shape=[1, 2, 2], min_value=0, max_value=16, max_examples=max_examples)


def test_v2_tensor_flat_nested_and_datatypes():
    flat = parse(tensor([1, 2, 3, 4, 5, 6, 7, 8], [2, 4], "UINT8"))
    nested = parse(tensor([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]], [2, 2, 2], "FP64"))
    assert flat.shape == nested.shape == (2, 1, 2, 2) and flat.dtype == np.float32
    np.testing.assert_array_equal(flat, nested)


@pytest.mark.parametrize(
    ("t", "status", "needle"),
    [
        (tensor([1] * 4, [1, 4], "UINT8", name="x"), 422, "unknown input"),
        (tensor([-1] * 4, [1, 4], "UINT8"), 422, "fit"),
        (tensor([1] * 4, [1, 4], "FP8"), 422, "datatype"),
        (tensor([1] * 4, [], "FP32"), 422, "batch size first"),
        (tensor([1] * 4, [1, 2**62, 2**62], "FP32"), 422, "shape"),
        (tensor([1] * 20, [5, 4], "FP32"), 413, "larger than the allowed 4"),
        (tensor([70000.0] * 4, [1, 4], "FP16"), 422, "overflow"),
    ],
)
def test_v2_tensor_errors(t, status, needle):
    with pytest.raises(RequestError) as err:
        parse(t)
    assert err.value.status == status and needle in err.value.message


class NaNModel(torch.nn.Module):
    def forward(self, x):
        return torch.full((len(x), 3), float("nan"))


def test_broken_model_fails_health_check_and_answers_null():
    from fastapi.testclient import TestClient

    spec = SimpleNamespace(input=InputSpec(shape=[4], min_value=0, max_value=1), quantization=SimpleNamespace(method="none"))
    server = ModelServer(opts(kind="classifier"), loader=lambda path: (NaNModel(), spec))
    assert server.ready is False and server.codec.num_classes == 3
    with pytest.raises(RuntimeError, match="NaN"):
        server.check_health()
    r = TestClient(build_api(server, api_key=None)).post("/v1/predict", json={"inputs": [[0.0] * 4] * 2})
    assert r.status_code == 200
    answer = json.loads(r.content, parse_constant=lambda c: pytest.fail(f"invalid JSON constant {c}"))
    assert answer["predictions"] == [-1, -1] and answer["probabilities"] == [[None] * 3] * 2


class TinyClassifier(torch.nn.Module):
    def forward(self, x):
        return x.reshape(len(x), -1)[:, :3]


def tiny_server(**kw) -> ModelServer:
    spec = SimpleNamespace(input=InputSpec(shape=[4], min_value=0, max_value=1), quantization=SimpleNamespace(method="none"))
    return ModelServer(opts(kind="classifier", **kw), loader=lambda path: (TinyClassifier(), spec))


def test_streaming_body_limit_stops_reading_at_the_limit():
    """The shared plumbing counts bytes as they arrive: a chunked 20 MB body gets 413 after a few chunks, and
    the rest is never pulled from the server."""
    import asyncio

    api = build_api(tiny_server(max_body_bytes=200_000), api_key=None)
    chunk, total, pulled = b"7" * 65536, 20 * 2**20, 0

    async def receive():
        nonlocal pulled
        if pulled >= total:
            return {"type": "http.request", "body": b"", "more_body": False}
        pulled += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/predict", "raw_path": b"/v1/predict", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"transfer-encoding", b"chunked")], "root_path": "",
             "scheme": "http", "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1), "http_version": "1.1",
             "asgi": {"version": "3.0"}}
    asyncio.run(api(scope, receive, send))
    assert sent[0]["status"] == 413
    assert "exceeds the limit" in json.loads(sent[1]["body"])["error"]
    assert pulled <= 200_000 + 2 * len(chunk) < total


def test_declared_length_over_the_limit_is_refused_before_reading():
    from fastapi.testclient import TestClient

    client = TestClient(build_api(tiny_server(max_body_bytes=1000), api_key=None))
    r = client.post("/v1/predict", content=b"x" * 5000, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "exceeds the limit" in r.json()["error"]


def test_api_key_file_wins_and_a_missing_file_fails_closed(tmp_path, monkeypatch):
    from slimray.serving.http import read_api_key

    monkeypatch.setenv("SLIMRAY_TEST_KEY", "from-env")
    key = tmp_path / "key"
    key.write_text("from-file\n")
    assert read_api_key(env="SLIMRAY_TEST_KEY", file=str(key)) == "from-file"
    assert read_api_key(env="SLIMRAY_TEST_KEY", file=None) == "from-env"
    assert read_api_key(env="SLIMRAY_NO_SUCH_KEY", file=None) is None
    with pytest.raises(RuntimeError, match="not readable"):
        read_api_key(env="SLIMRAY_TEST_KEY", file=str(tmp_path / "missing"))
    (tmp_path / "empty").write_text("")
    with pytest.raises(RuntimeError, match="empty"):
        read_api_key(env="SLIMRAY_TEST_KEY", file=str(tmp_path / "empty"))
    kw = deployment_options(opts(api_key_file=str(key)))
    assert "runtime_env" not in kw["ray_actor_options"] and "from-" not in json.dumps(kw)


def test_grpc_model_infer_answers_like_the_model():
    """The OIP gRPC methods on an in-process server: raw_input_contents in (tritonclient's default encoding),
    raw_output_contents out, errors as gRPC status codes. (Through Serve's gRPC proxy: test_grpc_proxy.py.)"""
    import asyncio

    import grpc

    from slimray.serving.app import SlimrayModel
    from slimray.serving.grpc import inference_pb2 as pb

    class Context:
        def __init__(self, metadata=()):
            self.metadata, self.code, self.details = list(metadata), None, None

        def invocation_metadata(self):
            return self.metadata

        def set_code(self, code):
            self.code = code

        def set_details(self, details):
            self.details = details

    replica = SlimrayModel.__new__(SlimrayModel)  # the replica class without Serve: its server and key only
    replica.server, replica.api_key = tiny_server(), None
    x = np.random.default_rng(0).uniform(0, 1, (3, 4)).astype(np.float32)
    req = pb.ModelInferRequest(model_name="m", id="r1")
    req.inputs.add(name="input", datatype="FP32", shape=[3, 4])
    req.raw_input_contents.append(x.astype("<f4").tobytes())
    ctx = Context()
    res = asyncio.run(replica.ModelInfer(req, grpc_context=ctx))
    assert ctx.code is None and res.id == "r1" and [o.name for o in res.outputs] == ["probabilities", "predictions"]
    probs = np.frombuffer(res.raw_output_contents[0], "<f4").reshape(list(res.outputs[0].shape))
    preds = np.frombuffer(res.raw_output_contents[1], "<i8")
    expected = torch.softmax(TinyClassifier()(torch.from_numpy(x)), 1).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    assert preds.tolist() == expected.argmax(1).tolist()
    typed = pb.ModelInferRequest(model_name="m")
    typed.inputs.add(name="input", datatype="FP32", shape=[3, 4]).contents.fp32_contents.extend(x.ravel().tolist())
    assert np.frombuffer(asyncio.run(replica.ModelInfer(typed)).raw_output_contents[1], "<i8").tolist() == preds.tolist()
    assert asyncio.run(replica.ServerLive(pb.ServerLiveRequest())).live
    assert asyncio.run(replica.ServerReady(pb.ServerReadyRequest())).ready
    meta = asyncio.run(replica.ModelMetadata(pb.ModelMetadataRequest(name="m")))
    assert meta.inputs[0].name == "input" and list(meta.inputs[0].shape) == [-1, 4]
    for bad, code in [(pb.ModelInferRequest(model_name="other"), grpc.StatusCode.NOT_FOUND),
                      (pb.ModelInferRequest(model_name="m"), grpc.StatusCode.INVALID_ARGUMENT)]:
        ctx = Context()
        asyncio.run(replica.ModelInfer(bad, grpc_context=ctx))
        assert ctx.code == code and ctx.details
    short = pb.ModelInferRequest(model_name="m")
    short.inputs.add(name="input", datatype="FP32", shape=[3, 4])
    short.raw_input_contents.append(b"\x00" * 8)
    ctx = Context()
    asyncio.run(replica.ModelInfer(short, grpc_context=ctx))
    assert ctx.code == grpc.StatusCode.INVALID_ARGUMENT and "bytes" in ctx.details
    replica.api_key = "k"
    ctx = Context()
    asyncio.run(replica.ModelInfer(req, grpc_context=ctx))
    assert ctx.code == grpc.StatusCode.UNAUTHENTICATED
    ctx = Context([("authorization", "Bearer k")])
    assert asyncio.run(replica.ModelInfer(req, grpc_context=ctx)).outputs and ctx.code is None


def test_grpc_messages_pickle_by_their_package_module():
    """Serve's gRPC proxy hands the request message to the replica through Ray (pickle): the generated classes must
    name an importable module (they named a top-level ``inference_pb2`` before, and every call failed)."""
    import pickle

    from slimray.serving.grpc import inference_pb2 as pb

    req = pb.ModelInferRequest(model_name="m", id="r1")
    assert pb.ModelInferRequest.__module__ == "slimray.serving.grpc.inference_pb2"
    assert pickle.loads(pickle.dumps(req)) == req


TRITON_GRPC_CLIENT = """
import json, sys
import numpy as np
import tritonclient.grpc as triton

c = triton.InferenceServerClient(url=sys.argv[1])
x = np.asarray(json.loads(sys.argv[2]), dtype=np.float32)
assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("m")
meta = c.get_model_metadata("m")
inp = triton.InferInput("input", list(x.shape), "FP32")
inp.set_data_from_numpy(x)
res = c.infer("m", [inp])
print(json.dumps({"input": meta.inputs[0].name, "predictions": res.as_numpy("predictions").tolist(),
                  "probabilities": res.as_numpy("probabilities").tolist()}))
"""


def test_tritonclient_grpc_with_its_defaults_gets_the_model_outputs():
    """tritonclient.grpc (defaults: raw_input_contents) against the replica's OIP gRPC methods on a loopback gRPC
    server. The client runs in its own process: its copy of the ``inference`` messages would clash with slimray's
    in one descriptor pool."""
    import asyncio
    import subprocess
    import sys
    from concurrent import futures

    import grpc

    from slimray.serving.app import SlimrayModel
    from slimray.serving.grpc import inference_pb2_grpc

    replica = SlimrayModel.__new__(SlimrayModel)
    replica.server, replica.api_key = tiny_server(), None

    class Servicer(inference_pb2_grpc.GRPCInferenceServiceServicer):
        pass

    for rpc in ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer"):
        setattr(Servicer, rpc, lambda self, request, context, rpc=rpc: asyncio.run(getattr(replica, rpc)(request, grpc_context=context)))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        x = np.random.default_rng(1).uniform(0, 1, (4, 4)).astype(np.float32)
        out = subprocess.run([sys.executable, "-c", TRITON_GRPC_CLIENT, f"127.0.0.1:{port}", json.dumps(x.tolist())],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr[-2000:]
        got = json.loads(out.stdout)
    finally:
        server.stop(grace=None)
    expected = torch.softmax(TinyClassifier()(torch.from_numpy(x)), 1).numpy()
    assert got["input"] == "input"
    np.testing.assert_allclose(np.array(got["probabilities"]), expected, atol=1e-6)
    assert got["predictions"] == expected.argmax(1).tolist()


def test_serve_config_file_args_are_the_same_schema():
    """`serve deploy` args: the one schema, behind Serve's proxy (autoscaling allowed); where to listen belongs to the
    Serve config file, so those fields (and the direct ingress) are refused in the args, naming the field."""
    from slimray.schema import ConfigError

    app = serving.app_builder({"model_dir": "/x", "name": "m", "min_replicas": 1, "max_replicas": 3})
    assert app._slimray_build[0].ingress == "proxy" and app._slimray_build[0].max_replicas == 3
    with pytest.raises(ConfigError, match=r"port is set by the Serve config file here \(http_options.port\)"):
        serving.app_builder({"model_dir": "/x", "port": 9000})
    with pytest.raises(ConfigError, match="ingress must be proxy"):
        serving.app_builder({"model_dir": "/x", "ingress": "direct"})
    with pytest.raises(ConfigError, match=r"min_replicas: .*must not exceed"):
        serving.app_builder({"model_dir": "/x", "min_replicas": 4, "max_replicas": 3})


def test_the_replicas_exception_is_read_from_a_deployment_status_message():
    """Serve's DEPLOY_FAILED message (deployment_state.py, Ray 2.60) wraps the replica's traceback: the cause is its
    last ``Type: text`` line and what follows it (a message of several lines)."""
    tb = ("ray.exceptions.RayTaskError(RuntimeError): ray::ServeReplica:m:m.initialize_and_get_metadata() (pid=1, ip=10.0.0.1)\n"
          '  File "replica.py", line 1928, in initialize\n    raise RuntimeError(traceback.format_exc()) from None\n'
          "RuntimeError: Traceback (most recent call last):\n"
          '  File "usermodule.py", line 102, in _call\n    raise ConfigError(msg) from None\n'
          "slimray.schema.ConfigError: invalid ArtifactSpec in spec.json:\n  - model.kwargs: not a mapping\n")
    message = ("The deployment failed to start 3 times in a row. This may be due to a problem with its constructor or initial "
               "health check failing. See controller logs for details. Error:\n" + tb)
    assert serving._exception_text(message) == "slimray.schema.ConfigError: invalid ArtifactSpec in spec.json:\n  - model.kwargs: not a mapping"
    assert serving._exception_text("Failed to update the deployments ['m'].") == "Failed to update the deployments ['m']."
