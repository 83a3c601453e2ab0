"""Connecting to Ray: an embedded local Ray started in-process by default, or a real cluster.

``--address`` (or ``RAY_ADDRESS``) reaches an existing cluster; otherwise Ray starts in this process with
the machine's CPUs and a fresh session (``address="local"`` ignores stale cluster files).

The embedded Ray:
* keeps token authentication on explicitly (``RAY_AUTH_MODE=token`` set here, not left to Ray's default);
  its token is Ray's own (``~/.ray/auth_token``, created if missing);
* starts the dashboard (and with it the Jobs and State APIs) only when asked, ``dashboard=True``, bound to
  127.0.0.1: ``slimray run`` needs none of them;
* keeps worker output out of the console (``log_to_driver=False``) unless ``--verbose``: it stays in Ray's
  session folder, which ``slimray.console.link_ray_logs`` links from ``RUN/logs/``.
Ray Train is told to fail fast: worker groups that cannot start give up after a bounded time. A stale record of a
killed ``ray start`` cluster on this machine is reported before the embedded Ray starts (it costs every Train run 12 s).
"""

from __future__ import annotations

import os

import ray

from slimray import console
from slimray.raycompat import reload_ray_config, token_auth_enabled

# Defaults for the knobs that otherwise turn a resource shortage into an endless wait (see ray-2.60 notes).
FAIL_FAST_ENV = {
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "60",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
}
AUTH_ENV = {"RAY_AUTH_MODE": "token"}  # the embedded Ray's Jobs/State APIs refuse requests without the token


def init_ray(address: str | None = None, *, num_cpus: int | None = None, dashboard: bool = False) -> bool:
    """Start or connect to Ray; returns True when this call started an embedded Ray.

    ``dashboard``: start the embedded Ray's dashboard (Jobs and State APIs), for commands and tests that use them.
    """
    for key, value in FAIL_FAST_ENV.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    env_vars = {k: os.environ[k] for k in FAIL_FAST_ENV}
    if address:
        # A job's driver keeps the runtime_env it was submitted with (slimray.jobs adds these env vars
        # there); passing another one here would replace it.
        ray.init(address=address, log_to_driver=True)
        console.install_signal_handlers()  # ray.init replaced the SIGTERM handler
        return False
    _require_token_auth()
    if why := stale_cluster_record():
        from slimray.runs import log

        log(f"warning: {why}")
    ray.init(
        address="local",
        num_cpus=num_cpus or os.cpu_count() or 1,
        include_dashboard=dashboard,
        dashboard_host="127.0.0.1",
        runtime_env={"env_vars": env_vars},
        log_to_driver=console.verbose(),
        configure_logging=True,
        logging_level="WARNING",
    )
    console.install_signal_handlers()  # ray.init replaced the SIGTERM handler
    if not token_auth_enabled():
        ray.shutdown()
        raise RuntimeError("the embedded Ray started without token authentication; refusing to run it open")
    return True


def stale_cluster_record(*, connect_timeout_s: float = 0.5) -> str | None:
    """Why Ray's record of the last cluster started on this machine (``ray_current_cluster``, written by ``ray start``)
    will slow the embedded Ray down, when it names a cluster that no longer answers: Ray Train's State API lookups
    resolve it, hang, and every Train run then waits 12 s at its end. ``None`` when there is no record or its GCS
    port answers. The record is Ray's, shared by every Ray on the machine: it is reported, not removed."""
    import socket

    from slimray.raycompat import ray_address_file

    path = ray_address_file()
    try:
        recorded = path.read_text().strip()
    except OSError:
        return None
    host, _, port = recorded.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=connect_timeout_s):
            return None
    except (OSError, ValueError):
        pass
    return (f"{path} records a Ray cluster at {recorded} that does not answer (left by a `ray start` whose processes "
            f"were killed): Ray Train waits 12 s at the end of every run while it is there; `ray stop` or deleting "
            f"the file removes it")


def _require_token_auth() -> None:
    """RAY_AUTH_MODE=token for this process (and the Ray processes it starts), whatever the environment said.
    Ray caches its config when it is imported: refresh it, as Ray's own ``_enable_token_auth`` does."""
    os.environ.update(AUTH_ENV)
    reload_ray_config()
