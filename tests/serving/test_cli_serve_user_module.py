"""A user-module winner served by ``slimray serve RUN`` (a subprocess against the test session's cluster) after the
user's code folder is deleted and the run folder moved: the replicas rebuild the model from the code the artifact
carries. A winner that cannot be built makes the CLI print the replica's own exception, not only Serve's
``Deploying application ... failed``."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save_file

from slimray.families.classifier.artifacts import ArtifactSpec, load_artifact, load_runnable, save_artifact
from slimray.families.classifier.spec import InputSpec, ModuleSpec, build_model, spec_from_model
from tests.byom.project import user_code_folder
from tests.serving.conftest import free_port
from tests.serving.test_cli_serve_families import Served, _wait

pytestmark = pytest.mark.slow

INPUT = InputSpec(shape=[1, 8, 8], min_value=0.0, max_value=1.0)
MODULE = "t25_served_models"


def _user_run(root: Path, *, name: str) -> tuple[Path, Path]:
    """(run folder, code folder): a user MLP teacher whose code lives only in ``root/code``, a student derived from it
    by pruning as the pipeline derives one, saved as the run's winner, with the run's config and test sample."""
    from slimray.compress.prune import prune_to_fraction
    from slimray.config import PipelineConfig, load_config
    from slimray.families.classifier.sample import TEST_SAMPLE

    code = user_code_folder(root / "code", module=MODULE)
    run = root / "runs" / name
    torch.manual_seed(0)
    tspec = ModuleSpec(factory=f"{MODULE}:mlp", kwargs={"num_features": 64, "num_classes": 10, "hidden": [48, 24]}, code_dir=str(code))
    save_artifact(run / "teacher", build_model(tspec).eval(), ArtifactSpec(name="teacher", model=tspec, input=INPUT))
    teacher, saved = load_artifact(run / "teacher")
    student, _ = prune_to_fraction(teacher.train(), keep=0.5, example_inputs=torch.rand(1, 1, 8, 8))
    save_artifact(run / "winner", student.eval(), ArtifactSpec(name=name, model=spec_from_model(student, saved.model), input=INPUT))
    x = torch.rand(16, 1, 8, 8)
    save_file({"x": x, "y": torch.zeros(16, dtype=torch.int64)}, str(run / TEST_SAMPLE))
    cfg = load_config(recipe="digits").model_dump()
    cfg["name"] = name
    cfg["teacher"] = {"source": "module", "factory": f"{MODULE}:mlp", "kwargs": tspec.kwargs, "weights": str(root / "t.safetensors"),
                      "code_dir": str(code)}
    cfg["distill"] = {"derive": {"keep": 0.5}}
    (run / "config.json").write_text(PipelineConfig.model_validate(cfg).model_dump_json(indent=2))
    return run, code


def test_user_module_winner_serves_after_its_code_folder_is_deleted_and_the_run_moved(tmp_path, ray_session):
    run, code = _user_run(tmp_path / "project", name="t25-user")
    assert str(tmp_path) not in (run / "winner" / "spec.json").read_text()
    shutil.rmtree(code)
    moved = tmp_path / "moved" / "t25-user"
    moved.parent.mkdir()
    run.rename(moved)
    port = free_port()
    served = Served(moved, port=port, address=ray_session.get_runtime_context().gcs_address)
    try:
        _wait(served)
        out = "".join(served.lines)
        assert "Traceback" not in out and "same" in out, out[-3000:]  # the CLI's own check: served == in-process
        x = torch.rand(8, 1, 8, 8)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/predict", json={"inputs": x.tolist()}, timeout=30)
        assert r.status_code == 200, r.text
        model, spec = load_runnable(moved / "winner")
        with torch.inference_mode():
            local = model(spec.input.normalize(x))
        assert r.json()["predictions"] == local.argmax(1).tolist()
        torch.testing.assert_close(torch.tensor(r.json()["probabilities"]), local.softmax(1), atol=1e-4, rtol=1e-3)
    finally:
        served.__exit__()
    assert served.proc.returncode == 130, "".join(served.lines[-40:])


def test_a_failed_deployment_prints_the_replicas_exception(tmp_path, ray_session):
    """The winner's factory raises in the replica (its recorded kwargs give a layer a negative width): Serve's own
    error says only that deploying failed; the CLI prints what the replica raised."""
    run, _ = _user_run(tmp_path / "project", name="t25-broken")
    spec_file = run / "winner" / "spec.json"
    spec = json.loads(spec_file.read_text())
    spec["model"]["kwargs"]["hidden"] = [48, -7]
    spec_file.write_text(json.dumps(spec, indent=2))
    cli = Path(sys.executable).with_name("slimray")
    out = subprocess.run([str(cli), "serve", str(run), "--port", str(free_port()), "--address", ray_session.get_runtime_context().gcs_address],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    # Ray streams its controller's log (tracebacks included) to this driver; the CLI's own lines are the others
    own = [line for line in out.stderr.splitlines() if not re.match(r"^(\x1b\[\d+m)?\(\w+ pid=\d+", line)]
    i = next(i for i, line in enumerate(own) if line.startswith("slimray: "))
    assert own[i] == "slimray: Serve could not deploy 't25-broken'; its replica failed with:", own[i:]
    cause = own[i + 1]  # the replica's exception, read from Serve's status
    assert cause.startswith("  t25-broken: slimray.schema.ConfigError: model.factory 't25_served_models:mlp' raised RuntimeError"), cause
    assert "negative dimension -7" in cause
    assert "Traceback" not in "\n".join(own)
