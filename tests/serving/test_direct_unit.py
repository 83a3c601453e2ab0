"""The direct ingress's server without Ray (slimray.serving.direct): two servers share one loopback port
(SO_REUSEPORT), the route prefix, 503 beyond max_ongoing + max_queued, 408 after request_timeout_s, OPTIONS with
Allow, a taken port refused, and stop() frees the port."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi import FastAPI, Request

from slimray.serving.direct import DirectIngress, Listen, check_free
from slimray.serving.http import AllowOptions, install_error_handlers
from tests.serving.conftest import free_port


def slow_api(delay_s: float) -> FastAPI:
    api = FastAPI()
    install_error_handlers(api)
    api.add_middleware(AllowOptions, api=api)

    @api.post("/v1/predict")
    async def predict(request: Request):
        await asyncio.sleep(delay_s)
        return {"n": len(await request.body())}

    @api.get("/v2/models/{name}")
    async def model(name: str):
        return {"name": name}

    return api


@pytest.fixture()
def pair():
    port = free_port()
    servers = [DirectIngress(slow_api(0.3), listen=Listen(port=port, route_prefix="/m", request_timeout_s=1.0),
                             max_ongoing=1, max_queued=1, max_body_bytes=1000) for _ in range(2)]
    yield port, servers
    for s in servers:
        s.stop()


def test_shared_port_prefix_options_and_503(pair):
    port, _ = pair
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(RuntimeError, match="already in use"):
        check_free("127.0.0.1", port)
    with httpx.Client(base_url=url, timeout=10) as c:
        assert c.post("/m/v1/predict", content=b"abc").json() == {"n": 3}
        assert c.get("/v1/predict").status_code == 404 and c.get("/v1/predict").json() == {"error": "Not Found"}
        assert c.get("/m/v1/predict").status_code == 405
        r = c.options("/m/v1/predict")
        assert r.status_code == 204 and r.headers["allow"] == "OPTIONS, POST"
        assert c.options("/m/v2/models/x").headers["allow"] == "GET, OPTIONS"
        assert c.options("/m/nothing").status_code == 404
        assert c.get("/m/openapi.json").json()["servers"] == [{"url": "/m"}]

    def one(_):
        return httpx.post(f"{url}/m/v1/predict", content=b"x", timeout=10)

    with ThreadPoolExecutor(12) as pool:  # 2 servers x (1 running + 1 waiting) admitted at once; the rest 503
        answers = list(pool.map(one, range(12)))
    codes = [a.status_code for a in answers]
    assert set(codes) == {200, 503}, codes
    assert all("overloaded" in a.json()["error"] for a in answers if a.status_code == 503)


def test_timeout_is_408_and_stop_frees_the_port():
    port = free_port()
    server = DirectIngress(slow_api(2.0), listen=Listen(port=port, request_timeout_s=0.2), max_ongoing=4, max_queued=4,
                           max_body_bytes=1000)
    r = httpx.post(f"http://127.0.0.1:{port}/v1/predict", content=b"x", timeout=10)
    assert r.status_code == 408 and "timed out" in r.json()["error"]
    server.stop()
    check_free("127.0.0.1", port)
    with pytest.raises(RuntimeError, match="cannot bind"):  # a port held exclusively by someone else
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
            s.listen()
            DirectIngress(slow_api(0), listen=Listen(port=port), max_ongoing=1, max_queued=1, max_body_bytes=10)


def test_health_check_fails_once_the_server_thread_ends():
    server = DirectIngress(slow_api(0), listen=Listen(port=free_port()), max_ongoing=1, max_queued=1, max_body_bytes=10)
    server.check()
    server.stop()
    with pytest.raises(RuntimeError, match="has stopped"):
        server.check()
