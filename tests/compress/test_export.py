"""Exports agree with the torch model: ONNX (dynamic batch) in ONNX Runtime, torch.export programs, and the
runtimes a trial can pick (ONNX Runtime fp32 / static int8, torch.compile); runtime artifacts reload."""

from __future__ import annotations

import pytest
import torch

from slimray.families.classifier.artifacts import ArtifactSpec, artifact_bytes, load_artifact, load_runnable, save_artifact
from slimray.compress.export import check_outputs, export_onnx, export_program, load_program
from slimray.compress.measure import accuracy, peak_memory_bytes
from slimray.compress.quantize import QuantSpec, quantize
from slimray.compress.runtime import ONNX_FILE, OrtModel, RuntimeSpec, onnx_for

from ..conftest import DIGITS_CNN

# fp32 exports recompute the same arithmetic with other kernels: logits may differ in the last bits only
FP32_BOUND = 1e-4


@pytest.fixture(scope="module")
def held_out(digits):
    return digits.normalized("test")


def test_onnx_export_agrees_with_torch(tmp_path, held_out, trained_digits_cnn):
    x, _ = held_out
    path = export_onnx(trained_digits_cnn, x[:1], tmp_path / "m.onnx")
    ort = OrtModel(path, num_threads=1)
    check = check_outputs(trained_digits_cnn, ort, x)
    assert check["num_examples"] == len(x)
    assert check["class_agreement"] == 100.0 and check["max_abs_diff"] < FP32_BOUND, check
    for n in (1, 7, 300):  # the batch axis is dynamic
        assert ort(x[:n]).shape == (n, 10)


def test_torch_export_program_agrees_with_torch(tmp_path, held_out, trained_digits_cnn):
    x, _ = held_out
    path = export_program(trained_digits_cnn, x[:4], tmp_path / "m.pt2")
    program = load_program(path)
    check = check_outputs(trained_digits_cnn, program, x)
    assert check["class_agreement"] == 100.0 and check["max_abs_diff"] < FP32_BOUND, check
    assert program(x[:1]).shape == (1, 10) and program(x[:33]).shape == (33, 10)


def test_torch_int8_modules_refuse_onnx_with_a_clear_error(tmp_path, held_out, trained_digits_cnn):
    x, _ = held_out
    q = quantize(trained_digits_cnn, QuantSpec(method="static_int8"), calibration=[x[:64]])
    with pytest.raises(ValueError, match="quantize it in ONNX Runtime"):
        export_onnx(q, x[:1], tmp_path / "q.onnx")


def test_onnxruntime_static_int8_keeps_accuracy_and_shrinks(digits, held_out, trained_digits_cnn):
    x_tr, _ = digits.normalized("train")
    x, y = held_out
    fp32 = onnx_for(trained_digits_cnn, x[:1], method="none")
    int8 = onnx_for(trained_digits_cnn, x[:1], method="static_int8", calibration=[x_tr[i : i + 64] for i in range(0, 512, 64)])
    assert len(int8) < len(fp32) / 2
    ort8 = OrtModel(int8)
    assert accuracy(ort8, x, y) >= accuracy(trained_digits_cnn, x, y) - 1.5
    assert check_outputs(trained_digits_cnn, ort8, x)["class_agreement"] >= 97.0


@pytest.mark.parametrize("method", ["none", "static_int8"])
def test_onnxruntime_artifact_round_trip(method, tmp_path, digits, held_out, trained_digits_cnn):
    x_tr, _ = digits.normalized("train")
    x, _ = held_out
    graph = onnx_for(trained_digits_cnn, x[:1], method=method, calibration=[x_tr[:64]])
    spec = ArtifactSpec(name="ort", model=DIGITS_CNN, input=digits.input, quantization=QuantSpec(method=method), runtime=RuntimeSpec(name="onnxruntime"))
    save_artifact(tmp_path / "a", trained_digits_cnn, spec, extra_files={ONNX_FILE: graph})
    assert artifact_bytes(tmp_path / "a") == len(graph)  # the size that counts is what the runtime loads
    runnable, lspec = load_runnable(tmp_path / "a")
    assert isinstance(runnable, OrtModel) and lspec.runtime.name == "onnxruntime"
    assert torch.equal(runnable(x), OrtModel(graph)(x))
    torch_model, _ = load_artifact(tmp_path / "a")  # the float model the graph was made from
    with torch.inference_mode():
        assert torch.equal(torch_model(x), trained_digits_cnn(x))
    with pytest.raises(ValueError, match="needs its model.onnx"):
        save_artifact(tmp_path / "b", trained_digits_cnn, spec)


def test_torch_compile_runtime_matches_eager(tmp_path, digits, held_out, trained_digits_cnn):
    x, _ = held_out
    spec = ArtifactSpec(name="c", model=DIGITS_CNN, input=digits.input, runtime=RuntimeSpec(name="torch_compile"))
    save_artifact(tmp_path / "c", trained_digits_cnn, spec)
    runnable, _ = load_runnable(tmp_path / "c")
    with torch.inference_mode():
        assert torch.allclose(runnable(x[:64]), trained_digits_cnn(x[:64]), atol=1e-4)


def test_torchao_int8_artifact_stores_float_and_requantizes_at_load(tmp_path, digits, held_out, trained_digits_cnn):
    pytest.importorskip("torchao")
    x, y = held_out
    qspec = QuantSpec(method="torchao_int8_dynamic")
    q = quantize(trained_digits_cnn, qspec)
    assert accuracy(q, x, y) >= accuracy(trained_digits_cnn, x, y) - 1.5
    spec = ArtifactSpec(name="ao", model=DIGITS_CNN, input=digits.input, quantization=qspec)
    save_artifact(tmp_path / "ao", trained_digits_cnn, spec)
    loaded, _ = load_artifact(tmp_path / "ao")
    with torch.inference_mode():
        assert torch.equal(loaded(x), q(x))  # same float weights in, same int8 model out


def test_peak_memory_sees_an_allocation():
    peak, out = peak_memory_bytes(lambda: torch.ones(64, 1024, 1024).sum().item())  # 256 MiB
    assert out == 64 * 1024 * 1024
    if peak is not None:  # Linux with /proc/self/clear_refs
        assert peak >= 200 * 2**20
