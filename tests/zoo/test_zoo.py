"""The model zoo: architectures users bring (timm and torchvision, random init, 32x32 inputs; a ViT written on
``nn.TransformerEncoder``), each taken through what a run does to it: the student derived by structured pruning
(attention heads, depthwise/grouped convs, LayerNorm, squeeze-excite), rebuilt from its recorded structure; then a
pruned + quantized trial in each runtime (torch dynamic int8, ONNX Runtime fp32 and static int8), saved as the
sweep saves it, loaded as a replica loads it, checked against the torch model and served over the HTTP app with
the same answer as in-process.

``make test`` runs the fast subset (a depthwise + squeeze-excite CNN, a timm ViT; ``tests/compress/test_attention.py``
covers ``nn.TransformerEncoder`` there); the rest are ``long``. Serving goes through the replica's FastAPI app in-process (``ModelServer`` +
``build_api``); the user-ViT end-to-end test in ``tests/byom`` serves through Ray Serve.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from slimray.families.classifier.artifacts import ArtifactSpec, load_artifact, load_runnable, save_artifact
from slimray.compress.export import check_outputs
from slimray.compress.prune import PruneSpec, attention_heads, prune, prune_to_fraction
from slimray.compress.quantize import QuantSpec, quantize
from slimray.config import SearchConfig
from slimray.families.classifier.spec import InputSpec, ModuleSpec, build_model, count_params, spec_from_model
from slimray.serving.options import ServeOptions
from slimray.serving.model import ModelServer
from slimray.serving.protocols import build_api
from slimray.families.classifier.search import save_trial

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoo_models import ZOO  # noqa: E402

FAST = ("timm-mobilenetv3_small_050", "timm-vit_tiny_patch16")  # nn.TransformerEncoder: tests/compress/test_attention.py
TRIALS = (("dynamic_int8", "torch"), ("none", "onnxruntime"), ("static_int8", "onnxruntime"))


def zoo_params():
    return [pytest.param(k, id=k, marks=() if k in FAST else (pytest.mark.long,)) for k in ZOO]


def teacher_spec(arch: str) -> tuple[ModuleSpec, InputSpec]:
    factory, kwargs, code_dir, shape = ZOO[arch]
    return ModuleSpec(factory=factory, kwargs=kwargs, code_dir=str(code_dir)), InputSpec(shape=shape, min_value=0.0, max_value=1.0)


def served_answer(model_dir: Path, x: torch.Tensor) -> dict:
    server = ModelServer(ServeOptions(model_dir=str(model_dir), name="zoo", max_batch_examples=64))
    with TestClient(build_api(server, api_key=None)) as client:
        r = client.post("/v1/predict", json={"inputs": x.tolist()})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("arch", zoo_params())
def test_architecture_is_derived_pruned_quantized_exported_and_served(arch, tmp_path):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    mspec, ispec = teacher_spec(arch)
    teacher = build_model(mspec).eval()
    x = torch.rand(16, *ispec.shape)
    calib = [torch.rand(8, *ispec.shape) for _ in range(2)]

    # derive: pruned to about half its parameters, recorded as structure, rebuilt from the factory
    student, reached = prune_to_fraction(copy.deepcopy(teacher).train(), keep=0.5, example_inputs=x[:1], tolerance=0.08, max_steps=5)
    assert 0.3 < reached["kept_fraction"] < 0.7
    student.eval()
    spec = ArtifactSpec(name="student", model=spec_from_model(student, mspec), input=ispec)
    save_artifact(tmp_path / "student", student, spec)
    rebuilt, spec = load_artifact(tmp_path / "student")
    with torch.inference_mode():
        torch.testing.assert_close(rebuilt(x), student(x))
    for m, heads in attention_heads(rebuilt).items():  # every attention block kept whole heads
        width = m.embed_dim if isinstance(m, torch.nn.MultiheadAttention) else m.out_features // 3
        assert width % heads == 0, (arch, width, heads)

    # one pruned trial per (quantization, runtime), saved and loaded as the sweep and a replica do
    ratio = 0.25
    pruned = prune(copy.deepcopy(rebuilt).train(), PruneSpec(ratio=ratio), example_inputs=x[:1]).eval()
    assert count_params(pruned) < count_params(rebuilt)
    pspec = spec.model_copy(update={"model": spec_from_model(pruned, spec.model), "prune": PruneSpec(ratio=ratio)})
    search = SearchConfig()
    for method, runtime in TRIALS:
        out = tmp_path / f"prune{ratio}-{method}-{runtime}"
        qmodel = quantize(pruned, QuantSpec(method=method), calibration=calib) if runtime != "onnxruntime" else pruned
        save_trial(out, pruned, qmodel, pspec, search, method=method, runtime=runtime, example=x, calib=calib)
        runnable, _ = load_runnable(out)
        with torch.inference_mode():
            got, ref = runnable(x).float(), pruned(x)
        assert got.shape == ref.shape and bool(torch.isfinite(got).all()), (method, runtime)
        if method == "none":  # the exported graph computes what torch computes
            check = check_outputs(pruned, runnable, x)
            assert check["max_abs_diff"] <= 1e-3 * max(1.0, float(ref.abs().max())), check
        answer = served_answer(out, x)
        probs = got.softmax(1)
        np.testing.assert_allclose(np.array(answer["probabilities"]), probs.numpy(), atol=1e-4, rtol=1e-3)
        # same class wherever the model's top two differ beyond float noise (random init can give near-equal logits)
        top2 = probs.topk(2, dim=1).values
        clear = ((top2[:, 0] - top2[:, 1]) > 1e-5).tolist()
        served = [p for p, c in zip(answer["predictions"], clear) if c]
        assert served == [p for p, c in zip(probs.argmax(1).tolist(), clear) if c], (method, runtime)
