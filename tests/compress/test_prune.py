"""Structured pruning removes whole channels, really shrinks tensors, and round-trips through artifacts."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from slimray.families.classifier.artifacts import ArtifactSpec, load_artifact, save_artifact
from slimray.compress.prune import PruneSpec, prunable_channels, prune
from slimray.families.classifier import build_model, spec_from_model
from slimray.families.classifier.spec import count_params

from ..conftest import DIGITS_CNN
from tests.families.classifier.test_spec import SPECS


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("spec", [SPECS[0], SPECS[2]], ids=["cnn", "mlp"])
def test_ratio_removes_that_share_of_channels(spec, ratio):
    torch.manual_seed(0)
    model = build_model(spec)
    before_ch, before_p = prunable_channels(model), count_params(model)
    example = torch.randn(1, 1, 28, 28) if spec.kind == "cnn" else torch.randn(1, 784)
    prune(model, PruneSpec(ratio=ratio), example_inputs=example)
    after_ch, after_p = prunable_channels(model), count_params(model)
    assert abs((before_ch - after_ch) / before_ch - ratio) < 0.05
    assert after_p < before_p * (1 - ratio) + 1e-9  # interior layers lose inputs and outputs
    assert model(example).shape[-1] == spec.num_classes  # the output layer is kept whole


def test_round_to_keeps_widths_multiples():
    model = build_model(SPECS[0])
    prune(model, PruneSpec(ratio=0.3, round_to=8), example_inputs=torch.randn(1, 1, 28, 28))
    spec = spec_from_model(model, SPECS[0])
    assert all(c % 8 == 0 for c in spec.conv_channels + spec.fc_hidden)


def test_zero_ratio_is_identity():
    model = build_model(DIGITS_CNN)
    ref = copy.deepcopy(model.state_dict())
    prune(model, PruneSpec(ratio=0.0), example_inputs=torch.randn(1, 1, 8, 8))
    assert all(torch.equal(ref[k], v) for k, v in model.state_dict().items())


def test_pruned_model_rebuilds_from_safetensors_and_spec(tmp_path, digits, trained_digits_cnn):
    model = copy.deepcopy(trained_digits_cnn)
    prune(model, PruneSpec(ratio=0.5), example_inputs=torch.zeros(1, 1, 8, 8))
    spec = spec_from_model(model, DIGITS_CNN)
    assert spec.conv_channels == [8, 16] and spec.fc_hidden == [32]
    save_artifact(tmp_path / "p", model, ArtifactSpec(name="p", model=spec, input=digits.input, prune=PruneSpec(ratio=0.5)))
    assert not list(tmp_path.glob(".p*")), "no temporary folders left behind"
    rebuilt, rspec = load_artifact(tmp_path / "p")
    x, _ = digits.normalized("test")
    with torch.inference_mode():
        assert torch.equal(rebuilt(x), model.eval()(x))
    assert rspec.model == spec and count_params(rebuilt) == count_params(model)
    assert isinstance(rebuilt.features[0], nn.Conv2d) and rebuilt.features[0].out_channels == 8


def test_taylor_importance_prunes_by_gradients(digits, trained_digits_cnn):
    from slimray.compress.measure import accuracy

    x_tr, y_tr = digits.normalized("train")
    x, y = digits.normalized("test")
    batches = [(x_tr[i : i + 128], y_tr[i : i + 128]) for i in range(0, 1024, 128)]
    model = copy.deepcopy(trained_digits_cnn)
    before = prunable_channels(model)
    prune(model, PruneSpec(ratio=0.5, importance="taylor"), example_inputs=x[:1], gradient_batches=batches)
    assert abs((before - prunable_channels(model)) / before - 0.5) < 0.05
    assert all(p.grad is None for p in model.parameters())  # gradients are not left behind
    assert model(x[:2]).shape == (2, 10) and accuracy(model, x, y) > 10.0
    with pytest.raises(ValueError, match="gradient_batches"):
        prune(copy.deepcopy(trained_digits_cnn), PruneSpec(ratio=0.5, importance="taylor"), example_inputs=x[:1])
