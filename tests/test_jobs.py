"""What `slimray submit` sends: the package as py_modules, the config validated and carried as JSON."""

from __future__ import annotations

import shlex

import pytest
import yaml

from slimray.auth import explain_refusal, read_token
from slimray.cli import _parser
from slimray.config import PipelineConfig, load_config
from slimray.jobs import CONFIG_ENV, SPACE_ENV, build_submission
from slimray.sweep.space import SweepSpaceFile, load_space_file
from slimray.schema import ConfigError

from .conftest import REPO


def test_run_submission_ships_package_and_config(tmp_path):
    cfg = load_config(recipe="digits").model_dump(mode="json")
    cfg["search"] = {"space_file": str(REPO / "tune" / "digits-grid.yaml")}
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(cfg))
    sub = build_submission(["run", "--config", str(f)])
    argv = shlex.split(sub["entrypoint"])
    assert argv[:3] == ["python", "-m", "slimray.cli"]
    args = _parser().parse_args(argv[3:])
    assert args.command == "run" and args.no_serve and args.config_env == CONFIG_ENV and str(args.out) == "/tmp/slimray/runs"
    env = sub["runtime_env"]["env_vars"]
    shipped = PipelineConfig.from_json(env[CONFIG_ENV])
    assert shipped.search.space_file is None and shipped.search.space.importance == "l2"  # the space file travelled expanded
    assert sub["runtime_env"]["py_modules"][0].endswith("slimray") and sub["entrypoint_num_cpus"] == 0
    assert "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S" in env


def test_bad_config_fails_before_submission(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump({**load_config(recipe="digits").model_dump(mode="json"), "nmae": "x"}))
    with pytest.raises(ConfigError, match="nmae: unknown field"):
        build_submission(["sweep", "--config", str(f)])


@pytest.mark.parametrize("args", [[], ["serve", "runs/x"], ["cluster", "up"]])
def test_only_pipeline_commands_are_submitted(args):
    with pytest.raises(ValueError, match="run, distill, sweep"):
        build_submission(args)


def test_distill_and_sweep_entrypoints_parse():
    for cmd in (["distill", "--recipe", "digits", "--num-workers", "2"], ["sweep", "--recipe", "mnist", "--resume"]):
        argv = shlex.split(build_submission(cmd)["entrypoint"])
        assert _parser().parse_args(argv[3:]).command == cmd[0]


def test_token_sources_and_refusal_messages(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert read_token() is None
    (tmp_path / "t").write_text("abc\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "t"))
    assert read_token() == "abc"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    assert read_token() == "env-token"
    assert "none was sent" in str(explain_refusal(RuntimeError("status code 401"), address="http://h", token=None))
    assert "rejected the token" in str(explain_refusal(RuntimeError("status code 403"), address="http://h", token="x"))
    assert explain_refusal(RuntimeError("status code 500"), address="http://h", token="x") is None


def test_job_specs_in_jobs_folder_are_submittable():
    import inspect

    from ray.job_submission import JobSubmissionClient

    allowed = set(inspect.signature(JobSubmissionClient.submit_job).parameters) - {"self"}
    files = sorted((REPO / "jobs").glob("*.yaml"))
    assert {f.stem for f in files} >= {"mnist", "digits"}
    for f in files:
        spec = yaml.safe_load(f.read_text())
        assert set(spec) <= allowed, f
        argv = shlex.split(spec["entrypoint"])
        assert argv[0] == "slimray"
        args = _parser().parse_args(argv[1:])
        assert args.recipe == spec["metadata"]["recipe"] and f.stem.startswith(args.recipe)
        if getattr(args, "space", None):  # a sweep space named relative to the repository (the job's working_dir)
            assert load_space_file(REPO / args.space).distill is not None


def test_submission_ships_the_space_file_validated(tmp_path):
    sub = build_submission(["run", "--recipe", "mnist", "--space", str(REPO / "tune" / "mnist-distill.yaml")])
    assert "--space-env" in sub["entrypoint"] and "mnist-distill.yaml" not in sub["entrypoint"]
    shipped = SweepSpaceFile.from_json(sub["runtime_env"]["env_vars"][SPACE_ENV])
    assert shipped == load_space_file(REPO / "tune" / "mnist-distill.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("distill: {alpha: [2.0]}\n")
    with pytest.raises(ConfigError, match="alpha: 2.0 is out of range"):
        build_submission(["sweep", "--recipe", "mnist", "--space", str(bad)])


def test_serve_configs_validate_with_serves_schema():
    from ray.serve.schema import ServeDeploySchema

    from slimray.serving.app import ServeOptions, app_builder

    for f in sorted((REPO / "serve").glob("*.yaml")):
        schema = ServeDeploySchema.model_validate(yaml.safe_load(f.read_text())) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(yaml.safe_load(f.read_text()))
        assert schema.http_options.host == "127.0.0.1", f
        for app in schema.applications:
            if app.import_path.startswith("ray.serve.llm:"):  # the vLLM GPU path: tests/serving/test_lm_options.py
                continue
            assert app.import_path == "slimray.serving.app:app_builder"
            ServeOptions.model_validate(app.args)
            assert app_builder(app.args) is not None


def test_the_users_code_travels_with_the_job(tmp_path):
    """The factory's module (a file: shipped as a package of the same name) and a metric's package (a folder)
    go into py_modules; relative paths in the config are made absolute against the config file."""
    code = tmp_path / "code"
    (code / "metrics_pkg").mkdir(parents=True)
    (code / "metrics_pkg" / "__init__.py").write_text("def f1(p, y):\n    return 1.0\n")
    (code / "net.py").write_text("def build():\n    pass\n")
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({
        "name": "user", "data": {"source": "files", "train": "d.parquet"},
        "teacher": {"source": "module", "factory": "net:build", "weights": "t.safetensors", "code_dir": "code"},
        "distill": {}, "eval": {"metric": "metrics_pkg:f1", "max_drop": 0.1},
    }))
    sub = build_submission(["run", "--config", str(f)])
    mods = sub["runtime_env"]["py_modules"][1:]
    assert len(mods) == 2
    from pathlib import Path

    net, pkg = Path(mods[0]), Path(mods[1])
    assert net.name == "net" and (net / "__init__.py").read_text() == (code / "net.py").read_text()
    assert pkg == (code / "metrics_pkg").resolve()
    shipped = PipelineConfig.from_json(sub["runtime_env"]["env_vars"][CONFIG_ENV])
    assert shipped.data.train == str(tmp_path / "d.parquet") and shipped.teacher.code_dir == str(code)
