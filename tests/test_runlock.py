"""The run lock (``slimray.runlock``): one process per run folder, stale locks taken over, ``--fresh`` refused
while another process holds the run. No Ray: a sleeping python subprocess plays the other ``slimray run``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from slimray.runlock import LOCK_NAME, RunLock, RunLockedError, proc_start_time, read_holder
from slimray.runs import prepare_run_dir


class _Cfg(BaseModel):
    name: str = "r1"
    lr: float = 0.1


def _holder_process(run_dir: Path) -> subprocess.Popen:
    code = (
        "import sys, time; from slimray.runlock import RunLock; RunLock(sys.argv[1]).acquire(); "
        "print('locked', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.fixture
def other_run(tmp_path):
    run_dir = tmp_path / "runs" / "r1"
    proc = _holder_process(run_dir)
    yield run_dir, proc
    proc.kill()
    proc.wait()


def test_second_run_with_same_name_is_refused_naming_the_holder(other_run):
    run_dir, proc = other_run
    with pytest.raises(RunLockedError, match=rf"in use by another slimray process \(pid {proc.pid} on "):
        prepare_run_dir(_Cfg(), run_dir.parent)
    assert read_holder(run_dir).pid == proc.pid  # the holder's lock is untouched


def test_fresh_is_refused_while_the_lock_is_held(other_run):
    run_dir, proc = other_run
    (run_dir / "student").mkdir()
    (run_dir / "student" / "model.safetensors").write_bytes(b"x")
    with pytest.raises(RunLockedError, match=str(proc.pid)):
        prepare_run_dir(_Cfg(), run_dir.parent, fresh=True)
    assert (run_dir / "student" / "model.safetensors").exists()


def test_cli_prints_one_line_naming_the_holder(other_run, capsys):
    from slimray.cli import main

    run_dir, proc = other_run
    rc = main(["run", "--recipe", "digits", "--name", "r1", "--out", str(run_dir.parent), "--no-serve"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"pid {proc.pid}" in err and len(err.strip().splitlines()) == 1


def test_lock_of_a_dead_process_is_taken_over_with_a_message(tmp_path):
    run_dir = tmp_path / "r1"
    proc = _holder_process(run_dir)
    proc.kill()
    proc.wait()
    assert read_holder(run_dir).pid == proc.pid  # killed: its lock stayed behind
    said = []
    lock = RunLock(run_dir).acquire(log=said.append)
    assert lock.held and read_holder(run_dir).pid == os.getpid()
    assert len(said) == 1 and f"pid {proc.pid}" in said[0] and "gone" in said[0]
    lock.release()
    assert not (run_dir / LOCK_NAME).exists()


def test_lock_whose_pid_was_reused_is_taken_over(other_run):
    run_dir, proc = other_run
    # the recorded pid is alive, but it is a process that started at another time than the holder did
    data = json.loads((run_dir / LOCK_NAME).read_text())
    assert data["start_ticks"] == proc_start_time(proc.pid)
    data["start_ticks"] -= 1
    (run_dir / LOCK_NAME).write_text(json.dumps(data))
    said = []
    RunLock(run_dir).acquire(log=said.append).release()
    assert len(said) == 1 and "gone" in said[0]


def test_lock_is_released_when_the_holder_exits_on_an_error_or_sigterm(tmp_path):
    run_dir = tmp_path / "r1"
    code = "import sys; from slimray.runlock import RunLock; RunLock(sys.argv[1]).acquire(); raise SystemExit('boom')"
    subprocess.run([sys.executable, "-c", code, str(run_dir)], capture_output=True, check=False)
    assert not (run_dir / LOCK_NAME).exists()
    code = (
        "import sys, time; from slimray.console import install_signal_handlers; from slimray.runlock import RunLock; "
        "install_signal_handlers(); RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    proc.terminate()
    proc.wait(timeout=20)
    assert not (run_dir / LOCK_NAME).exists()


def test_same_process_may_prepare_its_run_again(tmp_path):
    a = prepare_run_dir(_Cfg(), tmp_path)
    b = prepare_run_dir(_Cfg(), tmp_path, fresh=True)
    assert a == b and read_holder(a).pid == os.getpid() and (a / "config.json").exists()
