"""The tabular family, the fourth family, built only from files under ``families/tabular/`` and its name in the
registry's ``DECLARED``: it runs on the shared pipeline (``slimray.pipelines.flow``), the one Train loop, the one Tune
trainable and the one Serve builder. End to end through the CLI a user runs: ``slimray run --config`` distils, searches,
reports, then serves the winner; the served answer equals the winner run in-process."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from slimray.schema import ConfigError


def write_friedman(path: Path, *, num_rows: int = 1500, num_features: int = 8) -> Path:
    """Friedman #1 regression (scikit-learn's generator: a nonlinear target of 5 of the features, plus noise) as a CSV."""
    from sklearn.datasets import make_friedman1

    x, y = make_friedman1(n_samples=num_rows, n_features=num_features, noise=0.5, random_state=0)
    header = ",".join([f"f{i}" for i in range(num_features)] + ["y"])
    np.savetxt(path, np.column_stack([x, y]), delimiter=",", header=header, comments="", fmt="%.6f")
    return path


def write_config(folder: Path, **sections) -> Path:
    import yaml

    write_friedman(folder / "data.csv")
    doc = {"family": "tabular", "name": "tabular-e2e", "data": {"path": "data.csv", "target": "y"},
           "teacher": {"hidden": [64, 64], "epochs": 15, "lr": 0.005},
           "distill": {"students": [[32, 32]], "epochs": 25, "num_workers": 2, "batch_size": 32, "lr": 0.005},
           "search": {"prune_ratios": [0.0, 0.25], "quant_methods": ["none", "dynamic_int8"], "max_quality_drop": 0.06,
                      "num_rounds": 3}}
    for k, v in sections.items():
        doc[k] = {**doc.get(k, {}), **v}
    path = folder / "tabular.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_the_family_is_registered_with_its_hooks():
    from slimray import families
    from slimray.families.recipe import Recipe

    fam = families.get("tabular")
    assert fam.stages == "slimray.pipelines.flow:FlowStages"
    assert issubclass(fam.load("recipe"), Recipe)
    assert all(getattr(fam, h).startswith(("slimray.families.tabular", "slimray.pipelines.flow", "slimray.serving.checks"))
               for h in ("config", "loader", "stages", "train_task", "serve_check", "codec", "recipe", "artifact_spec"))


@pytest.mark.parametrize("change,field", [
    ({"data": {"target": "price"}}, "data.target"),
    ({"search": {"prune_ratios": [1.5]}}, "search.prune_ratios"),
    ({"search": {"quant_methods": ["int3"]}}, "search.quant_methods"),
    ({"serve": {"ingress": "proxy", "min_replicas": 3, "max_replicas": 2}}, "serve.min_replicas"),
])
def test_a_bad_config_fails_at_load_naming_the_field(tmp_path, change, field):
    from slimray.families.tabular.config import load_tabular_config
    from slimray.families.tabular.recipe import TabularRecipe

    path = write_config(tmp_path, **change)
    with pytest.raises(ConfigError) as err:
        cfg = load_tabular_config(config=path)
        TabularRecipe().check(cfg)  # the target column: checked before Ray starts
    assert field in str(err.value), str(err.value)


def test_a_candidate_really_shrinks_and_its_artifact_rebuilds_alone(tmp_path):
    from slimray.families.tabular.config import load_tabular_config
    from slimray.families.tabular.model import build, load_artifact
    from slimray.families.tabular.recipe import TabularRecipe

    cfg = load_tabular_config(config=write_config(tmp_path))
    recipe = TabularRecipe()
    data = recipe.prepare(cfg, tmp_path)
    torch.manual_seed(0)
    student = build({"in_dim": 8, "hidden": [32, 32]}).eval()
    for quant in ("none", "dynamic_int8"):
        model, row = recipe.measure(cfg, {"prune_ratio": 0.25, "quantization": quant}, student, data)
        assert row["hidden"] == [24, 24] and row["params"] == 8 * 24 + 24 + 24 * 24 + 24 + 24 + 1
        assert row["rows_per_s"] > 0 and -10 < row["r2"] <= 1
        recipe.save(tmp_path / quant, model, candidate={"quantization": quant}, cfg=cfg, data=data)
        loaded, spec = load_artifact(tmp_path / quant)
        assert spec.hidden == [24, 24] and spec.quantization == quant
        x = torch.from_numpy(data["x_val"][:16])
        with torch.inference_mode():
            assert torch.allclose(loaded(x), model(x), atol=1e-6)
    assert (tmp_path / "dynamic_int8" / "model.safetensors").stat().st_size < (tmp_path / "none" / "model.safetensors").stat().st_size


def test_the_codec_answers_in_the_targets_units_and_refuses_bad_rows(tmp_path):
    from slimray.codec import RequestError
    from slimray.families.tabular.codec import TabularCodec
    from slimray.families.tabular.config import load_tabular_config
    from slimray.families.tabular.model import build
    from slimray.families.tabular.recipe import TabularRecipe
    from slimray.serving.options import ServeOptions

    cfg = load_tabular_config(config=write_config(tmp_path))
    recipe = TabularRecipe()
    data = recipe.prepare(cfg, tmp_path)
    recipe.save(tmp_path / "m", build({"in_dim": 8, "hidden": [16]}).eval(), candidate={}, cfg=cfg, data=data)
    codec = TabularCodec(ServeOptions(model_dir=str(tmp_path / "m"), name="t"))
    out = codec.v1_answer(codec.forward(codec.parse_v1(recipe.sample_request(data))))
    assert len(out["predictions"]) == 8
    for body, status in (({"inputs": [[0.5] * 7]}, 422), ({"inputs": []}, 422), ({"rows": [[0.5] * 8]}, 422),
                         ({"inputs": [[float("nan")] * 8]}, 422), ({"inputs": [[0.5] * 8] * 10_000}, 413)):
        with pytest.raises(RequestError) as err:
            codec.parse_v1(body)
        assert err.value.status == status, (body, err.value.message)


@pytest.mark.long  # two minutes (three Ray Train runs); the encoder's end to end runs the shared stages in make test
def test_distil_search_serve_end_to_end_through_the_cli(tmp_path, ray_session):
    from ray import serve

    from tests.serving.conftest import free_port
    from tests.serving.test_cli_serve_families import Served, _wait

    serve.shutdown()  # `slimray run` starts Serve with its own ingress
    port = free_port()
    config = write_config(tmp_path, serve={"port": port}, search={"include_teacher": True, "max_rounds": 6})
    served = Served(None, port=port, address=ray_session.get_runtime_context().gcs_address,
                    command=["run", "--config", str(config), "--out", str(tmp_path / "runs")])
    try:
        _wait(served, timeout=420)
        out = "".join(served.lines)
        assert "\nTraceback" not in out and ": same" in out, out[-3000:]  # (Ray's actors prefix their own lines)
        run = tmp_path / "runs" / "tabular-e2e"
        report = json.loads((run / "report.json").read_text())
        # what every family's report holds, from the shared renderer
        assert report["family"] == "tabular" and report["winner"]["meets_constraint"], report["winner"]
        assert report["teacher"]["r2"] > 0.85 and report["winner"]["r2"] >= report["quality"]["floor"]
        students = {r["key"]: r for r in report["students"]}
        assert set(students) == {"student-32x32", "student-32x32-labels-only"}
        assert "kd_gain" in students["student-32x32"] and report["search_bases"][0] in students
        # include_teacher: the teacher's own compressions are searched beside the student's
        assert report["search_bases"][-1] == "teacher" and len(report["search_bases"]) == 2
        assert len(report["trials"]) == 8 and all(t["status"] == "ok" for t in report["trials"])
        assert sum(t["key"].startswith("teacher-") for t in report["trials"]) == 4
        assert report["winner"]["key"] in {t["key"] for t in report["finalists"]}
        # side-by-side rounds: at least num_rounds (3), more up to max_rounds (6) until one finalist leads two rounds
        counts = {len(v) for v in report["rounds"].values()}
        assert len(counts) == 1 and 3 <= counts.pop() <= 6
        assert (run / "pareto.png").stat().st_size > 0 and "distillation" in (run / "report.md").read_text()
        # served: the same predictions as the winner run in-process, and a bad row is a 4xx with a message
        from slimray.families.tabular.codec import TabularCodec
        from slimray.serving.options import ServeOptions

        body = json.loads((run / "sample_request.json").read_text())
        r = httpx.post(f"http://127.0.0.1:{port}/v1/predict", json=body, timeout=30)
        assert r.status_code == 200, r.text
        codec = TabularCodec(ServeOptions(model_dir=str(run / "winner"), name="x"))
        local = codec.forward(codec.parse_v1(body))["predictions"]
        assert np.allclose(r.json()["predictions"], local, rtol=1e-5, atol=1e-5)
        bad = httpx.post(f"http://127.0.0.1:{port}/v1/predict", json={"inputs": [[1.0, 2.0]]}, timeout=30)
        assert bad.status_code == 422 and "shape" in bad.json()["error"]
    finally:
        served.__exit__()
        serve.shutdown()  # Serve as `slimray run` started it (its own ingress) must not outlive the test: later ones start their own
    assert served.proc.returncode == 130, "".join(served.lines[-40:])


def test_slimray_serve_verifies_the_artifact_through_the_spec_its_family_names(tmp_path):
    from slimray.families.tabular.config import load_tabular_config
    from slimray.families.tabular.model import build
    from slimray.families.tabular.recipe import TabularRecipe
    from slimray.serving.checks import check_winner
    from slimray.storage import DamagedArtifactError

    cfg = load_tabular_config(config=write_config(tmp_path))
    recipe = TabularRecipe()
    data = recipe.prepare(cfg, tmp_path)
    recipe.save(tmp_path / "w", build({"in_dim": 8, "hidden": [16]}).eval(), candidate={}, cfg=cfg, data=data)
    check_winner(tmp_path / "w")
    spec = json.loads((tmp_path / "w" / "spec.json").read_text())
    (tmp_path / "w" / "spec.json").write_text(json.dumps({**spec, "in_dim": "eight"}))
    with pytest.raises(DamagedArtifactError, match="TabularSpec schema"):
        check_winner(tmp_path / "w")
    (tmp_path / "w" / "spec.json").write_text(json.dumps({**spec, "format": "slimray.unknown/1"}))
    with pytest.raises(DamagedArtifactError, match="unknown format 'slimray.unknown/1'"):
        check_winner(tmp_path / "w")
