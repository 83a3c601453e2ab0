"""Every Ray internal slimray relies on, in one place, checked against the Ray version it was read from.

Ray's public API is used directly everywhere else; what lives here is private (``ray.serve.context``, the
environment variables Serve reads when it starts) and may change in any Ray release. Each helper calls
``check_ray_version()`` first, so another Ray fails with one clear line instead of an AttributeError deep inside
Serve. Read from the sources of ray 2.60.0 (``ray/serve/_private/constants.py``, ``replica.py``, ``proxy.py``).
"""

from __future__ import annotations

from typing import Any

CHECKED_RAY_VERSION = "2.60.0"

# Serve reads these when its processes start (ray/serve/_private/constants.py, proxy.py):
DIRECT_INGRESS_ENV = "RAY_SERVE_ENABLE_DIRECT_INGRESS"  # each ingress replica serves HTTP on a port of 30000-31000
HA_PROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"  # HAProxy in front of direct-ingress replicas (needs the haproxy binary)
# Serve's HTTP proxy sets SO_REUSEPORT on its socket unless this is "0" (proxy.py, SOCKET_REUSE_PORT_ENABLED)
PROXY_REUSE_PORT_ENV = "SERVE_SOCKET_REUSE_PORT_ENABLED"


class RayVersionError(RuntimeError):
    """The installed Ray is not the one slimray's Ray internals were checked against."""


def check_ray_version() -> None:
    import ray

    if ray.__version__ != CHECKED_RAY_VERSION:
        raise RayVersionError(
            f"slimray uses Ray Serve internals checked against ray {CHECKED_RAY_VERSION}, but ray {ray.__version__} is "
            f"installed; install ray[serve]=={CHECKED_RAY_VERSION} (see slimray/raycompat.py for what is used)"
        )


def serve_details() -> dict[str, Any]:
    """What ``serve status`` shows of the running Serve (its HTTP/gRPC options, applications, deployments)."""
    check_ray_version()
    from ray.serve.context import _get_global_client

    return _get_global_client().get_serve_details()
