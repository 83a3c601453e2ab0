"""Artifact integrity and faults (``slimray.storage``, on the classifier's ``slimray.families.classifier.artifacts``): sha256 per file in spec.json, a damaged reused stage
rebuilt alone with one line, a damaged winner refused by ``slimray serve`` naming the file, and a full disk
(injected ENOSPC) leaving the previous artifact intact with a one-line message. No Ray."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch

from slimray import storage
from slimray.families.classifier.artifacts import ArtifactSpec, load_artifact, save_artifact
from slimray.storage import DamagedArtifactError, DiskFullError, reusable, sha256_file, verify_artifact, write_json_atomic
from slimray.config import PipelineConfig
from slimray.families.classifier import build_model

from .conftest import DIGITS_CNN, tiny_digits_config


@pytest.fixture
def saved(tmp_path, digits) -> Path:
    path = tmp_path / "student"
    torch.manual_seed(0)
    save_artifact(path, build_model(DIGITS_CNN).eval(), ArtifactSpec(name="student", model=DIGITS_CNN, input=digits.input))
    return path


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def test_spec_records_a_sha256_per_file_and_verification_names_a_truncated_one(saved):
    spec = json.loads((saved / "spec.json").read_text())
    assert spec["files"] == {"model.safetensors": sha256_file(saved / "model.safetensors")}
    verify_artifact(saved, ArtifactSpec)
    _truncate(saved / "model.safetensors")
    with pytest.raises(DamagedArtifactError, match=r"model\.safetensors: does not match its sha256"):
        verify_artifact(saved, ArtifactSpec)


def test_artifact_without_hashes_still_loads(saved, digits):
    spec = json.loads((saved / "spec.json").read_text())
    del spec["files"]  # written before hashes existed
    (saved / "spec.json").write_text(json.dumps(spec))
    verify_artifact(saved, ArtifactSpec)
    model, _ = load_artifact(saved)
    assert reusable(saved, spec_cls=ArtifactSpec)
    x, _ = digits.normalized("test")
    assert model(x[:4]).shape == (4, 10)


def _student_stage(tmp_path, digits, monkeypatch, calls: list):
    """The shared pipeline's distil stage over the classifier's hooks, with Ray Train replaced by a stand-in."""
    import slimray.training.distill as distill
    from slimray.pipelines.flow import FlowStages

    data = tiny_digits_config().model_dump()
    data["distill"]["labels_only_baseline"] = False
    cfg = PipelineConfig.model_validate(data)

    def fake_training(job, data, **kw):  # what Ray Train would return: a model of the configured student architecture
        calls.append(job.label)
        torch.manual_seed(len(calls))
        return build_model(cfg.distill.student).eval(), {}

    monkeypatch.setattr(distill, "run_training", fake_training)
    stages = FlowStages(cfg)
    stages.open(tmp_path, 0.0)
    stages.prepare()
    stages.teacher, stages.folders = build_model(DIGITS_CNN).eval(), {"teacher": None}
    stages.plans = stages.recipe.plan_students(cfg, stages.teacher, data=stages.data)

    def run():
        stages.distil()
        return stages.students["student"]

    return run


@pytest.mark.parametrize("damage", ["truncated safetensors", "garbage spec.json"])
def test_damaged_reused_stage_is_rebuilt_alone_with_one_line(tmp_path, digits, monkeypatch, capsys, damage):
    calls: list[str] = []
    student_stage = _student_stage(tmp_path, digits, monkeypatch, calls)
    student_stage()
    (tmp_path / "teacher").mkdir()  # another stage: must not be touched
    (tmp_path / "teacher" / "keep").write_text("x")
    capsys.readouterr()

    student_stage()  # intact: reused, not retrained
    assert calls == ["student"] and "student: reused" in capsys.readouterr().out

    victim = tmp_path / "students" / "student" / ("model.safetensors" if damage.startswith("truncated") else "spec.json")
    _truncate(victim) if damage.startswith("truncated") else victim.write_text("{not json")
    student_stage()
    out = capsys.readouterr().out
    damaged = [line for line in out.splitlines() if "damaged" in line]
    assert len(damaged) == 1 and str(victim) in damaged[0] and "rebuilding this stage" in damaged[0]
    assert calls == ["student", "student"]  # rebuilt
    verify_artifact(tmp_path / "students" / "student", ArtifactSpec)  # and intact again
    assert (tmp_path / "teacher" / "keep").exists()
    assert not [p for p in (tmp_path / "students").iterdir() if p.name.startswith(".")]  # nothing left aside


@pytest.mark.parametrize("damage", ["garbage", "text-looking"])
def test_serve_refuses_a_damaged_winner_naming_the_file(saved, tmp_path, capsys, damage):
    from slimray.cli import main

    run = tmp_path / "run"
    saved.rename(run / "winner") if run.mkdir() is None else None
    spec = run / "winner" / "spec.json"
    if damage == "garbage":
        spec.write_bytes(b"\x00\x01 not json")
    else:  # a text model's spec cut off in the middle
        spec.write_text('{"format": "slimray.text-model/1", "name": "minilm", "bert_con')
    assert main(["serve", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(spec) in err and "unreadable" in err


def _failing_save_file(monkeypatch):
    real = storage.save_file

    def save_file(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)  # half a file is on disk when the disk fills up
        _truncate(Path(filename))
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(storage, "save_file", save_file)


def test_disk_full_keeps_the_previous_artifact_and_names_it(saved, digits, monkeypatch):
    before = {f.name: f.read_bytes() for f in saved.iterdir()}
    _failing_save_file(monkeypatch)
    with pytest.raises(DiskFullError) as info:
        save_artifact(saved, build_model(DIGITS_CNN), ArtifactSpec(name="student", model=DIGITS_CNN, input=digits.input))
    assert info.value.errno == errno.ENOSPC
    assert str(saved) in info.value.strerror and "\n" not in str(info.value)
    assert {f.name: f.read_bytes() for f in saved.iterdir()} == before  # the old artifact, untouched
    assert [p.name for p in saved.parent.iterdir()] == ["student"]  # no temporary folder left
    verify_artifact(saved, ArtifactSpec)


def test_disk_full_in_a_json_write_leaves_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    write_json_atomic(target, {"a": 1})

    def write_text(self, *a, **k):
        Path.write_bytes(self, b"{")
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(DiskFullError, match="report.json"):
        write_json_atomic(target, {"a": 2})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_cli_prints_one_line_with_the_resume_command_on_a_full_disk(tmp_path, monkeypatch, capsys):
    from slimray import pipelines
    from slimray.cli import main

    def run_pipeline(cfg, **kw):
        raise DiskFullError(tmp_path / "runs" / "digits" / "student")

    monkeypatch.setattr(pipelines, "run_pipeline", run_pipeline)
    assert main(["run", "--recipe", "digits", "--no-serve", "--out", str(tmp_path / "runs"), "--fresh"]) == 28
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"while writing {tmp_path / 'runs' / 'digits' / 'student'}" in err
    assert err.endswith(f"resume with: slimray run --recipe digits --no-serve --out {tmp_path / 'runs'}")


def test_a_full_disk_inside_the_sweep_is_reported_as_the_cause():
    from slimray.sweep.select import sweep_failure

    trials = [
        {"status": "error", "error": "DiskFullError: [Errno 28] no space left on device while writing /r/trials/prune0.50-none"},
        {"status": "error", "error": "RuntimeError: something downstream of it"},
    ]
    err = sweep_failure(trials)
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC
    assert "every sweep trial failed: the disk is full" in err.strerror and "/r/trials/prune0.50-none" in err.strerror
    other = sweep_failure([{"status": "error", "error": "ValueError: bad\ntraceback"}] * 2)
    assert isinstance(other, RuntimeError) and str(other) == "every sweep trial failed: ValueError: bad (2 trials)"


def test_text_artifacts_carry_hashes_and_a_damaged_one_is_not_reused(tmp_path):
    from slimray.storage import write_state_artifact
    from slimray.families.sentence_encoder.models import TextArtifactSpec

    path = tmp_path / "student"
    spec = TextArtifactSpec(name="student", bert_config={}, heads_per_layer=[2], ffn_per_layer=[8])

    def tokenizer(tmp: Path) -> None:
        (tmp / "tokenizer.json").write_text('{"model": {}}')

    written = write_state_artifact(path, {"w": torch.arange(6.0)}, spec, extra=tokenizer)
    assert set(written.files) == {"model.safetensors", "tokenizer.json"}
    assert reusable(path, spec_cls=TextArtifactSpec)
    (path / "tokenizer.json").write_text('{"model": {"changed": 1}}')
    said: list[str] = []
    assert not reusable(path, spec_cls=TextArtifactSpec, log=said.append)
    assert len(said) == 1 and str(path / "tokenizer.json") in said[0] and not path.exists()


def test_truncated_teacher_logits_cache_is_recomputed_with_one_line(tmp_path, capsys):
    from types import SimpleNamespace

    from slimray.families.classifier.recipe import ClassifierRecipe

    torch.manual_seed(0)
    teacher, x = build_model(DIGITS_CNN).eval(), torch.randn(20, 1, 8, 8)
    recipe = ClassifierRecipe()
    recipe._run_dir = tmp_path
    first = recipe._teacher_logits(teacher, SimpleNamespace(x_train=x, teacher_logits=None))
    _truncate(tmp_path / "teacher_logits.safetensors")
    capsys.readouterr()
    again = recipe._teacher_logits(teacher, SimpleNamespace(x_train=x, teacher_logits=None))
    damaged = [line for line in capsys.readouterr().out.splitlines() if "damaged" in line]
    assert len(damaged) == 1 and "teacher_logits.safetensors" in damaged[0]
    assert (again == first).all()
