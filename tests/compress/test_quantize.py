"""Quantized models keep accuracy on held-out data and reload bit-exactly from safetensors + spec."""

from __future__ import annotations

import pytest
import torch

from slimray.families.classifier.artifacts import ArtifactSpec, artifact_bytes, load_artifact, save_artifact
from slimray.compress.measure import accuracy, compare_latency, latency_ms
from slimray.compress.quantize import QuantSpec, quantize

from ..conftest import DIGITS_CNN

METHODS = ["none", "dynamic_int8", "static_int8", "bf16"]


@pytest.fixture(scope="module")
def baseline_accuracy(digits, trained_digits_cnn):
    x, y = digits.normalized("test")
    acc = accuracy(trained_digits_cnn, x, y)
    assert acc > 90.0, "the fixture model should be trained"
    return acc


@pytest.mark.parametrize("method", METHODS)
def test_quantized_keeps_accuracy(method, digits, trained_digits_cnn, baseline_accuracy):
    x_tr, _ = digits.normalized("train")
    x, y = digits.normalized("test")
    q = quantize(trained_digits_cnn, QuantSpec(method=method), calibration=[x_tr[i : i + 64] for i in range(0, 512, 64)])
    assert accuracy(q, x, y) >= baseline_accuracy - 1.5
    # the float model is left untouched
    assert all(p.dtype == torch.float32 for p in trained_digits_cnn.parameters())


@pytest.mark.parametrize("method", METHODS)
def test_quantized_artifact_round_trip(method, tmp_path, digits, trained_digits_cnn):
    x_tr, _ = digits.normalized("train")
    x, _ = digits.normalized("test")
    spec = QuantSpec(method=method)
    q = quantize(trained_digits_cnn, spec, calibration=[x_tr[:64], x_tr[64:128]])
    save_artifact(tmp_path / method, q, ArtifactSpec(name=method, model=DIGITS_CNN, input=digits.input, quantization=spec))
    loaded, lspec = load_artifact(tmp_path / method)
    assert lspec.quantization == spec
    with torch.inference_mode():
        assert torch.equal(loaded(x), q(x))


def test_int8_artifacts_are_smaller(tmp_path, digits, trained_digits_cnn):
    x_tr, _ = digits.normalized("train")
    sizes = {}
    for method in METHODS:
        q = quantize(trained_digits_cnn, QuantSpec(method=method), calibration=[x_tr[:64]])
        save_artifact(tmp_path / method, q, ArtifactSpec(name=method, model=DIGITS_CNN, input=digits.input, quantization=QuantSpec(method=method)))
        sizes[method] = artifact_bytes(tmp_path / method)
    assert sizes["static_int8"] < sizes["none"] / 2
    assert sizes["bf16"] < sizes["none"] * 0.6


def test_static_int8_needs_calibration(trained_digits_cnn):
    with pytest.raises(ValueError, match="calibration"):
        quantize(trained_digits_cnn, QuantSpec(method="static_int8"))


def test_latency_helpers_return_positive_medians(digits, trained_digits_cnn):
    x, _ = digits.normalized("test")
    assert latency_ms(trained_digits_cnn, x[:8], batch_size=64, num_repeats=3) > 0
    out = compare_latency({"a": trained_digits_cnn}, x[:8], batch_sizes=[1, 64], num_rounds=2, runs_per_round=2)
    assert set(out["a"]) == {1, 64} and all(v > 0 for v in out["a"].values())


def test_a_new_quantization_is_one_registered_function():
    """The registry is the one place: a method registered here is accepted by QuantSpec (JSON round trip) and
    applied by quantize(); an unknown one is refused naming the known ones; families keep their own handlers."""
    from pydantic import ValidationError

    from slimray.compress.quantize import QuantSpec, _QUANTIZERS, quant_methods, quantize, register_quantizer

    with pytest.raises(ValidationError, match="unknown quantization 'halved'.*known: none"):
        QuantSpec(method="halved")

    @register_quantizer("halved")
    def _halved(model, spec, calibration):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.5)
        return model

    try:
        spec = QuantSpec.model_validate_json(QuantSpec(method="halved").model_dump_json())
        model = torch.nn.Linear(3, 2)
        out = quantize(model, spec)
        assert torch.allclose(out.weight, model.weight * 0.5) and "halved" in quant_methods()
        assert "halved" not in quant_methods("sentence_encoder")
    finally:
        _QUANTIZERS.pop(("halved", "classifier"))
    import slimray.families.sentence_encoder.quantize  # noqa: F401  (registers the encoder's handlers)

    assert set(quant_methods("sentence_encoder")) == {"none", "bf16", "dynamic_int8", "torchao_int8_dynamic"}
