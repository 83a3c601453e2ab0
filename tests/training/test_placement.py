"""``placement_strategy`` reaches Ray Train: on a 2-node ``ray.cluster_utils.Cluster`` (2 CPUs a node, so both
workers would fit on one), SPREAD and STRICT_SPREAD put the 2 workers on different nodes and PACK on the same one.

Why a subprocess: the session's local Ray (``ray_session``) is one Ray per process, shared by the other tests;
a Cluster needs its own ``ray.init(address=...)``. ``placement_check.py`` builds the cluster in a fresh
interpreter, trains, prints JSON and tears it down (see tests/serving/test_placement.py for the same pattern).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slimray.training.distill import ClusterTooSmallError, check_placement

pytestmark = [pytest.mark.slow, pytest.mark.long]

HERE = Path(__file__).resolve().parent
STRATEGIES = ["SPREAD", "STRICT_SPREAD", "PACK"]


@pytest.fixture(scope="module")
def placement(tmp_path_factory):
    out = tmp_path_factory.mktemp("placement")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, str(HERE / "placement_check.py"), str(out), *STRATEGIES],
        capture_output=True, text=True, timeout=420, env=env, cwd=HERE.parents[1],
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PLACEMENT ")]
    assert proc.returncode == 0 and lines, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(lines[-1][len("PLACEMENT ") :])


@pytest.mark.parametrize("strategy", ["SPREAD", "STRICT_SPREAD"])
def test_spread_puts_the_two_workers_on_different_nodes(placement, strategy):
    nodes = placement["runs"][strategy]
    assert len(nodes) == 2 and set(nodes) <= set(placement["nodes"])
    assert nodes[0] != nodes[1], f"{strategy}: both workers ran on {nodes[0]}"


def test_pack_keeps_them_on_one_node(placement):
    nodes = placement["runs"]["PACK"]
    assert len(nodes) == 2 and nodes[0] == nodes[1] and nodes[0] in placement["nodes"]


def test_strict_placement_that_cannot_fit_fails_fast(ray_session):
    nodes = len([n for n in ray_session.nodes() if n["Alive"]])
    with pytest.raises(ClusterTooSmallError, match="STRICT_SPREAD puts each of"):
        check_placement(num_workers=nodes + 1, strategy="STRICT_SPREAD", use_gpu=False, what="student")
    cpus = max(n["Resources"].get("CPU", 0) for n in ray_session.nodes() if n["Alive"])
    with pytest.raises(ClusterTooSmallError, match="STRICT_PACK puts all"):
        check_placement(num_workers=int(cpus) + 1, strategy="STRICT_PACK", use_gpu=False, what="student")
