"""Export a model to ONNX or to a ``torch.export`` program, and check the export against torch.

- ``export_onnx``: TorchScript-based exporter (``dynamo=False``; the dynamo exporter needs onnxscript)
  with a dynamic batch axis named ``batch``; input ``input``, output ``logits``.
- ``export_program``: ``torch.export.export`` with a dynamic batch dimension, saved with
  ``torch.export.save`` (a ``.pt2`` archive that ``torch.export.load`` reads back).
- ``check_outputs``: max absolute difference of the logits and agreement of predicted classes on
  held-out inputs, the figures recorded next to every export.

Both exporters run with the fused fast path of ``nn.TransformerEncoderLayer`` / ``nn.MultiheadAttention`` turned
off (``unfused_attention``): in eval mode those modules call ``aten::_transformer_encoder_layer_fwd`` /
``aten::_native_multi_head_attention``, which no ONNX opset has; unfused, they trace to plain matmuls and softmax
with the same outputs (``check_outputs`` compares them with the fused model's).

Quantized torch modules (FX int8) do not export to ONNX; int8 in ONNX comes from ONNX Runtime's own
static quantization of the float graph (``slimray.compress.runtime.quantize_onnx_static``).
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
ONNX_OPSET = 17


def _atomic_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _is_quantized(model: nn.Module) -> bool:
    return any(
        isinstance(t, torch.Tensor) and t.is_quantized for t in model.state_dict().values()
    ) or any("quantized" in type(m).__module__ for m in model.modules())


@contextlib.contextmanager
def unfused_attention() -> Iterator[None]:
    """Turn torch's fused multi-head-attention fast path off inside the block (restored after)."""
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(was)


def onnx_bytes(model: nn.Module, example: torch.Tensor, *, opset: int = ONNX_OPSET) -> bytes:
    """The ONNX encoding of a float model (eval mode), batch axis dynamic."""
    if _is_quantized(model):
        raise ValueError(
            "torch int8 modules do not export to ONNX; export the float model and quantize it in ONNX Runtime "
            "(runtime 'onnxruntime' with quantization 'static_int8')"
        )
    model = model.eval()
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad(), unfused_attention():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example[:1].float(),), buf, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, opset_version=opset, dynamo=False,
        )
    return buf.getvalue()


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, *, opset: int = ONNX_OPSET) -> Path:
    """Write ``model`` as ONNX to ``path`` atomically; returns the path."""
    path = Path(path)
    _atomic_bytes(path, onnx_bytes(model, example, opset=opset))
    return path


def export_program(model: nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """Write a ``torch.export`` program (dynamic batch) to ``path`` (``.pt2``) atomically."""
    path = Path(path)
    model = model.eval()
    x = example[:2].contiguous() if len(example) >= 2 else example.repeat(2, *([1] * (example.dim() - 1)))
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with warnings.catch_warnings(), unfused_attention():
        warnings.simplefilter("ignore")
        program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    buf = io.BytesIO()
    torch.export.save(program, buf)
    _atomic_bytes(path, buf.getvalue())
    return path


def load_program(path: str | Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """The saved program's module (call it like the model)."""
    return torch.export.load(str(path)).module()


@torch.inference_mode()
def check_outputs(
    reference: Callable[[torch.Tensor], torch.Tensor],
    candidate: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Compare two models' logits on ``x``: max abs difference and predicted-class agreement (%)."""
    max_diff, agree = 0.0, 0
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        a = torch.as_tensor(reference(xb)).float()
        b = torch.as_tensor(candidate(xb)).float()
        max_diff = max(max_diff, (a - b).abs().max().item())
        agree += int((a.argmax(1) == b.argmax(1)).sum())
    return {"num_examples": len(x), "max_abs_diff": max_diff, "class_agreement": 100.0 * agree / max(1, len(x))}
