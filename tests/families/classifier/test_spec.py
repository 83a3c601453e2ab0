"""Specs round-trip through JSON and rebuild the same architecture without pickle."""

from __future__ import annotations

import pytest
import torch

from slimray.families.classifier.artifacts import ArtifactSpec
from slimray.compress import PruneSpec, QuantSpec
from slimray.families.classifier import CNNSpec, InputSpec, MLPSpec, build_model, spec_from_model
from slimray.families.classifier.spec import count_params
from slimray.schema import ConfigError

SPECS = [
    CNNSpec(in_channels=1, image_size=28, conv_channels=[32, 64], fc_hidden=[128], num_classes=10),
    CNNSpec(in_channels=3, image_size=16, conv_channels=[8], fc_hidden=[], num_classes=4, kernel_size=5),
    MLPSpec(in_features=784, hidden=[256, 64], num_classes=10),
    PruneSpec(ratio=0.5, importance="l2", round_to=8),
    QuantSpec(method="static_int8", backend="x86", num_calibration_batches=4),
    InputSpec(shape=[1, 8, 8], mean=4.9, std=6.0, min_value=0, max_value=16),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: type(s).__name__)
def test_json_round_trip(spec):
    again = type(spec).from_json(spec.model_dump_json())
    assert again == spec
    assert again.model_dump_json() == spec.model_dump_json()


def test_artifact_spec_round_trip_keeps_union_kind():
    a = ArtifactSpec(name="x", model=SPECS[2], input=SPECS[5], prune=SPECS[3], quantization=SPECS[4])
    b = ArtifactSpec.from_json(a.model_dump_json())
    assert isinstance(b.model, MLPSpec) and b == a


def test_strict_specs_reject_unknown_fields():
    with pytest.raises(ConfigError, match="widht: unknown field"):
        CNNSpec.from_dict({"image_size": 8, "conv_channels": [4], "num_classes": 2, "widht": 3})


def test_ccexam_architecture_matches_teacher_size():
    model = build_model(SPECS[0])
    assert count_params(model) == 421_642  # the ccexam MNIST CNN
    assert spec_from_model(model, SPECS[0]) == SPECS[0]


@pytest.mark.parametrize("spec", SPECS[:3], ids=["cnn", "cnn5", "mlp"])
def test_build_model_runs(spec):
    shape = (2, spec.in_channels, spec.image_size, spec.image_size) if isinstance(spec, CNNSpec) else (2, spec.in_features)
    assert build_model(spec)(torch.randn(*shape)).shape == (2, spec.num_classes)


def test_per_channel_normalisation_and_its_checks():
    import pytest
    import torch

    from slimray.families.classifier.spec import InputSpec

    spec = InputSpec(shape=[3, 2, 2], mean=[0.0, 1.0, 2.0], std=[1.0, 2.0, 4.0], min_value=0, max_value=10)
    x = torch.full((5, 3, 2, 2), 2.0)
    out = spec.normalize(x)
    assert out[:, 0].eq(2.0).all() and out[:, 1].eq(0.5).all() and out[:, 2].eq(0.0).all()
    assert InputSpec(shape=[4], mean=1.0, std=2.0, min_value=0, max_value=1).normalize(torch.ones(2, 4)).eq(0).all()
    with pytest.raises(ValueError, match="one per channel"):
        InputSpec(shape=[3, 2, 2], mean=[0.0, 1.0], min_value=0, max_value=1)
    with pytest.raises(ValueError, match="std must be > 0"):
        InputSpec(shape=[2, 2], std=[1.0, 0.0], min_value=0, max_value=1)
