"""Each shim of ``slimray.raycompat`` against the installed Ray, and what a changed Ray gives: a warning for another
version, ``RayCompatError`` naming the shim and both versions when an internal a shim uses is gone. Serve's details
are exercised on a live Serve in ``tests/serving/test_app.py`` (``test_api_key_never_reaches_ray``)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import ray

from slimray import raycompat
from slimray.raycompat import CHECKED_RAY_VERSION, RayVersionWarning


def test_the_shims_were_read_from_the_installed_ray():
    assert ray.__version__ == CHECKED_RAY_VERSION, "check every shim of slimray/raycompat.py against this Ray"


def test_token_auth_shims_read_and_refresh_rays_cached_config():
    """Ray caches RAY_AUTH_MODE when it first reads its config: ``reload_ray_config`` makes it see a change
    (what ``slimray.runtime`` relies on to start the embedded Ray with token auth). In a fresh process."""
    code = textwrap.dedent("""
        import json, os
        os.environ.pop("RAY_AUTH_MODE", None)
        from slimray.raycompat import reload_ray_config, session_dir, token_auth_enabled
        reload_ray_config()
        off = token_auth_enabled()
        os.environ["RAY_AUTH_MODE"] = "token"
        cached = token_auth_enabled()
        reload_ray_config()
        print(json.dumps({"off": off, "cached": cached, "on": token_auth_enabled(), "session": session_dir()}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"off": False, "cached": False, "on": True, "session": None}


def test_session_dir_is_the_running_rays(ray_session):
    path = Path(raycompat.session_dir())
    assert path.is_dir() and (path / "logs").is_dir()
    assert path.name.startswith("session_")


def test_ray_address_file_is_where_ray_start_records_its_cluster():
    from ray._common.utils import get_ray_address_file

    path = raycompat.ray_address_file()
    assert path.name == "ray_current_cluster" and str(path) == get_ray_address_file(None)


def test_train_report_loggers_name_the_logger_ray_train_uses():
    names = raycompat.train_report_loggers()
    from ray.train.v2._internal.execution import context  # the private module, read here only to check the shim

    assert names == ["ray.train", context.logger.name]
    assert isinstance(logging.getLogger(names[1]), logging.Logger)


def test_another_ray_version_warns_once(monkeypatch):
    monkeypatch.setattr(ray, "__version__", "9.9.9")
    monkeypatch.setattr(raycompat, "_warned", set())
    with pytest.warns(RayVersionWarning, match=r"checked against ray 2\.60\.0; ray 9\.9\.9 is installed"):
        raycompat.train_report_loggers()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert raycompat.train_report_loggers()[0] == "ray.train"  # still works, no second warning


def test_a_missing_internal_names_the_shim_and_both_versions(tmp_path):
    """Internals removed as a newer Ray might, in a fresh process (the running test session's Ray is left alone)."""
    code = textwrap.dedent(f"""
        import json, sys, warnings
        import ray
        from ray._private import worker
        from ray.serve import context
        from slimray import console, raycompat
        ray.__version__ = "9.9.9"
        del worker._global_node, context._get_global_client
        raycompat._TRAIN_CONTEXT_MODULE = "ray.train.v2._internal.execution.gone"
        out = {{}}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for shim in ("session_dir", "serve_details", "train_report_loggers"):
                try:
                    getattr(raycompat, shim)()
                except raycompat.RayCompatError as err:
                    out[shim] = str(err)
            out["link"] = str(console.link_ray_logs({str(tmp_path)!r}))
        out["warnings"] = [f"{{w.category.__name__}}: {{w.message}}" for w in caught]
        print(json.dumps(out))
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["session_dir"].startswith("slimray.raycompat.session_dir: ray._private.worker._global_node")
    assert out["serve_details"].startswith("slimray.raycompat.serve_details: ray.serve.context._get_global_client()")
    assert out["train_report_loggers"].endswith("no such module. Install ray==2.60.0 or update slimray/raycompat.py")
    for shim in ("session_dir", "serve_details", "train_report_loggers"):
        assert "ray 2.60.0 had (installed: ray 9.9.9)" in out[shim], out[shim]
    # the log link is a convenience: a run goes on without it, with the shim's message as a warning
    assert out["link"] == "None" and not (tmp_path / "logs").exists()
    assert out["warnings"][0] == ("RayVersionWarning: slimray uses Ray internals (slimray/raycompat.py) checked against "
                                  "ray 2.60.0; ray 9.9.9 is installed")
    assert any(w.startswith("UserWarning: slimray.raycompat.session_dir:") for w in out["warnings"])
