"""The embedded Ray (``slimray.runtime.init_ray``): token authentication on explicitly, even when the environment
says otherwise, and the dashboard (Jobs API) only when asked for. One Ray-starting subprocess (~10-20 s)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent(
    """
    import json, sys, urllib.error, urllib.request
    import ray
    from slimray.auth import read_token
    from slimray.raycompat import token_auth_enabled
    from slimray.runtime import init_ray

    out = {}
    init_ray(num_cpus=1)  # what `slimray run` starts: no dashboard, no Jobs API
    out["run"] = {"webui": ray._private.worker._global_node.address_info.get("webui_url"), "token_auth": token_auth_enabled()}
    ray.shutdown()

    init_ray(num_cpus=1, dashboard=True)
    url = "http://" + ray._private.worker._global_node.address_info["webui_url"]
    out["token_auth"] = token_auth_enabled()

    def status(method, body=None, headers=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url + "/api/jobs/", data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=20) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    out["list_without_token"] = status("GET")
    out["submit_without_token"] = status("POST", {"entrypoint": "touch /tmp/slimray-should-not-exist"})
    out["submit_wrong_token"] = status("POST", {"entrypoint": "true"}, {"Authorization": "Bearer wrong"})
    out["list_with_token"] = status("GET", headers={"Authorization": f"Bearer {read_token()}"})
    ray.shutdown()
    print("RESULT " + json.dumps(out))
    """
)


def test_embedded_ray_refuses_unauthenticated_job_submission_and_starts_the_dashboard_only_on_request(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env["RAY_AUTH_MODE"] = "disabled"  # the environment asks for an open cluster: init_ray must not comply
    p = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    assert p.returncode == 0 and lines, (p.stdout + p.stderr)[-3000:]
    out = json.loads(lines[-1].removeprefix("RESULT "))
    assert not out["run"]["webui"] and out["run"]["token_auth"] is True
    assert out["token_auth"] is True
    assert out["list_without_token"] == 401
    assert out["submit_without_token"] == 401
    assert out["submit_wrong_token"] in (401, 403)
    assert out["list_with_token"] == 200


def test_a_stale_cluster_record_is_reported_and_a_live_one_is_not(tmp_path, monkeypatch):
    """A ``ray_current_cluster`` naming a cluster that no longer answers made every Ray Train run wait 12 s: the
    embedded Ray's start reports it (the record is Ray's, shared by the machine: reported, never removed)."""
    import socket

    from slimray.runtime import stale_cluster_record

    record = tmp_path / "ray_current_cluster"
    monkeypatch.setattr("slimray.raycompat.ray_address_file", lambda: record)
    assert stale_cluster_record() is None  # no record
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # nothing listens once this socket closes
    record.write_text(f"127.0.0.1:{dead}")
    why = stale_cluster_record()
    assert why and str(record) in why and f"127.0.0.1:{dead}" in why and "12 s" in why and record.exists()
    with socket.socket() as live:
        live.bind(("127.0.0.1", 0))
        live.listen()
        record.write_text(f"127.0.0.1:{live.getsockname()[1]}")
        assert stale_cluster_record() is None
    record.write_text("garbage")
    assert stale_cluster_record() is not None  # unreadable as host:port: reported too
