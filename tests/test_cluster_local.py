"""``slimray cluster down`` signals only the processes ``cluster up`` started (``slimray.cluster_local``).

No Ray: ``sleep`` processes in their own sessions stand in for the ``ray start --block`` process groups, and a
state.json is written the way ``up`` writes it.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import asdict

from slimray import cluster_local
from slimray.cluster_local import LocalCluster, record


def _start(seconds: str = "120") -> subprocess.Popen:
    return subprocess.Popen(["sleep", seconds], start_new_session=True)


def _write_state(tmp_path, procs: list[dict]) -> None:
    state = LocalCluster(state_dir=str(tmp_path), gcs_address="127.0.0.1:1", dashboard_url="http://127.0.0.1:2",
                         token_file=str(tmp_path / "auth_token"), pids=[r["pid"] for r in procs], num_workers=len(procs) - 1,
                         procs=procs)
    (tmp_path / "state.json").write_text(json.dumps(asdict(state)))


def test_down_leaves_alone_a_process_that_reuses_a_recorded_pid(tmp_path):
    ours, stranger = _start(), _start()
    try:
        reused_start = record(stranger.pid, ["sleep", "120"])
        reused_start["start_ticks"] -= 5  # the recorded process started earlier: this pid is someone else's now
        reused_args = record(stranger.pid, ["ray", "start", "--head", "--block"])  # same start time, other program
        for stale in (reused_start, reused_args):
            _write_state(tmp_path, [record(ours.pid, ["sleep", "120"]), stale] if stale is reused_start else [stale])
            said: list[str] = []
            stopped = cluster_local.down(state_dir=tmp_path, report=said.append, timeout_s=10)
            assert stranger.poll() is None, "a process that reuses a recorded pid was signalled"
            assert said == [f"pid {stranger.pid}: now another process; left alone"]
            if stale is reused_start:
                assert stopped == [ours.pid]
                assert ours.wait(timeout=10) is not None  # the verified one was stopped
            else:
                assert stopped == []
            assert not (tmp_path / "state.json").exists()
    finally:
        for p in (ours, stranger):
            p.kill()
            p.wait()


def test_down_reports_gone_pids_and_unverifiable_old_state(tmp_path):
    gone = _start("0")
    gone.wait()
    alive = _start()
    try:
        _write_state(tmp_path, [record(alive.pid, ["sleep", "120"])])
        state = json.loads((tmp_path / "state.json").read_text())
        state["pids"] = [gone.pid, alive.pid]
        state["procs"] = []  # a state.json from before start times were recorded
        (tmp_path / "state.json").write_text(json.dumps(state))
        said: list[str] = []
        assert cluster_local.down(state_dir=tmp_path, report=said.append) == []
        time.sleep(0.2)
        assert alive.poll() is None
        assert said == [f"pid {gone.pid}: already gone", f"pid {alive.pid}: no start time recorded (state.json from an older slimray); left alone"]
    finally:
        alive.kill()
        alive.wait()


def test_down_forgets_rays_record_of_the_cluster_it_stopped_and_only_that(tmp_path, monkeypatch):
    """Every ``ray start`` writes the cluster's address to Ray's ``ray_current_cluster`` (with the machine's address,
    not 127.0.0.1); left after ``down`` it sent Ray Train's State API lookups to the dead cluster (a 12 s wait at the
    end of every later Train run) and a plain ``ray.init()`` to it. ``down`` removes it when it names the stopped
    cluster's port; another cluster's record stays."""
    record_file = tmp_path / "ray_current_cluster"
    monkeypatch.setattr("slimray.raycompat.ray_address_file", lambda: record_file)
    state = LocalCluster(state_dir=str(tmp_path), gcs_address="127.0.0.1:36385", dashboard_url="http://127.0.0.1:2",
                         token_file=str(tmp_path / "t"), pids=[], num_workers=0, procs=[])
    record_file.write_text("192.0.2.2:36385")
    (tmp_path / "state.json").write_text(json.dumps(asdict(state)))
    cluster_local.down(state_dir=tmp_path, report=lambda msg: None)
    assert not record_file.exists() and not (tmp_path / "state.json").exists()
    record_file.write_text("10.0.0.5:6379")  # someone else's cluster
    assert not cluster_local.forget_ray_address("127.0.0.1:36385") and record_file.read_text() == "10.0.0.5:6379"
    record_file.unlink()
    assert not cluster_local.forget_ray_address("127.0.0.1:36385")  # nothing recorded: nothing to do


def test_down_signals_the_leader_then_kills_what_is_left_of_its_group(tmp_path):
    """SIGTERM goes to the recorded leader alone (``ray start --block`` stops its node in order: 4 s, where a SIGTERM
    to the whole group took 31 s); a member that outlives it, or a leader ignoring SIGTERM, gets SIGKILL with its
    group once ``timeout_s`` is over."""
    import sys

    code = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN if sys.argv[1] == 'deaf' "
            "else signal.SIG_DFL); subprocess.Popen(['sleep', '120']); time.sleep(120)")
    for mode in ("deaf", "plain"):
        args = [sys.executable, "-c", code, mode]
        leader = subprocess.Popen(args, start_new_session=True)
        time.sleep(1.0)  # its child is started
        _write_state(tmp_path, [record(leader.pid, args)])
        t0 = time.monotonic()
        assert cluster_local.down(state_dir=tmp_path, report=lambda msg: None, timeout_s=2) == [leader.pid]
        assert leader.wait(timeout=10) is not None and not cluster_local._alive(leader.pid, group=True), mode
        assert time.monotonic() - t0 < 10
