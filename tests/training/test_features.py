"""Feature KD and the teacher in the loop: layer validation, projections, the config rules, an in-loop teacher
that reproduces precomputed logits exactly, and a 2-worker FSDP run with feature KD that checkpoints full state
dicts and resumes."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from torch import nn

from slimray.config import DistillConfig
from slimray.families.classifier import build_model
from slimray.families.classifier.spec import MLPSpec
from slimray.schema import ConfigError
from slimray.training.classifier_data import TrainData, classifier_job
from slimray.training.distill import run_training
from slimray.families.classifier.features import FeatureKDSpec, KDStudent, TeacherInLoop, build_projection, layer_names
from slimray.families.classifier.kd import train_epoch

from tests.conftest import DIGITS_CNN

STUDENT = DIGITS_CNN.model_copy(update={"conv_channels": [8, 16], "fc_hidden": [32]})
EXAMPLE = torch.zeros(2, 1, 8, 8)


def _fk(student_layer: str, teacher_layer: str, weight: float = 1.0) -> FeatureKDSpec:
    return FeatureKDSpec(student_layer=student_layer, teacher_layer=teacher_layer, weight=weight)


def test_projection_follows_the_two_layer_shapes():
    student, teacher = build_model(STUDENT), build_model(DIGITS_CNN)
    conv = build_projection(student, teacher, _fk("features.4", "features.4"), EXAMPLE)  # 16 -> 32 channels, 4x4
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1)
    assert (conv.in_channels, conv.out_channels) == (STUDENT.conv_channels[1], DIGITS_CNN.conv_channels[1])
    lin = build_projection(student, teacher, _fk("classifier.1", "classifier.1"), EXAMPLE)  # hidden 32 -> 64
    assert isinstance(lin, nn.Linear) and (lin.in_features, lin.out_features) == (STUDENT.fc_hidden[0], DIGITS_CNN.fc_hidden[0])
    # conv map 8 channels at 4x4 vs the teacher's 16 at 8x8: 1x1 conv, teacher map pooled in the loss
    assert isinstance(build_projection(student, teacher, _fk("features.2", "features.1"), EXAMPLE), nn.Conv2d)
    assert isinstance(build_projection(teacher, teacher, _fk("features.4", "features.4"), EXAMPLE), nn.Identity)


def test_bad_layers_are_refused_by_name():
    student, teacher = build_model(STUDENT), build_model(DIGITS_CNN)
    with pytest.raises(ConfigError, match=r"feature_kd\.teacher_layer: no module named 'features\.9'.*'features\.3'"):
        build_projection(student, teacher, _fk("features.4", "features.9"), EXAMPLE)
    with pytest.raises(ConfigError, match=r"both must be feature maps"):
        build_projection(student, teacher, _fk("features.4", "classifier.1"), EXAMPLE)


def test_config_rules_for_feature_kd():
    base = {"student": STUDENT.model_dump()}
    fk = {"student_layer": "features.4", "teacher_layer": "features.4", "weight": 0.5}
    ok = DistillConfig.model_validate({**base, "loss": "features", "feature_kd": fk, "teacher_outputs": "in_loop", "strategy": "fsdp"})
    assert ok.feature_kd.weight == 0.5 and ok.strategy == "fsdp" and ok.placement_strategy == "PACK"
    cases = [
        ({"loss": "features", "teacher_outputs": "in_loop"}, "needs feature_kd"),
        ({"loss": "features", "feature_kd": fk}, "needs teacher_outputs: in_loop"),
        ({"loss": "logits", "feature_kd": fk}, "feature_kd is set but loss is 'logits'"),
        ({"loss": "features", "teacher_outputs": "in_loop", "feature_kd": {**fk, "student_layer": "conv9"}}, "not a student module"),
        ({"placement_strategy": "SPREAD_OUT"}, "placement_strategy"),
        ({"strategy": "zero3"}, "strategy"),
    ]
    for extra, message in cases:
        with pytest.raises(ValidationError, match=message):
            DistillConfig.model_validate({**base, **extra})


def _loader(x, y, *extra, batch_size=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y, *extra), batch_size=batch_size, shuffle=True, generator=gen)


def test_in_loop_teacher_gives_the_same_training_as_precomputed_logits(digits, trained_digits_cnn):
    x, y = digits.normalized("train")
    teacher = TeacherInLoop(trained_digits_cnn)
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.model.parameters())
    with torch.inference_mode():
        logits = trained_digits_cnn(x)
    runs = []
    for in_loop in (False, True):
        torch.manual_seed(0)
        student = build_model(STUDENT)
        opt = torch.optim.Adam(student.parameters(), lr=5e-3)
        loader = _loader(x, y) if in_loop else _loader(x, y, logits.clone())
        stats = train_epoch(student, loader, opt, temperature=4.0, alpha=0.7, teacher=teacher if in_loop else None)
        runs.append((stats.loss, student.state_dict()))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-5)
    for k, v in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][k], v)


def test_feature_kd_pulls_the_projected_student_feature_toward_the_teacher(digits, trained_digits_cnn):
    x, y = digits.normalized("train")
    spec = _fk("features.4", "features.4", weight=1.0)
    torch.manual_seed(0)
    student = build_model(STUDENT)
    net = KDStudent(student, build_projection(student, trained_digits_cnn, spec, EXAMPLE), spec.student_layer)
    teacher = TeacherInLoop(trained_digits_cnn, feature_layer=spec.teacher_layer)

    def feature_mse() -> float:
        with torch.no_grad():
            return torch.nn.functional.mse_loss(net(x)[1], teacher(x)[1]).item()

    before = feature_mse()
    opt = torch.optim.Adam(net.parameters(), lr=5e-3)
    for _ in range(3):
        train_epoch(net, _loader(x, y), opt, temperature=4.0, alpha=0.7, teacher=teacher, feature_weight=spec.weight)
    assert feature_mse() < 0.5 * before
    # an MLP teacher/student pair gets a Linear projection between hidden layers
    mlp_s, mlp_t = build_model(MLPSpec(in_features=64, hidden=[16], num_classes=10)), build_model(MLPSpec(in_features=64, hidden=[48], num_classes=10))
    assert isinstance(build_projection(mlp_s, mlp_t, _fk("classifier.1", "classifier.1"), torch.zeros(2, 64)), nn.Linear)
    assert "classifier.1" in layer_names(mlp_s)


@pytest.fixture(scope="module")
def labels_data(ray_session, digits):
    ray = ray_session
    (x, y), (xv, yv) = digits.normalized("train"), digits.normalized("val")
    return TrainData(ray.put(x.numpy()), ray.put(y.numpy()), ray.put(xv.numpy()), ray.put(yv.numpy()))


@pytest.mark.long
def test_fsdp_feature_kd_with_teacher_in_loop_checkpoints_full_state_and_resumes(tmp_path, labels_data, teacher_dir, digits):
    from slimray.compress.measure import accuracy

    fk = _fk("features.4", "features.4", weight=0.5)
    job = dict(
        label="fkd", run_name="fkd", storage_path=str(tmp_path / "ray"), spec=STUDENT.model_dump(), batch_size=32, lr=5e-3,
        temperature=4.0, alpha=0.7, num_workers=2, strategy="fsdp", teacher_outputs="in_loop", teacher_dir=str(teacher_dir),
        feature_kd=fk, metrics_path=str(tmp_path / "metrics.jsonl"),
    )
    with pytest.raises(ConfigError, match="no module named 'features.7'"):  # refused on the driver, before Ray Train
        run_training(classifier_job(**{**job, "feature_kd": _fk("features.4", "features.7")}, epochs=1), labels_data)
    run_training(classifier_job(**job, epochs=3), labels_data)
    model, metrics = run_training(classifier_job(**job, epochs=5), labels_data)  # same name: resumes after epoch 3
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3, 4, 5]
    assert lines[-1]["loss"] < lines[0]["loss"]
    x, y = digits.normalized("test")
    chance = 100.0 / digits.num_classes
    assert accuracy(model, x, y) > 8 * chance, "the student did not learn"
    ckpt = max((p for p in (tmp_path / "ray" / "fkd").glob("checkpoint_*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    full = build_model(STUDENT).state_dict()
    saved = load_file(str(ckpt / "model.safetensors"))
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in full.items()}, "not a full (unsharded) state dict"
    proj = load_file(str(ckpt / "projection.safetensors"))
    assert proj["weight"].shape == (DIGITS_CNN.conv_channels[1], STUDENT.conv_channels[1], 1, 1)
    state = torch.load(ckpt / "train_state.pt", weights_only=True)
    assert state["strategy"] == "fsdp" and state["epoch"] == 4
    # the full optimizer state holds Adam moments for every student and projection parameter, unsharded
    moments = state["optimizer"]["state"]
    assert moments["student.features.0.weight"]["exp_avg"].shape == full["features.0.weight"].shape
    assert moments["projection.weight"]["exp_avg"].shape == proj["weight"].shape


def test_pipeline_checks_the_teacher_layer_before_training_the_teacher():
    from slimray.config import PipelineConfig, load_config
    from slimray.families.classifier.teachers import check_teacher_layer

    data = load_config(recipe="digits").model_dump()
    data["distill"].update(loss="features", teacher_outputs="in_loop",
                           feature_kd={"student_layer": "features.4", "teacher_layer": "features.4", "weight": 1.0})
    check_teacher_layer(PipelineConfig.model_validate(data))  # conv 32 -> 64 channels: fine
    data["distill"]["feature_kd"]["teacher_layer"] = "classifier.7"
    with pytest.raises(ConfigError, match="no module named 'classifier.7' in the teacher"):
        check_teacher_layer(PipelineConfig.model_validate(data))
