"""`slimray serve` flags override the run's config only when given (a default must not hide `serve.num_replicas`)."""

from __future__ import annotations

import pytest

from slimray import cli
from tests.conftest import tiny_digits_config


@pytest.fixture()
def run_dir(tmp_path, monkeypatch):
    cfg = tiny_digits_config("flags").model_dump()
    cfg["serve"].update(num_replicas=4, port=8123, host="127.0.0.1")
    from slimray.config import PipelineConfig

    from slimray.artifacts import ArtifactSpec, save_artifact
    from slimray.families.classifier import build_model
    from slimray.families.classifier.spec import InputSpec

    folder = tmp_path / "flags"
    student = PipelineConfig.model_validate(cfg).distill.student
    save_artifact(folder / "winner", build_model(student), ArtifactSpec(
        name="flags", model=student, input=InputSpec(shape=[1, 8, 8], min_value=0, max_value=16)))  # a real (checked) winner
    (folder / "config.json").write_text(PipelineConfig.model_validate(cfg).model_dump_json())
    seen = {}
    monkeypatch.setattr("slimray.runtime.init_ray", lambda *a, **k: True)
    monkeypatch.setattr(cli, "_serve_until_interrupted",
                        lambda run, serve_cfg, name, family: seen.update(cfg=serve_cfg, name=name, family=family.name) or 0)
    return folder, seen


def test_config_wins_when_no_flag_is_given(run_dir):
    folder, seen = run_dir
    assert cli.main(["serve", str(folder)]) == 0
    assert (seen["cfg"].num_replicas, seen["cfg"].port, seen["cfg"].host) == (4, 8123, "127.0.0.1")


def test_flags_win_when_given(run_dir):
    folder, seen = run_dir
    assert cli.main(["serve", str(folder), "--replicas", "2", "--port", "9001"]) == 0
    assert (seen["cfg"].num_replicas, seen["cfg"].port) == (2, 9001)
    assert seen["cfg"].max_batch_size == 16 and seen["name"] == "flags"  # the rest still from the config
    assert seen["family"] == "classifier"


def test_text_runs_pass_only_given_flags(monkeypatch, tmp_path):
    from slimray.serving.options import ServeOptions, options_for_run
    from slimray.families.sentence_encoder.config import TextServeConfig

    cfg = TextServeConfig(num_replicas=3, max_batch_examples=9)
    opts = options_for_run(tmp_path, serve_config=cfg, name="t", num_replicas=None)
    assert isinstance(opts, ServeOptions) and opts.num_replicas == 3 and opts.max_batch_examples == 9
    assert options_for_run(tmp_path, serve_config=cfg, name="t", num_replicas=2).num_replicas == 2
