"""The Open Inference Protocol over gRPC through Ray Serve's gRPC proxy (not a test server): ``tritonclient.grpc``
with its defaults (``raw_input_contents`` in, ``raw_output_contents`` out) gets the in-process model's outputs, for
a classifier and a sentence encoder; errors come back as gRPC status codes (NOT_FOUND, UNAUTHENTICATED: the API key
travels as metadata); with several applications on the cluster the ``application`` metadata routes; ``deploy``
refuses a gRPC port the running Serve does not serve.

The client runs in its own process: its copy of the ``inference`` messages would clash with slimray's in one
protobuf descriptor pool. Only 127.0.0.1 is contacted (the proxy itself binds every interface in Ray 2.60).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from slimray.serving.app import ServeOptions, build_app, deploy

pytestmark = pytest.mark.slow

CLIENT = r"""
import json, sys, time
import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

url, model, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
headers = spec.get("headers")  # None: the client's defaults
c = triton.InferenceServerClient(url=url)
deadline = time.monotonic() + 60
while True:  # the proxy learns about a new application through Serve's long poll
    try:
        live = c.is_server_live(headers=headers)
        break
    except InferenceServerException:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.5)
out = {"live": live, "ready": c.is_server_ready(headers=headers), "model_ready": c.is_model_ready(model, headers=headers)}
meta = c.get_model_metadata(model, headers=headers)
out["meta"] = {"name": meta.name, "inputs": [[t.name, t.datatype, list(t.shape)] for t in meta.inputs],
               "outputs": [[t.name, t.datatype, list(t.shape)] for t in meta.outputs]}
if spec["datatype"] == "BYTES":
    x = np.array([t.encode() for t in spec["data"]], dtype=object)
else:
    x = np.asarray(spec["data"], dtype=np.float32)
inp = triton.InferInput(spec["name"], list(x.shape), spec["datatype"])
inp.set_data_from_numpy(x)
res = c.infer(model, [inp], request_id="r1", headers=headers)
out["id"] = res.get_response().id
out["outputs"] = {o.name: res.as_numpy(o.name).tolist() for o in res.get_response().outputs}
try:
    c.get_model_metadata("no-such-model", headers=headers)
    out["unknown_model"] = None
except InferenceServerException as err:
    out["unknown_model"] = [err.status(), err.message()]
if "headers_without_key" in spec:
    try:
        c.infer(model, [inp], headers=spec["headers_without_key"])
        out["without_key"] = None
    except InferenceServerException as err:
        out["without_key"] = [err.status(), err.message()]
c.close()
print(json.dumps(out))
"""


def call(grpc_port: int, model: str, **spec) -> dict:
    proc = subprocess.run([sys.executable, "-c", CLIENT, f"127.0.0.1:{grpc_port}", model, json.dumps(spec)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory, digits):
    from slimray.families.classifier.artifacts import ArtifactSpec, save_artifact
    from slimray.families.classifier import build_model

    from tests.conftest import DIGITS_CNN

    path = tmp_path_factory.mktemp("grpc") / "digits"
    torch.manual_seed(0)
    save_artifact(path, build_model(DIGITS_CNN).eval(), ArtifactSpec(name="grpc-digits", model=DIGITS_CNN, input=digits.input))
    return path


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    """A one-layer MiniLM encoder (the teacher's first layer), saved as a text artifact."""
    from slimray.families.sentence_encoder.models import load_teacher, save_text_artifact, spec_for, teacher_config, teacher_dir, truncated

    path = tmp_path_factory.mktemp("grpc") / "encoder"
    model = truncated(load_teacher(), [0]).eval()
    spec = spec_for(model, name="grpc-encoder", base_config=teacher_config(), max_seq_len=32)
    save_text_artifact(path, model, spec, tokenizer_dir=teacher_dir())
    return path


def in_process_probabilities(model_dir, x: np.ndarray) -> np.ndarray:
    from slimray.families.classifier.artifacts import load_runnable
    from slimray.families.classifier.datasets import normalize

    model, spec = load_runnable(model_dir)
    with torch.inference_mode():
        return torch.softmax(model(normalize(torch.from_numpy(x), spec.input)), 1).numpy()


def in_process_embeddings(model_dir, texts: list[str]) -> np.ndarray:
    from slimray.families.sentence_encoder.models import embed_texts, load_text_artifact, load_tokenizer

    model, spec = load_text_artifact(model_dir)
    return embed_texts(model, load_tokenizer(model_dir, max_seq_len=spec.max_seq_len), texts, max_seq_len=spec.max_seq_len)


def test_deploy_refuses_a_grpc_port_the_running_serve_does_not_serve(classifier_dir, serve_port, grpc_port):
    from ray import serve

    app = build_app(ServeOptions(name="wrong-port", model_dir=str(classifier_dir), num_cpus_per_replica=0.25))
    with pytest.raises(RuntimeError, match=f"gRPC on port {grpc_port + 1}"):
        deploy(app, name="wrong-port", port=serve_port, route_prefix="/wrong", grpc_port=grpc_port + 1)
    assert "wrong-port" not in serve.status().applications  # refused before anything was deployed


def test_tritonclient_grpc_through_serves_proxy(classifier_dir, encoder_dir, digits, serve_port, grpc_port, tmp_path):
    """Classifier alone on the cluster: tritonclient.grpc's defaults; then an encoder with an API key next to it:
    each reached with the ``application`` metadata, the encoder only with its key; then the encoder alone: no
    routing metadata needed again."""
    from ray import serve

    assert not serve.status().applications, "the defaults route only when one application runs"
    x = digits.test.x[:5].astype(np.float32)
    expected = in_process_probabilities(classifier_dir, x)
    opts = dict(num_cpus_per_replica=0.25, max_batch_size=8)
    url = deploy(build_app(ServeOptions(name="digits", model_dir=str(classifier_dir), **opts)),
                 name="grpc-digits", port=serve_port, route_prefix="/digits", grpc_port=grpc_port)
    assert url == f"http://127.0.0.1:{serve_port}/digits"
    try:
        got = call(grpc_port, "digits", name="input", datatype="FP32", data=x.tolist())
        assert got["live"] and got["ready"] and got["model_ready"] and got["id"] == "r1"
        assert got["meta"] == {"name": "digits", "inputs": [["input", "FP32", [-1, 1, 8, 8]]],
                               "outputs": [["probabilities", "FP32", [-1, 10]], ["predictions", "INT64", [-1]]]}
        np.testing.assert_allclose(np.array(got["outputs"]["probabilities"]), expected, atol=1e-5)
        assert got["outputs"]["predictions"] == expected.argmax(1).tolist()
        assert got["unknown_model"][0] == "StatusCode.NOT_FOUND" and "unknown model" in got["unknown_model"][1]

        texts = ["One sentence here.", "And another one, a bit longer than the first."]
        embeddings = in_process_embeddings(encoder_dir, texts)
        key_file = tmp_path / "api-key"
        key_file.write_text("s3cret\n")
        deploy(build_app(ServeOptions(name="minilm", model_dir=str(encoder_dir), api_key_file=str(key_file), **opts)),
               name="grpc-minilm", port=serve_port, route_prefix="/minilm", grpc_port=grpc_port)
        route = {"application": "grpc-minilm"}
        enc = call(grpc_port, "minilm", name="text", datatype="BYTES", data=texts,
                   headers={**route, "authorization": "Bearer s3cret"}, headers_without_key=route)
        assert enc["meta"]["inputs"] == [["text", "BYTES", [-1]]]
        assert enc["without_key"][0] == "StatusCode.UNAUTHENTICATED" and "API key" in enc["without_key"][1]
        np.testing.assert_allclose(np.array(enc["outputs"]["embedding"]), embeddings, atol=1e-5)
        again = call(grpc_port, "digits", name="input", datatype="FP32", data=x.tolist(), headers={"application": "grpc-digits"})
        np.testing.assert_allclose(np.array(again["outputs"]["probabilities"]), expected, atol=1e-5)
    finally:
        serve.delete("grpc-digits")
    try:
        alone = call(grpc_port, "minilm", name="text", datatype="BYTES", data=texts, headers={"x-api-key": "s3cret"})
        np.testing.assert_allclose(np.array(alone["outputs"]["embedding"]), embeddings, atol=1e-5)
        assert set(alone["outputs"]) == {"embedding"} and alone["meta"]["name"] == "minilm"
    finally:
        serve.delete("grpc-minilm")
