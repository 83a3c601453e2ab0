"""A real local multi-node cluster (ray start head + 1 worker, token auth on): submit a user's own model
(code, weights and data of its own) as a Ray Job, see it succeed and write its artifacts, deploy the winner from the serve/ config, call it
over HTTP, and tear the cluster down by PID. Without the token, the submission fails with a message."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from slimray import cluster_local

from .byom import project
from .conftest import REPO


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(args, *, env, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "slimray.cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory):
    # The in-process Ray of other tests stays up (idle): shutting it down here would leave the session's
    # `ray_session` fixture pointing at nothing, and a later ray.put would try to join this cluster.
    state = tmp_path_factory.mktemp("cluster")
    cluster = cluster_local.up(num_workers=1, cpus_per_node=1, head_cpus=1, state_dir=state)
    yield cluster
    pids = cluster_local.down(state_dir=state)
    assert pids == cluster.pids
    assert not any(cluster_local._alive(p) for p in pids), "every ray process group we started is gone"


@pytest.fixture()
def clean_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(tmp_path / "home")  # no ~/.ray/auth_token, no ~/.slimray state
    return env


def test_submission_without_token_fails_with_message(local_cluster, clean_env):
    out = _cli(["submit", "--address", local_cluster.dashboard_url, "run", "--recipe", "digits"], env=clean_env, timeout=60)
    assert out.returncode == 2
    assert "requires a token and none was sent" in out.stderr
    assert "Traceback" not in out.stderr
    wrong = _cli(["jobs", "list", "--address", local_cluster.dashboard_url], env={**clean_env, "RAY_AUTH_TOKEN": "0" * 64}, timeout=60)
    assert wrong.returncode == 2 and "rejected the token" in wrong.stderr


@pytest.mark.long  # multi-minute end to end: `make test-long` (CI runs it after `make test`)
def test_submit_follow_then_serve_from_serve_config(local_cluster, clean_env, tmp_path):
    """The user's own project (its model code in its own folder, Parquet data, safetensors teacher) submitted as
    a job; the code folder is moved away once the job is submitted, so the job imports the user's module from
    what travelled with it (py_modules), and the winner's replicas from the code its artifact carries."""
    env = {**clean_env, "RAY_AUTH_TOKEN_PATH": local_cluster.token_file}
    code = tmp_path / "code"
    code.mkdir()
    shutil.copy(project.CODE_DIR / "user_models.py", code / "user_models.py")
    cfg_file = project.mlp_project(tmp_path / "proj", name="user-cluster", code_dir=code, epochs=4)
    out_dir = tmp_path / "out"
    sub = subprocess.Popen(
        [sys.executable, "-m", "slimray.cli", "submit", "--address", local_cluster.dashboard_url, "--follow", "run", "--config", str(cfg_file),
         "--out", str(out_dir)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    seen = []
    for line in sub.stdout:  # Ray's SDK logs the package uploads first
        seen.append(line)
        if "submitted raysubmit_" in line or len(seen) > 50:
            break
    assert "submitted raysubmit_" in seen[-1], "".join(seen) + sub.stdout.read()[-3000:]
    code.rename(tmp_path / "code-away")  # from now on only the job's copy of the code exists
    rest, _ = sub.communicate(timeout=900)
    assert sub.returncode == 0, rest[-4000:]
    assert "SUCCEEDED" in rest
    run_dir = out_dir / "user-cluster"
    for f in ("report.json", "report.md", "pareto.png", "winner/model.safetensors", "winner/spec.json", "teacher_outputs"):
        assert (run_dir / f).exists(), f

    listed = _cli(["jobs", "list", "--address", local_cluster.dashboard_url], env=env, timeout=60)
    assert listed.returncode == 0 and "SUCCEEDED" in listed.stdout

    # the winner carries the code the job packed (the job's copy: the user's folder was gone), none of the user's paths
    winner = json.loads((run_dir / "winner" / "spec.json").read_text())
    assert list(winner["model"]["code"]) == ["user_models/__init__.py"] and str(tmp_path) not in json.dumps(winner)
    # deploy the winner with the Serve config users hand to `serve deploy`: its replicas import that carried code
    serve_cfg = yaml.safe_load((REPO / "serve" / "digits.yaml").read_text())
    port = _free_port()
    serve_cfg["http_options"]["port"] = port
    serve_cfg["applications"][0]["args"]["model_dir"] = str(run_dir / "winner")
    deploy_file = tmp_path / "serve.yaml"
    deploy_file.write_text(yaml.safe_dump(serve_cfg))
    serve_bin = os.path.join(os.path.dirname(sys.executable), "serve")
    dep = subprocess.run(
        [serve_bin, "deploy", str(deploy_file), "--address", local_cluster.dashboard_url],
        env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=120,
    )
    assert dep.returncode == 0, dep.stdout + dep.stderr
    from slimray.families.classifier.sample import read_test_sample

    x = read_test_sample(run_dir)[0][:4].tolist()
    deadline = time.monotonic() + 120
    while True:
        try:
            r = httpx.post(f"http://127.0.0.1:{port}/v1/predict", json={"inputs": x}, timeout=10)
            if r.status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the deployed app never answered"
        time.sleep(1)
    assert len(r.json()["predictions"]) == 4
