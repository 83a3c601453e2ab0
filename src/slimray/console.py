"""What a person sees on the console, and how a run ends when it is told to stop.

* ``--verbose`` (``SLIMRAY_VERBOSE=1``) brings back Ray's worker output and Tune's tables; without it the
  console shows one line per stage and per trial plus the final results table, and Ray's logs stay in its
  session folder (``RUN/logs/ray-session`` points there).
* SIGINT and SIGTERM end a run cleanly: inside a Tune sweep they ask Tune to stop (it saves the experiment
  state, so finished trials are kept), elsewhere they raise ``Interrupted``. The CLI then shuts Ray down,
  removes the half-written temporary folders of the run, releases the run lock and prints the exact command
  that resumes (``interrupted``).

No ray import at module level.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

VERBOSE_ENV = "SLIMRAY_VERBOSE"


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM reached the driver; ``signame`` says which."""

    def __init__(self, signame: str = "SIGINT"):
        super().__init__(signame)
        self.signame = signame


_state = {"signal": None, "in_tune": False}


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def set_verbose(on: bool) -> None:
    """Set before Ray starts: worker processes inherit it."""
    os.environ[VERBOSE_ENV] = "1" if on else "0"


def quiet_ray_data() -> None:
    """Unless verbose: Ray Data's INFO lines and progress bars stay out of the console (its log file in the Ray
    session folder, ``RUN/logs/ray-session``, keeps them). Call after ``import ray.data``."""
    if verbose():
        return
    import logging

    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)


def received_signal() -> str | None:
    """The name of the stop signal received so far (SIGINT / SIGTERM), or None."""
    return _state["signal"]


def _handler(signum, frame) -> None:
    name = signal.Signals(signum).name
    first = _state["signal"] is None
    _state["signal"] = _state["signal"] or name
    if first and _state["in_tune"] and hasattr(signal, "SIGUSR1"):
        # Tune's own graceful stop (it listens on SIGUSR1): the experiment state is saved, trials end
        os.kill(os.getpid(), signal.SIGUSR1)
        return
    raise Interrupted(name)


def install_signal_handlers() -> None:
    """SIGINT and SIGTERM -> a clean stop (see the module docstring). Main thread only; call after ``ray.init``
    too (it installs its own SIGTERM handler)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # Tune must not replace ours
    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)


@contextmanager
def tune_running():
    """Marks a Tune experiment in flight: a stop signal then asks Tune to stop instead of raising at once.
    Raises ``Interrupted`` after Tune returns if a signal stopped it."""
    _state["in_tune"] = True
    try:
        yield
    finally:
        _state["in_tune"] = False
    if _state["signal"] is not None:
        raise Interrupted(_state["signal"])


def resume_command(argv: list[str]) -> str:
    """The command that continues this run: the same one, without ``--fresh`` (``sweep`` gets ``--resume``)."""
    args = [a for a in argv if a != "--fresh"]
    if args and args[0] == "sweep" and "--resume" not in args:
        args.append("--resume")
    return shlex.join(["slimray", *args])


TEMP_MARKERS = (".tmp.", ".old.", ".stale.")


def _is_temp(entry: Path) -> bool:
    """What the atomic writers leave when killed: ``.NAME.XXXXXXXX`` folders (``_atomic_dir_write``), ``.NAME.old.PID``
    and ``.NAME.tmp[.PID]`` files. Lock files (``.lock``, ``.prune0.50.lock``) are not temporary."""
    name = entry.name
    if not name.startswith(".") or name == ".lock" or name.endswith(".lock"):
        return False
    if any(m in name for m in TEMP_MARKERS) or name.endswith(".tmp"):
        return True
    return entry.is_dir() and name.count(".") >= 2  # mkdtemp(prefix=".NAME.")


def find_temp_files(run_dir: str | Path) -> list[Path]:
    """The temporary files and folders the atomic writers left in ``run_dir`` (Ray's own ``ray/`` folder aside)."""
    run_dir = Path(run_dir)
    found: list[Path] = []
    stack = [run_dir] if run_dir.is_dir() else []
    while stack:
        folder = stack.pop()
        for entry in folder.iterdir():
            if _is_temp(entry):
                found.append(entry)
            elif entry.is_dir() and not entry.is_symlink() and not (folder == run_dir and entry.name in ("ray", "logs")):
                stack.append(entry)  # trials/, pruned/, cache/, distill_trials/<id>/ ...; Ray's own folder is Ray's
    return sorted(found)


def remove_temp_files(run_dir: str | Path) -> list[Path]:
    """Remove what ``find_temp_files`` finds; returns it. Only while no writer runs (run lock held, Ray shut down)."""
    found = find_temp_files(run_dir)
    for entry in found:
        shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() and not entry.is_symlink() else entry.unlink(missing_ok=True)
    return found


def interrupted(argv: list[str], signame: str | None = None) -> int:
    """After a stop signal: end Ray work, remove temporary folders, release the run lock, print how to resume.
    Returns the exit status (128 + signal number)."""
    from slimray import runlock

    signame = signame or received_signal() or "SIGINT"
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # noqa: BLE001 - a half-started Ray must not hide the resume hint
        pass
    for run_dir in runlock.held_run_dirs():
        removed = remove_temp_files(run_dir)
        if removed:
            print(f"removed {len(removed)} temporary file(s)/folder(s) in {run_dir}", file=sys.stderr)
    runlock.release_all()
    print(f"\ninterrupted ({signame}); finished stages and trials are kept. Resume with:\n  {resume_command(argv)}",
          file=sys.stderr, flush=True)
    return 128 + int(getattr(signal, signame, signal.SIGINT))


def divert_logger(name: str, log_file: str | Path) -> None:
    """Send logger ``name`` (e.g. ``ray.tune``) to ``log_file`` instead of the console (once per file)."""
    import logging

    log_file = Path(log_file)
    logger = logging.getLogger(name)
    if any(getattr(h, "baseFilename", None) == str(log_file.resolve()) for h in logger.handlers):
        return
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s -- %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False


def link_ray_logs(run_dir: str | Path) -> Path | None:
    """``RUN/logs/ray-session`` -> the embedded Ray's session folder (worker logs, Tune and Train output). None when
    there is none here (a Ray Client connection: the logs are on the cluster) or Ray's internals changed (warned)."""
    import warnings

    from slimray.raycompat import RayCompatError, session_dir

    try:
        session = session_dir()
    except RayCompatError as err:  # the link is a convenience: say why it is missing, keep the run going
        warnings.warn(str(err), stacklevel=2)
        return None
    if session is None:
        return None
    logs = Path(run_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    link = logs / "ray-session"
    try:
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(session, target_is_directory=True)
    except OSError:
        return None
    return link
