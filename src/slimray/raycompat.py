"""Every private Ray API slimray relies on, in one place, checked against the Ray version it was read from.

Ray's public API is used directly everywhere else (``slimray.layers`` fails the build on a private Ray name
outside this module). What lives here is private to Ray and may change in any release:

* ``serve_details()``: the running Serve's details (``ray.serve.context._get_global_client``);
* ``reload_ray_config()`` and ``token_auth_enabled()``: token authentication of the embedded Ray
  (``ray._raylet.Config``, ``ray._private.authentication``);
* ``session_dir()``: the local Ray session's folder (``ray._private.worker._global_node``);
* ``ray_address_file()``: where ``ray start`` records the last cluster on this machine (``ray._common.utils``);
* ``train_report_loggers()``: the loggers Ray Train V2 writes every report to (``ray.train.v2._internal``);
* the environment variables Serve reads when its processes start (constants below).

Read from the sources of ray 2.60.0. Another Ray version warns once (``RayVersionWarning``); a shim whose
internals are gone or changed raises ``RayCompatError`` naming the shim, the internal and both versions,
instead of an ``AttributeError`` deep inside Ray or, worse, a silent change of behaviour.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path
from typing import Any

CHECKED_RAY_VERSION = "2.60.0"

# Serve reads these when its processes start (ray/serve/_private/constants.py, proxy.py):
DIRECT_INGRESS_ENV = "RAY_SERVE_ENABLE_DIRECT_INGRESS"  # each ingress replica serves HTTP on a port of 30000-31000
HA_PROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"  # HAProxy in front of direct-ingress replicas (needs the haproxy binary)
# Serve's HTTP proxy sets SO_REUSEPORT on its socket unless this is "0" (proxy.py, SOCKET_REUSE_PORT_ENABLED)
PROXY_REUSE_PORT_ENV = "SERVE_SOCKET_REUSE_PORT_ENABLED"

_TRAIN_CONTEXT_MODULE = "ray.train.v2._internal.execution.context"  # logs each ray.train.report at INFO
_warned: set[str] = set()


class RayVersionWarning(UserWarning):
    """The installed Ray is not the one slimray's Ray internals were checked against (they may still work)."""


class RayCompatError(RuntimeError):
    """A Ray internal a shim uses is gone or changed in the installed Ray."""

    def __init__(self, shim: str, internal: str, cause: BaseException | str):
        import ray

        super().__init__(
            f"slimray.raycompat.{shim}: {internal} is not what ray {CHECKED_RAY_VERSION} had (installed: ray "
            f"{ray.__version__}): {cause}. Install ray=={CHECKED_RAY_VERSION} or update slimray/raycompat.py"
        )
        self.shim, self.internal = shim, internal


def check_ray_version() -> None:
    """Warn once per process when the installed Ray differs from ``CHECKED_RAY_VERSION``."""
    import ray

    if ray.__version__ != CHECKED_RAY_VERSION and ray.__version__ not in _warned:
        _warned.add(ray.__version__)
        warnings.warn(
            f"slimray uses Ray internals (slimray/raycompat.py) checked against ray {CHECKED_RAY_VERSION}; ray "
            f"{ray.__version__} is installed", RayVersionWarning, stacklevel=3,
        )


def serve_details() -> dict[str, Any]:
    """What ``serve status`` shows of the running Serve (its HTTP/gRPC options, applications, deployments)."""
    check_ray_version()
    internal = "ray.serve.context._get_global_client().get_serve_details()"
    try:
        from ray.serve.context import _get_global_client

        get = _get_global_client().get_serve_details
    except (ImportError, AttributeError) as err:
        raise RayCompatError("serve_details", internal, err) from err
    details = get()
    if not isinstance(details, dict):
        raise RayCompatError("serve_details", internal, f"returned {type(details).__name__}, not a dict")
    return details


def reload_ray_config() -> None:
    """Make this process's Ray re-read its ``RAY_*`` environment variables (it caches them when imported), as Ray's
    own ``_enable_token_auth`` does after setting ``RAY_AUTH_MODE``."""
    check_ray_version()
    try:
        from ray._raylet import Config

        initialize = Config.initialize
    except (ImportError, AttributeError) as err:
        raise RayCompatError("reload_ray_config", 'ray._raylet.Config.initialize("")', err) from err
    initialize("")


def token_auth_enabled() -> bool:
    """Whether this process's Ray has token authentication on."""
    check_ray_version()
    internal = "ray._private.authentication.authentication_utils.is_token_auth_enabled()"
    try:
        from ray._private.authentication.authentication_utils import is_token_auth_enabled
    except ImportError as err:
        raise RayCompatError("token_auth_enabled", internal, err) from err
    enabled = is_token_auth_enabled()
    if not isinstance(enabled, bool):
        raise RayCompatError("token_auth_enabled", internal, f"returned {enabled!r}, not a bool")
    return enabled


def ray_address_file() -> Path:
    """Where ``ray start`` records the last cluster started on this machine (``ray_current_cluster`` in Ray's default
    temp folder), which a plain ``ray.init()`` and the State API fall back to."""
    check_ray_version()
    internal = "ray._common.utils.get_ray_address_file(None)"
    try:
        from ray._common.utils import get_ray_address_file

        path = get_ray_address_file(None)
    except (ImportError, AttributeError, TypeError) as err:
        raise RayCompatError("ray_address_file", internal, err) from err
    if not isinstance(path, str) or not path.endswith("ray_current_cluster"):
        raise RayCompatError("ray_address_file", internal, f"returned {path!r}")
    return Path(path)


def session_dir() -> str | None:
    """The session folder of the Ray this process started or joined on this machine (worker logs, Tune and Train
    output); None when Ray is not initialised here."""
    check_ray_version()
    internal = "ray._private.worker._global_node.get_session_dir_path()"
    try:
        from ray._private import worker

        node = worker._global_node
        if node is None:
            return None
        path = node.get_session_dir_path()
    except (ImportError, AttributeError) as err:
        raise RayCompatError("session_dir", internal, err) from err
    return str(path) if path else None


def train_report_loggers() -> list[str]:
    """The loggers Ray Train V2 writes an INFO line to at every ``ray.train.report``: ``ray.train`` and the
    execution context's, which is named after its source file (``logging.getLogger(__file__)``)."""
    check_ray_version()
    try:
        spec = importlib.util.find_spec(_TRAIN_CONTEXT_MODULE)
    except ImportError as err:  # a parent package is gone
        raise RayCompatError("train_report_loggers", _TRAIN_CONTEXT_MODULE, err) from err
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        raise RayCompatError("train_report_loggers", _TRAIN_CONTEXT_MODULE, "no such module")
    return ["ray.train", spec.origin]
