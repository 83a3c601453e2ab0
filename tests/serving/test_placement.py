"""Replicas across GPU nodes, on a multi-node ``ray.cluster_utils.Cluster`` with fake GPUs.

Why a subprocess: the session's local Ray (``ray_session``) is one Ray per process, shared by every other test
and shut down only at session end. A Cluster needs its own ``ray.init(address=...)``, so running it here would
mean shutting the session's Ray down and every later module would find it gone. The check therefore runs in a
fresh interpreter (``placement_check.py``) that builds the cluster, deploys, prints JSON and tears the cluster
down; this process's Ray is never touched, whatever order the tests run in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.long]  # a 4-node Cluster in a subprocess: about a minute

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def placement(digits, trained_digits_cnn, tmp_path_factory):
    # a classifier artifact to serve: the small trained CNN saved as one (placement needs no pipeline run)
    from slimray.families.classifier.artifacts import ArtifactSpec, save_artifact

    from ..conftest import DIGITS_CNN

    winner = tmp_path_factory.mktemp("placement") / "winner"
    save_artifact(winner, trained_digits_cnn, ArtifactSpec(name="winner", model=DIGITS_CNN, input=digits.input))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, str(HERE / "placement_check.py"), str(winner)],
        capture_output=True, text=True, timeout=420, env=env, cwd=HERE.parents[1],
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PLACEMENT ")]
    assert proc.returncode == 0 and lines, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(lines[-1][len("PLACEMENT ") :])


@pytest.mark.parametrize("case", ["whole-gpu", "half-gpu-one-per-node"])
def test_one_replica_per_gpu_node(placement, case):
    gpu_nodes = set(placement["gpu_node_ids"])
    assert len(gpu_nodes) == 3 and len(placement["nodes"]) == 4
    dep = placement["deployments"][case]
    nodes = list(dep["replicas"].values())
    assert len(dep["replicas"]) == 3, dep
    assert len(set(nodes)) == 3, f"replicas share a node: {dep}"
    assert set(nodes) == gpu_nodes, "a replica landed on the CPU-only head"
    assert dep["devices"] == ["cpu"]  # fake GPUs: torch sees no CUDA and the replica falls back to CPU
