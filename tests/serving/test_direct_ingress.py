"""The direct ingress (``deploy(ingress="direct")``, the default of ``slimray serve``): the replicas serve HTTP and
gRPC themselves on loopback, no Serve proxy in between. The contracts of test_app.py (v1, KServe v1, OIP v2,
tritonclient.http with its defaults, the bad-input tables, OpenAPI) run here again, imported, against a direct
deployment; then what only this ingress does: tritonclient.grpc with its defaults on the replica's own gRPC server,
two replicas behind one URL, loopback-only listeners, the API key, a chunked 20 MB body answered 413 with the
replica's memory flat, 503 when over ``max_ongoing_requests`` + ``max_queued_requests``, OPTIONS."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from slimray.serving.app import ServeOptions, build_app, deploy
from tests.serving.conftest import free_port
from tests.serving.test_app import (  # noqa: F401  (collected here again, with this module's `served`)
    GOOD,
    _send_chunked,
    local_model,
    test_binary_and_kserve_v1_bodies_answer_like_json,
    test_batched_path_matches_in_process_model,
    test_openapi_docs,
    test_openapi_is_valid_and_lists_the_4xx_answers,
    test_predict_matches_in_process_model,
    test_serve_binds_loopback,
    test_tritonclient_http_with_its_defaults,
    test_v1_bad_requests_get_4xx_json,
    test_v2_bad_requests_get_4xx_json,
    test_v2_binary_mistakes_get_4xx,
    test_v2_health_and_metadata,
    test_v2_infer_contract,
    test_wrong_method_unknown_route_and_model,
)
from tests.serving.test_grpc_proxy import call, in_process_probabilities

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def direct_ports(serve_ports):
    """(HTTP, gRPC) ports of the direct deployment; asks for the package's Serve first, so Serve keeps its proxies
    for the other modules (deploy(ingress="direct") would otherwise start Serve without any)."""
    return free_port(), free_port()


@pytest.fixture(scope="module")
def serve_port(direct_ports):  # test_app's tests build their tritonclient URL from this
    return direct_ports[0]


@pytest.fixture(scope="module")
def served(digits_run, direct_ports):
    from ray import serve

    run_dir, _ = digits_run
    port, grpc = direct_ports
    opts = dict(model_dir=str(run_dir / "winner"), num_cpus_per_replica=0.5, max_batch_examples=64, max_body_bytes=200_000)
    app = build_app(ServeOptions(name="digits", max_batch_size=16, batch_wait_timeout_s=0.02, **opts))
    url = deploy(app, name="open", port=port, route_prefix="/", grpc_port=grpc, ingress="direct")
    assert url == f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, timeout=30) as client:
        yield client, run_dir
    serve.delete("open")


@pytest.fixture(scope="module")
def pair(digits_run, tmp_path_factory):
    """Two replicas with an API key, one URL (a second direct deployment on its own port, under a route prefix)."""
    from ray import serve

    run_dir, _ = digits_run
    key_file = tmp_path_factory.mktemp("secret") / "api-key"
    key_file.write_text("s3cret\n")
    port = free_port()
    options = ServeOptions(name="pair", model_dir=str(run_dir / "winner"), num_replicas=2, num_cpus_per_replica=0.25,
                           api_key_file=str(key_file), max_ongoing_requests=1, max_queued_requests=1)
    url = deploy(build_app(options), name="pair", port=port, route_prefix="/pair", ingress="direct")
    assert url == f"http://127.0.0.1:{port}/pair"
    yield url, port
    serve.delete("pair")


def _listeners(port: int) -> set[str]:
    import psutil

    # gRPC listens on a dual-stack socket: 127.0.0.1 shows as the IPv4-mapped ::ffff:127.0.0.1 (still loopback only)
    return {c.laddr.ip.removeprefix("::ffff:") for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def test_direct_listeners_are_loopback_only_and_no_proxy_route(served, direct_ports, serve_ports):
    port, grpc = direct_ports
    assert _listeners(port) == {"127.0.0.1"} and _listeners(grpc) == {"127.0.0.1"}
    # the package's Serve proxy runs, but the direct application has no route on it
    assert httpx.get(f"http://127.0.0.1:{serve_ports[0]}/v1/models", timeout=10).status_code == 404


def test_tritonclient_grpc_with_its_defaults_on_the_replica(served, digits, direct_ports):
    client, run_dir = served
    x = digits.test.x[:5].astype(np.float32)
    expected = in_process_probabilities(run_dir / "winner", x)
    got = call(direct_ports[1], "digits", name="input", datatype="FP32", data=x.tolist())
    assert got["live"] and got["ready"] and got["model_ready"] and got["id"] == "r1"
    np.testing.assert_allclose(np.array(got["outputs"]["probabilities"]), expected, atol=1e-5)
    assert got["outputs"]["predictions"] == expected.argmax(1).tolist()
    assert got["unknown_model"][0] == "StatusCode.NOT_FOUND" and "unknown model" in got["unknown_model"][1]


def test_two_replicas_one_url_with_the_api_key(pair):
    url, port = pair
    assert _listeners(port) == {"127.0.0.1"}
    key = {"Authorization": "Bearer s3cret"}
    replicas = set()
    for _ in range(40):  # a new connection each time: the kernel spreads connections over the replicas
        with httpx.Client(base_url=url, timeout=30) as c:
            assert c.post("/v1/predict", json={"inputs": GOOD}).status_code == 401
            assert c.post("/v1/predict", json={"inputs": GOOD}, headers={"X-API-Key": "s3cret"}).status_code == 200
            replicas.add(c.get("/v1/replica", headers=key).json()["replica_id"])
        if len(replicas) == 2:
            break
    assert len(replicas) == 2, replicas
    outside = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers=key, timeout=10)
    assert outside.status_code == 404 and outside.json()["error"] == "Not Found"  # outside the route prefix


def test_over_ongoing_plus_queued_requests_gets_503(pair):
    """max_ongoing_requests=1, max_queued_requests=1 per replica: of many concurrent slow-ish requests some get a
    JSON 503, none fails otherwise."""
    url, _ = pair
    big = np.zeros((64, 1, 8, 8), dtype="<f4").tobytes()
    headers = {"X-API-Key": "s3cret", "Content-Type": "application/octet-stream", "X-Shape": "64,1,8,8"}

    def one(_):
        with httpx.Client(timeout=30) as c:
            return c.post(f"{url}/v1/predict", content=big, headers=headers)

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(64)))
    codes = {a.status_code for a in answers}
    assert codes <= {200, 503} and 200 in codes, codes
    for a in answers:
        if a.status_code == 503:
            assert "overloaded" in a.json()["error"]


def test_chunked_20mb_body_gets_413_with_the_replica_memory_flat(served, direct_ports):
    """The replica's own server reads the chunked body as it streams: 413 at the limit, the rest never read (the
    proxy's xfail in test_app.py passes here)."""
    client, _ = served
    port = direct_ports[0]
    _send_chunked(port, 2 * 2**20)  # warm-up: the 413 path once
    before = client.get("/v1/replica").json()["max_rss_bytes"]
    total = 20 * 2**20
    sent, reply = _send_chunked(port, total)
    assert reply.split(b"\r\n", 1)[0].split()[1] == b"413", reply[:300]
    after = client.get("/v1/replica").json()["max_rss_bytes"]
    assert sent < total and after - before < total // 2, (sent, before, after)
    assert client.post("/v1/predict", json={"inputs": GOOD}).status_code == 200


def test_options_answers_with_allow(served):
    client, _ = served
    r = client.options("/v1/predict")
    assert r.status_code == 204 and set(r.headers["allow"].split(", ")) == {"POST", "OPTIONS"}
    r = client.options("/v2/models/digits")
    assert r.status_code == 204 and set(r.headers["allow"].split(", ")) == {"GET", "OPTIONS"}
    assert client.options("/v1/nothing").status_code == 404


def test_deploy_refuses_a_taken_port_and_autoscaling(digits_run, serve_ports):
    run_dir, _ = digits_run
    app = build_app(ServeOptions(name="x", model_dir=str(run_dir / "winner"), num_cpus_per_replica=0.25))
    with pytest.raises(RuntimeError, match="already in use"):
        deploy(app, name="taken", port=serve_ports[0], ingress="direct")  # Serve's proxy listens there
    auto = build_app(ServeOptions(name="x", model_dir=str(run_dir / "winner"), ingress="proxy", max_replicas=2))
    with pytest.raises(ValueError, match="autoscaling"):
        deploy(auto, name="auto", port=free_port(), ingress="direct")
    from ray import serve

    assert "taken" not in serve.status().applications and "auto" not in serve.status().applications
