"""Connecting to Ray: an embedded local Ray started in-process by default, or a real cluster.

``--address`` (or ``RAY_ADDRESS``) reaches an existing cluster; otherwise Ray starts in this process with
the machine's CPUs, no dashboard and a fresh session (``address="local"`` ignores stale cluster files).
Ray Train is told to fail fast: worker groups that cannot start give up after a bounded time.
"""

from __future__ import annotations

import os

import ray

# Defaults for the knobs that otherwise turn a resource shortage into an endless wait (see ray-2.60 notes).
FAIL_FAST_ENV = {
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "60",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
}


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> bool:
    """Start or connect to Ray; returns True when this call started an embedded Ray."""
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
        return False
    ray.init(
        address="local",
        num_cpus=num_cpus or os.cpu_count() or 1,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        runtime_env={"env_vars": env_vars},
        log_to_driver=True,
        configure_logging=True,
        logging_level="WARNING",
    )
    return True
