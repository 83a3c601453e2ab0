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

    from slimray.families.classifier.artifacts import ArtifactSpec, save_artifact
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


def test_grpc_port_from_the_config_and_from_the_flag(run_dir):
    """`serve.grpc_port` (default None: no gRPC) reaches the serve config; `--grpc-port` overrides it only when given."""
    import json

    folder, seen = run_dir
    assert cli.main(["serve", str(folder)]) == 0
    assert seen["cfg"].grpc_port is None
    assert cli.main(["serve", str(folder), "--grpc-port", "9123"]) == 0
    assert (seen["cfg"].grpc_port, seen["cfg"].port, seen["cfg"].num_replicas) == (9123, 8123, 4)
    data = json.loads((folder / "config.json").read_text())
    data["serve"]["grpc_port"] = 9555
    (folder / "config.json").write_text(json.dumps(data))
    assert cli.main(["serve", str(folder)]) == 0 and seen["cfg"].grpc_port == 9555
    assert cli.main(["serve", str(folder), "--grpc-port", "9556"]) == 0 and seen["cfg"].grpc_port == 9556


def test_grpc_port_is_strict_and_reaches_deploy(run_dir, monkeypatch, capsys):
    from pydantic import ValidationError

    from slimray.config import ServeConfig

    for bad in (0, 70000, "9000x"):
        with pytest.raises(ValidationError):
            ServeConfig(grpc_port=bad)
    with pytest.raises(ValidationError, match="differ"):
        ServeConfig(port=9000, grpc_port=9000)
    with pytest.raises(ValidationError):
        ServeConfig(grpc_host="127.0.0.1")  # no such field: Serve's gRPC proxy takes no host
    folder, seen = run_dir
    assert cli.main(["serve", str(folder), "--grpc-port", "8123"]) == 2  # same as the run's HTTP port
    assert "differ" in capsys.readouterr().err
    calls = {}
    monkeypatch.setattr("slimray.serving.app.deploy", lambda app, **kw: calls.update(kw) or "http://127.0.0.1:8123")
    cli._serve_run_dir(folder, ServeConfig(port=8123, grpc_port=9124), name="flags")
    assert calls["grpc_port"] == 9124 and calls["host"] == "127.0.0.1" and calls["port"] == 8123


def test_run_takes_grpc_port(monkeypatch):
    args = cli._parser().parse_args(["run", "--recipe", "digits", "--grpc-port", "9321"])
    assert cli._load(args).serve.grpc_port == 9321
    assert cli._load(cli._parser().parse_args(["run", "--recipe", "digits"])).serve.grpc_port is None


def test_text_runs_take_grpc_port_too():
    """Every family goes through the one serve schema: the encoder recipe takes --grpc-port like the classifier."""
    family, cfg = cli._load_any(cli._parser().parse_args(["run", "--recipe", "minilm", "--grpc-port", "9321"]))
    assert family.name == "sentence_encoder" and cfg.serve.grpc_port == 9321
    assert cli._load_any(cli._parser().parse_args(["run", "--recipe", "minilm"]))[1].serve.grpc_port is None


def test_ingress_defaults_to_direct_the_flag_wins_and_reaches_deploy(run_dir, monkeypatch):
    """`serve.ingress` (default direct) reaches deploy(); `--ingress proxy` overrides it; a bad value or autoscaling
    with the direct ingress fails at load, naming the field."""
    from pydantic import ValidationError

    from slimray.config import ServeConfig

    folder, seen = run_dir
    assert cli.main(["serve", str(folder)]) == 0 and seen["cfg"].ingress == "direct"
    assert cli.main(["serve", str(folder), "--ingress", "proxy"]) == 0 and seen["cfg"].ingress == "proxy"
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["serve", str(folder), "--ingress", "haproxy"])
    with pytest.raises(ValidationError, match="ingress"):
        ServeConfig(ingress="haproxy")
    with pytest.raises(ValidationError, match="ingress: proxy"):
        ServeConfig(max_replicas=2)
    assert ServeConfig(ingress="proxy", max_replicas=2).max_replicas == 2
    calls = {}
    monkeypatch.setattr("slimray.serving.app.deploy", lambda app, **kw: calls.update(kw) or "http://127.0.0.1:8123")
    cli._serve_run_dir(folder, ServeConfig(port=8123), name="flags")
    assert calls["ingress"] == "direct"
    cli._serve_run_dir(folder, ServeConfig(port=8123, ingress="proxy"), name="flags")
    assert calls["ingress"] == "proxy"


def test_a_bad_serve_section_fails_run_before_any_stage(tmp_path, monkeypatch, capsys):
    """`slimray run --config` with serve.min_replicas above serve.max_replicas: refused when the config loads, naming
    the field, before the run folder, Ray or any stage (the whole serve schema is checked there)."""
    import time

    import yaml

    import slimray.pipelines as pipelines
    from slimray.config import load_config

    data = load_config(recipe="digits").model_dump()
    data["serve"].update(ingress="proxy", min_replicas=3, max_replicas=2)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(data))
    monkeypatch.setattr(pipelines, "run_pipeline", lambda *a, **k: pytest.fail("a stage started"))
    t0 = time.perf_counter()
    code = cli.main(["run", "--config", str(cfg), "--out", str(tmp_path / "runs")])
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert code == 2, err
    assert "serve.min_replicas: " in err and "must not exceed max_replicas (2)" in err, err
    assert not (tmp_path / "runs").exists()
    assert elapsed < 5.0, elapsed  # 1.1 s measured in-process with the 2-core box at load 26
