"""The one Serve app builder: any model kind (a codec), every protocol, one deployment per model.

``build_app(ServeOptions(...))`` applies the deployment options to the ingress class and returns a bound
application; nothing is deployed on import. For ``serve run`` / ``serve deploy`` the import path is
``slimray.serving.app:app_builder`` with the options as ``args`` (see ``serve/*.yaml``).

Layers: ``SlimrayModel`` (the replica; its ``GrpcInference`` methods answer the OIP gRPC service through Serve's
gRPC proxy, ``slimray.serving.grpc_v2``) holds a ``ModelServer`` (``slimray.serving.model``: the batched
forward through the artifact's codec, ``slimray.serving.codecs``) and builds the HTTP ingress
(``slimray.serving.protocols``, or the ingress the codec names, e.g. ``slimray.serving.openai_api`` for causal
LMs) at replica start through Serve's ``__serve_build_asgi_app__`` hook, so the routes fit the model kind. The
API key is read inside the replica (``api_key_file`` or its own ``api_key_env`` environment variable), never
passed through Ray. ``deploy`` has two ingresses (``INGRESSES``; docs/serving-ingress.md says what each binds):
``direct`` (the default of ``slimray serve``): every replica serves HTTP, and gRPC when asked, itself on
``host:port`` (``slimray.serving.direct``; Serve runs no proxy for it); ``proxy``: Serve's HTTP proxy on
``host:port`` (and, when asked, its gRPC proxy, which in Ray 2.60 binds every interface) routes to the replicas.
``undeploy`` deletes only that application (never ``serve.shutdown()``, which would remove every app of a shared
cluster). A deployment that fails raises ``DeploymentFailedError`` with the replicas' exception, read from
``serve.status()`` (Serve's own error names no cause; the cause is otherwise only in its controller log).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from ray import serve

from slimray.schema import ConfigError, DeploymentFailedError
from slimray.serving.direct import DirectIngress, Listen, check_free
from slimray.serving.grpc_v2 import SERVICER_FUNCTION, GrpcInference
from slimray.serving.codecs import RequestError, check_texts, parse_inputs, parse_v2_tensor  # noqa: F401  (re-exported)
from slimray.serving.http import read_api_key
from slimray.serving.model import ModelServer
from slimray.serving.options import ServeOptions, deployment_options, options_for_run  # noqa: F401  (re-exported)
from slimray.serving.protocols import V2Tensor, build_api, ingress_for  # noqa: F401  (re-exported)


class SlimrayModel(GrpcInference):
    """One replica: the model server, its HTTP ingress and its OIP gRPC methods. Undecorated; see ``build_app``."""

    def __init__(self, options: dict[str, Any], loader: Callable | None = None, listen: dict[str, Any] | None = None):
        self.options = ServeOptions.model_validate(options)
        self.api_key = read_api_key(env=self.options.api_key_env, file=self.options.api_key_file)
        self.server = ModelServer(self.options, loader=loader)
        self._asgi = None
        self.direct = None
        if listen is not None:  # the direct ingress: this replica serves HTTP (and gRPC when asked) itself
            where = Listen(**listen)
            self.direct = DirectIngress(self.__serve_build_asgi_app__(), listen=where, servicer=self,
                                        max_ongoing=self.options.max_ongoing_requests,
                                        max_queued=self.options.max_queued_requests, max_body_bytes=self.options.max_body_bytes)

    def __serve_build_asgi_app__(self):
        # the family's ingress (its codec's ``ingress`` hook): the tensor protocols, or e.g. the OpenAI API; built
        # once per replica (the direct ingress and Serve share it)
        if self._asgi is None:
            self._asgi = ingress_for(self.server.codec)(self.server, api_key=self.api_key, metrics=self.server.replica_id is not None)
        return self._asgi

    def __del__(self):
        # Serve calls this when it stops the replica: close the direct ingress's listeners first
        if getattr(self, "direct", None) is not None:
            self.direct.stop()

    def replica_info(self) -> dict[str, Any]:
        """Which replica, node and device this is (also over HTTP at ``GET /v1/replica``); for handle calls."""
        return self.server.info()

    def check_health(self) -> None:
        """Serve calls this every ``health_check_period_s``; raising makes Serve replace the replica."""
        self.server.check_health()
        if self.direct is not None:
            self.direct.check()


# The ASGI app is built per replica (late-bound ingress): the class carries no routes of its own.
SlimrayIngress = serve.ingress()(SlimrayModel)


INGRESSES = ("direct", "proxy")


def build_app(options: ServeOptions, *, loader: Callable | None = None, listen: Listen | None = None) -> serve.Application:
    """Apply the deployment options to the ingress class and bind it; deploys nothing. ``listen``: the replicas
    serve HTTP themselves there (the direct ingress; ``deploy(ingress="direct")`` sets it)."""
    kwargs = deployment_options(options)
    if listen is not None and listen.node_ip:  # direct ingress: the replicas serve on the node that deployed them
        kwargs["ray_actor_options"] = {**kwargs["ray_actor_options"], "resources": {f"node:{listen.node_ip}": 0.001}}
    app = serve.deployment(SlimrayIngress, **kwargs).bind(options.model_dump(), loader, listen.to_dict() if listen is not None else None)
    # HTTP-level options live on the ingress, not the deployment: deploy() reads them from here.
    app._slimray_http_options = {"request_timeout_s": options.request_timeout_s}
    app._slimray_build = (options, loader)
    return app


# where a Serve config file sets what `slimray serve` takes from these fields
_SERVE_CONFIG_FILE_FIELDS = {"host": "http_options.host", "port": "http_options.port", "route_prefix": "the application's route_prefix",
                             "grpc_port": "grpc_options.port"}


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Entry point for ``serve run`` / ``serve deploy``: ``import_path: slimray.serving.app:app_builder``.

    ``args`` are the one serve schema (``ServeOptions``: ``ServeConfig`` + ``model_dir``/``name``), checked in full.
    Serve's own proxy serves these apps, so ``ingress`` is ``proxy`` (the default here); where to listen is the
    Serve config's (``http_options``, ``grpc_options``, ``route_prefix``), and ``request_timeout_s`` is an HTTP option:
    set ``http_options.request_timeout_s`` there.
    """
    given = sorted(set(args) & set(_SERVE_CONFIG_FILE_FIELDS))
    if given:
        raise ConfigError(f"serve application args: {given[0]} is set by the Serve config file here ({_SERVE_CONFIG_FILE_FIELDS[given[0]]}), "
                         "not in the application's args")
    if args.get("ingress", "proxy") != "proxy":
        raise ConfigError("serve application args: ingress must be proxy (a Serve config deploys behind Serve's proxy; "
                         "the direct ingress is `slimray serve`'s)")
    return build_app(ServeOptions.from_dict({**args, "ingress": "proxy"}, source="serve application args"))


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(\([\w.]+\))?: ")


def _exception_text(message: str) -> str:
    """The exception a replica raised, from a deployment's status message (``... Error:\n<traceback>``): the last
    ``Type: text`` line of the traceback and what follows it (a message of several lines), else the last line."""
    tail = message.split("Error:\n", 1)[-1]
    lines = [line for line in tail.splitlines() if line.strip()]
    for i in range(len(lines) - 1, -1, -1):
        if _EXCEPTION_LINE.match(lines[i]):
            return "\n".join(lines[i:]).strip()
    return lines[-1].strip() if lines else message.strip()


def failure_cause(name: str) -> str | None:
    """Why application ``name`` failed to deploy, read from ``serve.status()`` (what Serve's controller logs): each
    failed deployment's replica exception; None when Serve says nothing more."""
    try:
        app = serve.status().applications.get(name)
    except Exception:  # Serve gone
        return None
    if app is None:
        return None
    causes = [f"{dep}: {_exception_text(d.message)}" for dep, d in app.deployments.items()
              if d.message and str(getattr(d.status, "value", d.status)) in ("DEPLOY_FAILED", "UNHEALTHY")]
    if not causes:
        causes = [f"{dep}: {_exception_text(d.message)}" for dep, d in app.deployments.items() if d.message]
    if not causes and app.message:
        causes = [app.message.strip()]
    return "\n".join(causes) or None


def _run(app: serve.Application, *, name: str, route_prefix: str | None) -> None:
    """``serve.run`` that, when the application fails to deploy, raises ``DeploymentFailedError`` with the cause the
    replicas raised (Serve's own error says only ``Deploying application ... failed``)."""
    try:
        serve.run(app, name=name, route_prefix=route_prefix, blocking=False)
    except RuntimeError as err:
        cause = failure_cause(name)
        if cause is None:
            raise
        raise DeploymentFailedError(f"Serve could not deploy {name!r}; its replica failed with:\n  " + cause.replace("\n", "\n  ")) from err


def deploy(
    app: serve.Application,
    *,
    name: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    route_prefix: str = "/",
    request_timeout_s: float | None = None,
    grpc_port: int | None = None,
    ingress: str = "proxy",
) -> str:
    """Run ``app`` behind ``ingress`` on ``host:port`` (loopback by default), return its URL.

    ``ingress="direct"``: the replicas serve HTTP (and gRPC on ``grpc_port`` when given) themselves on ``host``
    (``slimray.serving.direct``), placed on this node; Serve starts no proxy (``proxy_location: Disabled`` when this call starts Serve)
    and the application gets no route on a proxy that already runs. The ports must be free (checked here).
    Autoscaling and replicas spread over nodes need ``ingress="proxy"``.

    ``ingress="proxy"``: Serve's HTTP proxy on ``host:port``.

    ``request_timeout_s`` (default: the app's ``ServeOptions.request_timeout_s``) makes the proxy answer 408
    (DEADLINE_EXCEEDED over gRPC); it is set when the proxies start, so an already running Serve keeps its value. ``grpc_port`` also starts
    Serve's gRPC proxy with the Open Inference Protocol service (off by default). Ray 2.60 has no host option for
    that proxy: it binds every interface (``[::]:grpc_port``, ``grpc_util.start_grpc_server``), not ``host``.
    gRPC options are fixed when Serve starts: if Serve already runs on this cluster without this service on
    ``grpc_port``, ``deploy`` raises ``RuntimeError`` before deploying anything.
    """
    if ingress not in INGRESSES:
        raise ValueError(f"ingress must be one of {INGRESSES}, got {ingress!r}")
    if request_timeout_s is None:
        request_timeout_s = getattr(app, "_slimray_http_options", {}).get("request_timeout_s")
    if ingress == "direct":
        import ray

        listen = Listen(host=host, port=port, route_prefix=route_prefix, grpc_port=grpc_port,
                        request_timeout_s=request_timeout_s, node_ip=ray.util.get_node_ip_address())
        return _deploy_direct(app, name=name, listen=listen)
    http_options: dict[str, Any] = {"host": host, "port": port}
    if request_timeout_s is not None:
        http_options["request_timeout_s"] = request_timeout_s
    grpc_options = None
    if grpc_port is not None:
        grpc_options = {"port": grpc_port, "grpc_servicer_functions": [SERVICER_FUNCTION]}
        if request_timeout_s is not None:  # the same limit over gRPC (DEADLINE_EXCEEDED)
            grpc_options["request_timeout_s"] = request_timeout_s
    serve.start(http_options=http_options, grpc_options=grpc_options)
    if grpc_port is not None:
        _check_grpc_proxy(grpc_port)
    _run(app, name=name, route_prefix=route_prefix)
    return _url(host, port, route_prefix)


def _url(host: str, port: int, route_prefix: str) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    shown = f"[{shown}]" if ":" in shown else shown
    return f"http://{shown}:{port}{route_prefix.rstrip('/')}"


def _deploy_direct(app: serve.Application, *, name: str, listen: Listen) -> str:
    options, loader = app._slimray_build
    if options.max_replicas is not None:
        raise ValueError("autoscaling (max_replicas) needs ingress 'proxy': the direct ingress bypasses the request "
                         "counts Serve's autoscaler reads")
    if options.max_replicas_per_node is not None:
        raise ValueError("max_replicas_per_node spreads replicas over nodes; the direct ingress serves one node's "
                         "loopback (or host): use ingress 'proxy' on clusters")
    check_free(listen.host, listen.port, "HTTP port")
    if listen.grpc_port is not None:
        check_free(listen.host, listen.grpc_port, "gRPC port")
    serve.start(proxy_location="Disabled")  # no proxy when this call starts Serve; a running Serve keeps its own
    # route_prefix=None: no route on a proxy that may already run; the replicas apply the prefix themselves
    _run(build_app(options, loader=loader, listen=listen), name=name, route_prefix=None)
    return _url(listen.host, listen.port, listen.route_prefix)


def _check_grpc_proxy(grpc_port: int) -> None:
    """Raise unless the running Serve's gRPC proxy serves the OIP service on ``grpc_port`` (``serve.start`` on a
    running Serve keeps its first options and only logs that it did)."""
    from slimray.raycompat import serve_details

    running = serve_details().get("grpc_options") or {}
    functions = running.get("grpc_servicer_functions") or []
    if running.get("port") != grpc_port or SERVICER_FUNCTION not in functions:
        served = f"port {running.get('port')} with {functions}" if functions else "no gRPC service"
        raise RuntimeError(
            f"Serve is already running on this cluster with {served}; its gRPC options are fixed when it starts, "
            f"so gRPC on port {grpc_port} needs a cluster whose Serve was started with it (or no gRPC port)"
        )


def undeploy(name: str) -> None:
    """Delete only the Serve application ``name`` (other applications on the cluster keep running)."""
    try:
        serve.delete(name)  # returns once the application is gone (Serve's default)
    except Exception:  # Serve already gone (the cluster stopped first): nothing left to delete
        pass
