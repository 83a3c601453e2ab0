"""Submitting slimray commands to a Ray cluster as Ray Jobs, and following them.

The installed ``slimray`` package travels with the job as a ``py_modules`` entry (so the cluster needs
torch and ray, not slimray, and no registry access); a ``--config`` file is validated here and travels
as JSON in the job's environment; the entrypoint is ``python -m slimray.cli ...``. Outputs go to ``--out`` on the
cluster (default ``/tmp/slimray/runs``: the job's own working folder is deleted after the job).
"""

from __future__ import annotations

import asyncio
import atexit
import shlex
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import slimray
from slimray.auth import auth_headers, explain_refusal, read_token
from slimray.config import load_config

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
DEFAULT_CLUSTER_OUT = "/tmp/slimray/runs"
CONFIG_ENV = "SLIMRAY_CONFIG_JSON"
SUBMITTABLE = ("run", "distill", "sweep")


def connect(address: str | None, *, token_files: tuple[Path, ...] = ()):
    """A JobSubmissionClient with the token attached; auth refusals become ``AuthError``."""
    from ray.job_submission import JobSubmissionClient

    address = address or DEFAULT_DASHBOARD
    token = read_token(extra_files=token_files)
    try:
        return JobSubmissionClient(address, headers=auth_headers(token))
    except Exception as err:  # noqa: BLE001 - the SDK raises bare RuntimeError/ConnectionError
        explained = explain_refusal(err, address=address, token=token)
        if explained is not None:
            raise explained from None
        raise ConnectionError(f"cannot reach the Ray dashboard at {address}: {err}") from None


SPACE_ENV = "SLIMRAY_SPACE_JSON"


def user_code_modules(factory: str, code_dir: str | None) -> list[Path]:
    """What of the user's code folder travels with a job: the factory's top-level package (a folder) or
    module (a ``.py`` file), as ``py_modules`` entries. Without ``code_dir`` the code must be installed there."""
    if code_dir is None:
        return []
    top = factory.split(":", 1)[0].split(".", 1)[0]
    root = Path(code_dir)
    if (root / top).is_dir():
        return [(root / top).resolve()]
    if (root / f"{top}.py").is_file():
        # the Jobs SDK uploads folders only: a module file travels as a package of the same name (its code
        # in __init__.py), which imports the same way; the folder is removed when this process exits
        tmp = Path(tempfile.mkdtemp(prefix="slimray-code-"))
        atexit.register(shutil.rmtree, tmp, True)
        (tmp / top).mkdir()
        shutil.copyfile(root / f"{top}.py", tmp / top / "__init__.py")
        return [tmp / top]
    raise ValueError(f"teacher.code_dir {code_dir}: neither {top}/ nor {top}.py is there (the factory {factory!r} imports {top!r})")


def build_submission(args: list[str]) -> dict[str, Any]:
    """The ``submit_job`` keyword arguments for ``slimray <args>`` (args[0] is the command)."""
    if not args or args[0] not in SUBMITTABLE:
        raise ValueError(f"slimray submit takes one of {', '.join(SUBMITTABLE)}, got {args[:1]}")
    args = list(args)
    from slimray.runtime import FAIL_FAST_ENV

    runtime_env: dict[str, Any] = {"py_modules": [str(Path(slimray.__file__).parent)], "env_vars": dict(FAIL_FAST_ENV)}
    if "--config" in args:
        # The config travels inside the job's environment, validated here first (a bad file fails on the
        # laptop, not on the cluster); search-space files are already expanded into it.
        i = args.index("--config")
        if i + 1 >= len(args):
            raise ValueError("--config needs a file")
        cfg = load_config(config=args[i + 1])  # relative data/weights/code paths made absolute
        cfg = cfg.model_copy(update={"search": cfg.search.model_copy(update={"space_file": None})})
        paths = [cfg.teacher.factory] if cfg.teacher.source == "module" else []
        paths += [cfg.eval.metric] if cfg.eval.metric != "accuracy" else []
        # the factory's (and the metric's) package travels with the job; where code_dir does not exist (another
        # machine) the import finds it there instead
        for path in dict.fromkeys(p.split(":", 1)[0].split(".", 1)[0] for p in paths):
            runtime_env["py_modules"] += [str(m) for m in user_code_modules(f"{path}:x", cfg.teacher.code_dir)]
        runtime_env["env_vars"][CONFIG_ENV] = cfg.model_dump_json()
        args[i : i + 2] = ["--config-env", CONFIG_ENV]
    if "--space" in args:
        # likewise the sweep space file: validated here, shipped as JSON
        from slimray.sweep.space import load_space_file

        i = args.index("--space")
        if i + 1 >= len(args):
            raise ValueError("--space needs a file")
        runtime_env["env_vars"][SPACE_ENV] = load_space_file(args[i + 1]).model_dump_json(exclude_none=True)
        args[i : i + 2] = ["--space-env", SPACE_ENV]
    if args[0] == "run" and "--no-serve" not in args:
        args.append("--no-serve")  # a job ends; serve the result with `serve deploy` or `slimray serve`
    if "--out" not in args:
        args += ["--out", DEFAULT_CLUSTER_OUT]
    entrypoint = "python -m slimray.cli " + " ".join(shlex.quote(a) for a in args)
    return {
        "entrypoint": entrypoint,
        "runtime_env": runtime_env,
        "entrypoint_num_cpus": 0,
        "metadata": {"slimray_version": slimray.__version__, "command": args[0]},
    }


def submit(client, args: list[str], *, agent_wait_s: float = 60.0) -> str:
    """Submit; a head whose job agent is still starting ("No available agent") is retried for a while."""
    submission = build_submission(args)
    deadline = time.monotonic() + agent_wait_s
    while True:
        try:
            return client.submit_job(**submission)
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def follow(client, job_id: str, *, poll_s: float = 1.0) -> str:
    """Stream the job's logs to stdout until it ends; returns its final status name."""

    async def _tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            print(chunk, end="", flush=True)

    try:
        asyncio.run(_tail())
    except Exception as err:  # noqa: BLE001 - log streaming is best effort; status below is authoritative
        print(f"[slimray] log stream ended early ({type(err).__name__}); waiting for the job to finish", flush=True)
    while True:
        status = client.get_job_status(job_id)
        if status.is_terminal():
            return str(status.value)
        time.sleep(poll_s)
