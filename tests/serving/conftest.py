"""Serving fixtures: one Serve instance for the whole tests/serving package (HTTP proxy on a free loopback port,
and the gRPC proxy with the OIP service on another free port: gRPC options are fixed when Serve starts, and Ray
2.60's gRPC proxy binds every interface), shut down when the package is done so later tests get the CPUs back.
Modules deploy their own applications under their own route prefixes and delete them at module teardown."""

from __future__ import annotations

import socket

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="package")
def serve_ports(ray_session):
    """(HTTP port, gRPC port) of the package's Serve."""
    from ray import serve

    from slimray.serving.grpc_v2 import SERVICER_FUNCTION

    port, grpc_port = free_port(), free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port},
                grpc_options={"port": grpc_port, "grpc_servicer_functions": [SERVICER_FUNCTION]})
    yield port, grpc_port
    serve.shutdown()


@pytest.fixture(scope="package")
def serve_port(serve_ports):
    return serve_ports[0]


@pytest.fixture(scope="package")
def grpc_port(serve_ports):
    return serve_ports[1]


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def client(serve_port):
    with httpx.Client(base_url=f"http://127.0.0.1:{serve_port}", timeout=30) as c:
        yield c
