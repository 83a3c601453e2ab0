"""The direct ingress: each replica serves HTTP (and, when asked, OIP gRPC) itself, with no Serve proxy between.

Why: Serve's HTTP proxy is one Python process that re-sends every request to a replica; on a small box it caps a
fast model at ~100-170 requests/s (docs/serving-ingress.md). Here the replica's own uvicorn answers instead.

What it binds: HTTP on ``host:port`` and gRPC (only when ``grpc_port`` is given) on ``host:grpc_port``, loopback
unless told otherwise. Both sockets set ``SO_REUSEPORT``, so the replicas of one deployment on one node share one
address and the kernel spreads connections across them: ``--replicas 2`` still gives one URL, and the "balancer"
is Linux itself (no extra process, no stats port, no admin socket; Linux lets only processes of the same user join
a ``SO_REUSEPORT`` port). ``deploy`` checks that the ports are free before deploying (``check_free``), so a
replica never joins someone else's listener (Serve's own proxy also sets ``SO_REUSEPORT``). The balancing is per
connection (keep-alive connections stay on one replica), and it spans one node: this ingress is for the
single-node (embedded) case; clusters use Serve's proxy (``ingress: proxy``).

What it enforces, since no proxy does: the app's own API key and streaming body limit (``slimray.serving.http``:
a chunked body stops being read at the limit, 413), ``max_ongoing_requests`` requests at once per replica with up
to ``max_queued_requests`` waiting (503 beyond), ``request_timeout_s`` (408), the route prefix (404 outside it);
over gRPC the API key (metadata) and ``max_body_bytes`` per message (RESOURCE_EXHAUSTED).

The servers run on one thread with their own event loop (uvloop when installed, as ``uvicorn.run`` picks),
started by the replica's constructor, which returns only once both listen, so Serve marks the replica running only
when it answers. ``stop()`` (the replica's ``__del__``) closes the listeners and lets requests in flight finish.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from dataclasses import asdict, dataclass
from typing import Any

from slimray.serving.http import json_bytes

START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Listen:
    """Where a direct-ingress replica listens (passed to the replica as a plain dict)."""

    host: str = "127.0.0.1"
    port: int = 8000
    route_prefix: str = "/"
    grpc_port: int | None = None
    request_timeout_s: float | None = None
    node_ip: str | None = None  # the replicas run on this node (the one deploy() ran on): its host:port is the URL

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def check_free(host: str, port: int, what: str = "port") -> None:
    """Raise ``RuntimeError`` unless ``host:port`` can be bound exclusively right now (nothing listens there, not
    even a ``SO_REUSEPORT`` listener such as Serve's proxy)."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            raise RuntimeError(f"{what} {host}:{port} is already in use ({err.strerror}): another server (or Serve's "
                               f"proxy) listens there; pick a free port") from None


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` shared with this deployment's other replicas (``SO_REUSEPORT``)."""
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise RuntimeError(f"direct ingress: cannot bind {host}:{port}: {err.strerror}") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


async def _send_error(send, status: int, message: str) -> None:
    body = json_bytes({"error": message})
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class Admission:
    """Pure ASGI middleware doing what Serve's proxy and router do for a replica: at most ``max_ongoing`` requests
    at once, ``max_queued`` more waiting (-1: no bound) and 503 beyond, and 408 after ``timeout_s``."""

    def __init__(self, app, *, max_ongoing: int, max_queued: int, timeout_s: float | None) -> None:
        self.app, self.max_ongoing, self.max_queued, self.timeout_s = app, max_ongoing, max_queued, timeout_s
        self.ongoing = 0
        self.waiting = 0
        self._free: asyncio.Event | None = None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._free is None:
            self._free = asyncio.Event()
        if self.ongoing >= self.max_ongoing:
            if 0 <= self.max_queued <= self.waiting:
                await _send_error(send, 503, f"overloaded: {self.ongoing} requests running and {self.waiting} waiting; retry later")
                return
            self.waiting += 1
            try:
                while self.ongoing >= self.max_ongoing:
                    self._free.clear()
                    await self._free.wait()
            finally:
                self.waiting -= 1
        self.ongoing += 1
        started = False

        async def send_tracking(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            if self.timeout_s is None:
                await self.app(scope, receive, send_tracking)
            else:
                async with asyncio.timeout(self.timeout_s):
                    await self.app(scope, receive, send_tracking)
        except TimeoutError:
            if not started:
                await _send_error(send, 408, f"request timed out after {self.timeout_s:g} s")
        finally:
            self.ongoing -= 1
            self._free.set()


class RoutePrefix:
    """Pure ASGI middleware: serves ``app`` under ``prefix`` (as Serve's proxy does: ``root_path`` set, the path
    kept whole); anything outside the prefix gets a JSON 404."""

    def __init__(self, app, prefix: str) -> None:
        self.app, self.prefix = app, prefix.rstrip("/")

    async def __call__(self, scope, receive, send) -> None:
        if not self.prefix or scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path != self.prefix and not path.startswith(self.prefix + "/"):
            if scope["type"] == "http":
                await _send_error(send, 404, "Not Found")
            return
        await self.app({**scope, "root_path": scope.get("root_path", "") + self.prefix}, receive, send)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


class DirectIngress:
    """The replica's own servers: ``app`` (an ASGI app) over HTTP, and ``servicer`` (an object with the OIP gRPC
    methods, ``slimray.serving.grpc_v2.GrpcInference``) over gRPC when ``listen.grpc_port`` is set."""

    def __init__(self, app, *, listen: Listen, max_ongoing: int, max_queued: int, max_body_bytes: int,
                 servicer: Any = None) -> None:
        self.listen = listen
        self.max_body_bytes = max_body_bytes
        self.servicer = servicer
        self.app = RoutePrefix(Admission(app, max_ongoing=max_ongoing, max_queued=max_queued,
                                         timeout_s=listen.request_timeout_s), listen.route_prefix)
        self._sock = listen_socket(listen.host, listen.port)  # a taken port fails the constructor right here
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._http = None
        self._thread = threading.Thread(target=self._run, name="slimray-direct-ingress", daemon=True)
        self._thread.start()
        if not self._started.wait(START_TIMEOUT_S):
            raise RuntimeError(f"direct ingress did not start within {START_TIMEOUT_S:.0f} s")
        if self._error is not None:
            raise RuntimeError(f"direct ingress failed to start: {self._error}") from self._error

    def _run(self) -> None:
        self._loop = loop = _new_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        except BaseException as err:  # noqa: BLE001 - reported to the constructor when it happens at start
            if not self._started.is_set():
                self._error = err
        finally:
            self._started.set()
            self._sock.close()

    async def _start_grpc(self):
        import grpc

        from slimray.serving.grpc.inference_pb2_grpc import add_GRPCInferenceServiceServicer_to_server

        host, port = self.listen.host, self.listen.grpc_port
        server = grpc.aio.server(options=[("grpc.so_reuseport", 1), ("grpc.max_receive_message_length", self.max_body_bytes)])
        add_GRPCInferenceServiceServicer_to_server(self.servicer, server)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            bound = server.add_insecure_port(address)
        except RuntimeError as err:
            raise RuntimeError(f"cannot bind gRPC on {address}: {err}") from None
        if not bound:
            raise RuntimeError(f"cannot bind gRPC on {address}")
        await server.start()
        return server

    async def _serve(self) -> None:
        import uvicorn

        grpc_server = await self._start_grpc() if self.listen.grpc_port is not None else None
        config = uvicorn.Config(self.app, lifespan="off", access_log=False, log_config=None, log_level="warning",
                                ws="none", server_header=False, timeout_graceful_shutdown=10)
        self._http = server = uvicorn.Server(config)
        task = asyncio.get_running_loop().create_task(server.serve(sockets=[self._sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.01)
        if task.done():
            task.result()  # raises what stopped it
        self._started.set()
        try:
            await task
        finally:
            if grpc_server is not None:
                await grpc_server.stop(grace=5)

    def check(self) -> None:
        """Raises when the servers' thread has ended (the replica's health check: Serve then replaces it)."""
        if not self._thread.is_alive():
            raise RuntimeError(f"the direct ingress on {self.listen.host}:{self.listen.port} has stopped")

    def stop(self) -> None:
        """Stop accepting, let requests in flight finish (bounded), return."""
        if self._http is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(setattr, self._http, "should_exit", True)
            self._thread.join(15)
