"""Ctrl-C and SIGTERM stop `slimray serve` within seconds (exit 130 / 0, no traceback) and delete only slimray's
own Serve application: another application on the same cluster keeps serving. With the default (direct) ingress on
free loopback ports (the SIGTERM case with gRPC too: the replica's own gRPC server, loopback only, and the port is
free again after the stop), and behind Serve's proxy (`--ingress proxy`, gRPC on the port the cluster's Serve was
started with)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bystander(serve_port):
    """Someone else's application on the same cluster."""
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Bystander:
        def __call__(self, request) -> str:
            return "still here"

    serve.run(Bystander.bind(), name="bystander", route_prefix="/bystander")
    yield f"http://127.0.0.1:{serve_port}/bystander"
    serve.delete("bystander")


@pytest.mark.parametrize(("sig", "code", "ingress"), [(signal.SIGINT, 130, "direct"), (signal.SIGTERM, 0, "direct"),
                                                     (signal.SIGTERM, 0, "proxy")],
                         ids=["ctrl-c-direct", "sigterm-direct", "sigterm-proxy"])
def test_signal_stops_serve_and_deletes_only_its_app(digits_run, serve_port, grpc_port, ray_session, bystander, sig, code, ingress):
    from ray import serve

    from tests.serving.conftest import free_port

    run_dir, _ = digits_run
    name = "digits-test"  # the run's name: slimray's application
    address = ray_session.get_runtime_context().gcs_address
    cli = Path(sys.executable).with_name("slimray")
    port, grpc_port = (serve_port, grpc_port) if ingress == "proxy" else (free_port(), free_port())
    grpc = ["--grpc-port", str(grpc_port)] if sig == signal.SIGTERM else []
    proc = subprocess.Popen([str(cli), "serve", str(run_dir), "--port", str(port), *grpc, "--ingress", ingress, "--address", address],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    serving = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C stops the server" in line:
                serving.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert serving.wait(180), "".join(lines[-30:])
        assert name in serve.status().applications
        proc.send_signal(sig)
        start = time.monotonic()
        rc = proc.wait(timeout=10)
        elapsed = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(5)
    out = "".join(lines)
    assert rc == code, out[-3000:]
    assert elapsed < 10
    assert "Traceback" not in out and "core dumped" not in out and "Aborted" not in out, out[-3000:]
    assert name not in serve.status().applications
    assert httpx.get(bystander, timeout=10).text == "still here"
    if grpc:
        assert f"gRPC (inference.GRPCInferenceService, e.g. tritonclient.grpc): 127.0.0.1:{grpc_port}" in out, out[-3000:]
        assert (f"binds every interface ([::]:{grpc_port})" in out) == (ingress == "proxy"), out[-3000:]
    if ingress == "direct":  # the replica's listeners are gone with the application
        from slimray.serving.direct import check_free

        for p in [port, *([grpc_port] if grpc else [])]:
            check_free("127.0.0.1", p)
