"""The served winner over real HTTP: contract, same classes as in-process, 4xx on bad input, API key."""

from __future__ import annotations

import json
import math
import socket

import httpx
import numpy as np
import pytest
import torch

from slimray.artifacts import load_artifact
from slimray.data import normalize
from slimray.serving.app import RequestError, ServeOptions, build_app, deploy, parse_inputs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(digits_run, monkeypatch_module):
    from ray import serve

    run_dir, _ = digits_run
    port = _free_port()
    opts = dict(model_dir=str(run_dir / "winner"), num_cpus_per_replica=0.5, max_batch_examples=64, max_body_bytes=200_000)
    url = deploy(build_app(ServeOptions(name="digits", **opts)), name="open", port=port, route_prefix="/")
    monkeypatch_module.setenv("SLIMRAY_TEST_KEY", "s3cret")
    locked = build_app(ServeOptions(name="locked", api_key_env="SLIMRAY_TEST_KEY", **opts))
    monkeypatch_module.delenv("SLIMRAY_TEST_KEY")
    serve.run(locked, name="locked", route_prefix="/locked")
    with httpx.Client(base_url=url, timeout=30) as client:
        yield client, run_dir
    serve.shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_serve_binds_loopback(served):
    client, _ = served
    assert client.base_url.host == "127.0.0.1"
    assert client.get("/healthz").json() == {"status": "ok", "model": "digits"}


def test_predict_matches_in_process_model(served, digits):
    client, run_dir = served
    model, spec = load_artifact(run_dir / "winner")
    x = digits.test.x[:16]
    r = client.post("/v1/predict", json={"inputs": x.tolist()})
    assert r.status_code == 200, r.text
    body = r.json()
    with torch.inference_mode():
        local = model(normalize(torch.from_numpy(x), spec.input)).argmax(1).tolist()
    assert body["predictions"] == local
    assert len(body["probabilities"]) == 16 and all(math.isclose(sum(p), 1.0, abs_tol=1e-4) for p in body["probabilities"])
    # squeezed (8x8) and flat (64) examples are accepted too
    for shaped in (x[:, 0].tolist(), x.reshape(16, 64).tolist()):
        assert client.post("/v1/predict", json={"inputs": shaped}).json()["predictions"] == local


def test_openapi_docs(served):
    client, _ = served
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert "/v1/predict" in spec["paths"] and "/healthz" in spec["paths"]


GOOD = np.zeros((1, 8, 8)).tolist()


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"", 400, "empty request body"),
        (json.dumps({"input": GOOD}).encode(), 422, "inputs"),
        (json.dumps({"inputs": GOOD, "extra": 1}).encode(), 422, "extra"),
        (json.dumps({"inputs": []}).encode(), 422, "empty"),
        (json.dumps({"inputs": [[[1, 2], [3]]]}).encode(), 422, "rectangular"),
        (json.dumps({"inputs": [[["a"] * 8] * 8]}).encode(), 422, "only numbers"),
        (json.dumps({"inputs": np.zeros((1, 7, 7)).tolist()}).encode(), 422, "shape"),
        (json.dumps({"inputs": [[[1e9] * 8] * 8]}).encode(), 422, "must lie in"),
        (json.dumps({"inputs": [[[float("nan")] + [0.0] * 7] + [[0.0] * 8] * 7]}).encode(), 422, "NaN"),
        (json.dumps({"inputs": np.zeros((65, 8, 8)).tolist()}).encode(), 413, "larger than the allowed 64"),
        (json.dumps({"inputs": np.zeros((64, 8, 8)).tolist(), "pad": "x" * 300_000}).encode(), 413, "exceeds the limit"),
        (json.dumps({"inputs": "abc"}).encode(), 422, "inputs"),
    ],
)
def test_bad_requests_get_4xx_with_message(served, body, status, needle):
    client, _ = served
    r = client.post("/v1/predict", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]
    assert client.post("/v1/predict", json={"inputs": GOOD}).status_code == 200  # still serving


def test_wrong_method_and_unknown_route(served):
    client, _ = served
    assert client.get("/v1/predict").status_code == 405
    assert client.get("/v1/nothing").status_code == 404


def test_api_key(served):
    client, _ = served
    assert client.post("/locked/v1/predict", json={"inputs": GOOD}).status_code == 401
    assert client.post("/locked/v1/predict", json={"inputs": GOOD}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.post("/locked/v1/predict", json={"inputs": GOOD}, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.post("/locked/v1/predict", json={"inputs": GOOD}, headers={"X-API-Key": "s3cret"}).status_code == 200


def test_parse_inputs_nan_is_rejected():
    with pytest.raises(RequestError, match="NaN"):
        parse_inputs([[[float("nan")] * 8] * 8], shape=[1, 8, 8], min_value=0, max_value=16, max_examples=4)
