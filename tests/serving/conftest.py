"""Serving fixtures: one Serve instance (HTTP proxy on a free loopback port) for the whole tests/serving
package, shut down when the package is done so later tests get the CPUs back. Modules deploy their own
applications under their own route prefixes and delete them at module teardown."""

from __future__ import annotations

import socket

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="package")
def serve_port(ray_session):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def client(serve_port):
    with httpx.Client(base_url=f"http://127.0.0.1:{serve_port}", timeout=30) as c:
        yield c
