"""A real multi-node Ray cluster on 127.0.0.1, for trying multi-node behaviour on one machine.

``slimray cluster up --local`` starts a head (``ray start --head --block``) and N worker raylets, each a
separate process group on loopback, with token authentication on (a fresh token in the state folder)
and the dashboard bound to 127.0.0.1. The PIDs go to ``state.json`` with each process's start time (from
``/proc/<pid>/stat``) and the arguments it was started with; ``slimray cluster down`` signals a process group
only while its leader is still that process (same start time, same arguments), so a PID reused by another
program after a crash or reboot is reported as stale and left alone. Never a global ``ray stop``.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from slimray.runlock import proc_cmdline, proc_start_time

DEFAULT_STATE_DIR = Path.home() / ".slimray" / "local-cluster"


@dataclass
class LocalCluster:
    state_dir: str
    gcs_address: str
    dashboard_url: str
    token_file: str
    pids: list[int]
    num_workers: int
    procs: list[dict] = field(default_factory=list)  # per pid: {"pid", "start_ticks", "args"} recorded at `up`

    @property
    def token(self) -> str:
        return Path(self.token_file).read_text().strip()

    def env(self) -> dict[str, str]:
        """What a client process needs to talk to this cluster."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.token_file}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray")) if Path(sys.executable).with_name("ray").exists() else "ray"


def load_state(state_dir: Path = DEFAULT_STATE_DIR) -> LocalCluster | None:
    path = Path(state_dir) / "state.json"
    if not path.exists():
        return None
    return LocalCluster(**json.loads(path.read_text()))


def _alive(pid: int, *, group: bool = False) -> bool:
    """Whether process ``pid`` exists (with ``group``: whether any process is left in process group ``pid``)."""
    try:
        (os.killpg if group else os.kill)(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _nodes_alive(dashboard: str, token: str) -> int:
    req = urllib.request.Request(f"{dashboard}/nodes?view=summary", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        data = json.loads(resp.read())
    summary = data.get("data", {}).get("summary", [])
    return sum(1 for n in summary if (n.get("raylet") or {}).get("state") == "ALIVE")


def up(
    *,
    num_workers: int = 1,
    cpus_per_node: float = 1,
    gpus_per_worker: float = 0,
    head_cpus: float | None = None,
    state_dir: Path = DEFAULT_STATE_DIR,
    timeout_s: float = 90,
) -> LocalCluster:
    """Start the head and ``num_workers`` worker raylets; returns once all nodes are alive."""
    state_dir = Path(state_dir)
    existing = load_state(state_dir)
    if existing and any(is_ours(r) for r in existing.procs):
        raise RuntimeError(f"a local cluster is already running (state in {state_dir}); run `slimray cluster down` first")
    state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)
    token_file = state_dir / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    os.chmod(token_file, 0o600)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    # job entrypoints say `python`: make it this interpreter (the one with torch and ray) on every node
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("RAY_ADDRESS", None)
    port, dash_port = _free_port(), _free_port()
    common = ["--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]

    def node_ports() -> list[str]:
        # every raylet on one machine needs its own agent ports (the defaults, e.g. 52365, would clash)
        return [
            f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
            f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
        ]

    head_cmd = [
        _ray_bin(), "start", "--head", f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
        f"--num-cpus={head_cpus if head_cpus is not None else cpus_per_node:g}", "--num-gpus=0",
        f"--ray-client-server-port={_free_port()}", *common, *node_ports(),
    ]
    pids: list[int] = []
    cluster = LocalCluster(
        state_dir=str(state_dir), gcs_address=f"127.0.0.1:{port}", dashboard_url=f"http://127.0.0.1:{dash_port}",
        token_file=str(token_file), pids=pids, num_workers=num_workers,
    )

    def launch(cmd: list[str], name: str) -> None:
        log = open(state_dir / f"{name}.log", "ab")
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        pids.append(proc.pid)
        cluster.procs.append(record(proc.pid, cmd))
        (state_dir / "state.json").write_text(json.dumps(asdict(cluster), indent=2))

    launch(head_cmd, "head")
    deadline = time.monotonic() + timeout_s
    try:
        _wait(lambda: _nodes_alive(cluster.dashboard_url, cluster.token) >= 1, deadline, pids, state_dir, "the head")
        for i in range(num_workers):
            launch(
                [_ray_bin(), "start", f"--address={cluster.gcs_address}", f"--num-cpus={cpus_per_node:g}", f"--num-gpus={gpus_per_worker:g}", *common, *node_ports()],
                f"worker{i}",
            )
        _wait(lambda: _nodes_alive(cluster.dashboard_url, cluster.token) >= 1 + num_workers, deadline, pids, state_dir, f"{num_workers} worker(s)")
    except BaseException:
        down(state_dir=state_dir)
        raise
    return cluster


def _wait(check, deadline: float, pids: list[int], state_dir: Path, what: str) -> None:
    while True:
        try:
            if check():
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            pass
        dead = [p for p in pids if not _alive(p)]
        if dead:
            raise RuntimeError(f"a ray process exited while starting {what}; see the logs in {state_dir}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not come up in time; see the logs in {state_dir}")
        time.sleep(0.5)


def record(pid: int, cmd: list[str]) -> dict:
    """What identifies a process we started: its pid, its start time (clock ticks since boot; fixed at fork, so
    readable before the child has exec'd) and the arguments we gave it."""
    return {"pid": pid, "start_ticks": proc_start_time(pid), "args": list(cmd)}


def is_ours(rec: dict) -> bool:
    """True while ``rec['pid']`` is still the process ``up`` started: same start time, and its command line ends
    with the arguments we started it with (``ray`` runs as ``python .../ray start ...``)."""
    pid, ticks, args = rec.get("pid"), rec.get("start_ticks"), rec.get("args") or []
    if not isinstance(pid, int) or ticks is None or not args:
        return False
    if proc_start_time(pid) != ticks:
        return False
    cmdline = proc_cmdline(pid) or []
    tail = args[1:]
    return len(cmdline) >= len(tail) and cmdline[len(cmdline) - len(tail):] == tail


def _verified(state: LocalCluster, report) -> list[int]:
    """The recorded pids that are still ours; stale ones (gone, or reused by another process) are reported."""
    recs = {r.get("pid"): r for r in state.procs}
    ours = []
    for pid in state.pids:
        rec = recs.get(pid)
        if rec is not None and is_ours(rec):
            ours.append(pid)
        elif _alive(pid) and proc_start_time(pid) is not None:
            why = "no start time recorded (state.json from an older slimray)" if rec is None else "now another process"
            report(f"pid {pid}: {why}; left alone")
        else:
            report(f"pid {pid}: already gone")
    return ours


def down(*, state_dir: Path = DEFAULT_STATE_DIR, timeout_s: float = 10, report=None) -> list[int]:
    """Stop the process groups this module started (workers first, then the head); returns the PIDs it stopped.

    Each recorded pid is checked first (``is_ours``): one that is gone or belongs to another process now is
    reported through ``report`` (default: stderr) and never signalled. SIGTERM goes to each ``ray start --block``
    alone, which stops its node's processes in order (4 s for a head and a worker here; a SIGTERM to every process
    of the group at once kept the raylet and the GCS server alive for 30 s); whatever of a group is
    left after ``timeout_s`` gets SIGKILL (a head with a live detached actor did not start stopping in 20 s: its
    orderly stop has a 30 s timeout of its own, which a throwaway local cluster need not wait for)."""
    report = report or (lambda msg: print(f"slimray cluster down: {msg}", file=sys.stderr))
    state = load_state(state_dir)
    if state is None:
        return []
    ours = _verified(state, report)
    for pid in reversed(ours):
        try:
            os.kill(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass

    def left() -> list[int]:
        for p in ours:  # reap our own children
            try:
                os.waitpid(p, os.WNOHANG)
            except ChildProcessError:
                pass
        return [p for p in ours if _alive(p, group=True)]  # the leader, while alive, is in its group

    deadline = time.monotonic() + timeout_s
    while left() and time.monotonic() < deadline:
        time.sleep(0.3)
    for pid in left():
        # the leader still ours, or gone with members left: a group id is not reused while it has members
        if any(is_ours(r) for r in state.procs if r.get("pid") == pid) or not _alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    deadline = time.monotonic() + 5
    while left() and time.monotonic() < deadline:
        time.sleep(0.3)
    forget_ray_address(state.gcs_address)
    (Path(state_dir) / "state.json").unlink(missing_ok=True)
    return ours


def forget_ray_address(gcs_address: str) -> bool:
    """Remove Ray's record of the last cluster started on this machine (``ray_current_cluster`` in Ray's temp folder,
    written by every ``ray start``) when it names the cluster just stopped (same GCS port; Ray writes the machine's
    address there, not 127.0.0.1). Left behind, it sends a later plain ``ray.init()`` to the dead cluster, and Ray
    Train's controller, whose State API lookups resolve it, waits out a 12 s timeout at the end of every run. A record
    of another cluster is left alone. True when it was removed."""
    from slimray.raycompat import ray_address_file

    address_file = ray_address_file()
    try:
        recorded = address_file.read_text().strip()
    except OSError:
        return False
    if recorded.rpartition(":")[2] != gcs_address.rpartition(":")[2]:
        return False
    address_file.unlink(missing_ok=True)
    return True
