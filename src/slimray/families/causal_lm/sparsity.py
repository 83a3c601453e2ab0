"""Magnitude sparsity for the Linear layers of a causal LM (pure torch, no ray), and its compact storage.

Patterns (``SPARSITY_RE``: ``none``, ``2:4``, ``unstructured_<percent>``):
- ``2:4`` (semi-structured): in every group of 4 consecutive input weights of a row, the 2 largest ``|w|`` are
  kept and the other 2 set to zero (exactly 50%). Layers whose ``in_features`` is not a multiple of 4 stay dense.
- ``unstructured_<p>``: per layer, the ``round(p / 100 * numel)`` smallest ``|w|`` are set to zero.

``keep_dense`` names layers left dense (fnmatch on module names; ``lm_head`` by default in the config: SmolLM2's
head is tied to the embeddings, so pruning it would prune the embeddings too; when it is pruned it is untied first).

Sparse weights stay dense tensors with zeros on CPU: torch has no CPU kernel that makes them faster, so sparsity is
offered **for size on disk and for GPU speed**; no CPU speedup is claimed (trials still time them like any other).
On CUDA, ``to_semi_structured_gpu`` swaps 2:4 weights for ``torch.sparse.to_sparse_semi_structured`` tensors
(cuSPARSELt / CUTLASS kernels, fp16/bf16/int8, compute capability >= 8.0); not run on the CPU box.

Storage (``pack_2_4`` / ``pack_unstructured``, safetensors, no pickle): 2:4 as the kept values ``[n, k/2]`` (the
tensor's dtype) plus the 2-bit in-group position of each kept value, four codes per byte (``uint8``, flattened
row-major, padded); unstructured as the kept values (flat, row-major) plus a bitmask of the positions, eight per
byte (bit ``i`` of byte ``j`` is position ``8j + i``). Unpacking gives the identical dense tensor back. For float32
values both take 2.125 bytes per weight at 50% (vs 4 dense): ~0.53x for the pruned layers.
"""

from __future__ import annotations

import copy
import fnmatch
import re
from collections.abc import Sequence

import torch
from torch import nn

SPARSITY_RE = re.compile(r"^(none|2:4|unstructured_([1-9][0-9]?))$")


def parse_sparsity(name: str) -> tuple[str, float]:
    """``"none"`` -> ``("none", 0.0)``, ``"2:4"`` -> ``("2:4", 0.5)``, ``"unstructured_50"`` -> ``("unstructured", 0.5)``."""
    m = SPARSITY_RE.match(name)
    if m is None:
        raise ValueError(f"sparsity {name!r}: one of none, 2:4, unstructured_<percent 1..99>")
    if m.group(2) is not None:
        return "unstructured", int(m.group(2)) / 100.0
    return name, (0.5 if name == "2:4" else 0.0)


def sparsity_tag(name: str) -> str:
    """A file-name-safe tag: ``2:4`` -> ``2of4``, ``unstructured_50`` -> ``unstructured50``."""
    parse_sparsity(name)
    return name.replace(":", "of").replace("_", "")


def sparse_linear_names(model: nn.Module, *, sparsity: str, keep_dense: Sequence[str] = ()) -> list[str]:
    """The Linear layers ``sparsity`` prunes: not matching ``keep_dense``; for 2:4, ``in_features % 4 == 0``."""
    kind, _ = parse_sparsity(sparsity)
    if kind == "none":
        return []
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not any(fnmatch.fnmatchcase(name, p) for p in keep_dense)
            and (kind != "2:4" or m.in_features % 4 == 0)]


def mask_2_4(w: torch.Tensor) -> torch.Tensor:
    """Boolean mask keeping the 2 largest ``|w|`` of every group of 4 consecutive inputs (``w [n, k]``, ``k % 4 == 0``)."""
    n, k = w.shape
    if k % 4:
        raise ValueError(f"2:4 needs in_features % 4 == 0, got {k}")
    g = w.detach().float().abs().reshape(n, k // 4, 4)
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.topk(2, dim=-1).indices, True)
    return keep.reshape(n, k)


def mask_unstructured(w: torch.Tensor, *, fraction: float) -> torch.Tensor:
    """Boolean mask zeroing exactly ``round(fraction * numel)`` of the smallest ``|w|``."""
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction {fraction} must be in [0, 1)")
    flat = w.detach().float().abs().reshape(-1)
    num_zero = round(fraction * flat.numel())
    keep = torch.ones_like(flat, dtype=torch.bool)
    if num_zero:
        keep[flat.topk(num_zero, largest=False).indices] = False
    return keep.reshape(w.shape)


def _untie_head(model: nn.Module) -> None:
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and emb is not None and head.weight is emb.weight:
        head.weight = nn.Parameter(emb.weight.detach().clone())
        model.config.tie_word_embeddings = False


def sparsify_lm(model: nn.Module, *, sparsity: str, keep_dense: Sequence[str] = ("lm_head",),
                inplace: bool = False) -> nn.Module:
    """``model`` (or a copy) with its Linear weights magnitude-pruned to ``sparsity`` (zeros in dense tensors)."""
    model = model if inplace else copy.deepcopy(model)
    kind, fraction = parse_sparsity(sparsity)
    names = sparse_linear_names(model, sparsity=sparsity, keep_dense=keep_dense)
    if "lm_head" in names:
        _untie_head(model)
    with torch.no_grad():
        for name in names:
            w = model.get_submodule(name).weight
            mask = mask_2_4(w) if kind == "2:4" else mask_unstructured(w, fraction=fraction)
            w.mul_(mask.to(w.dtype))
    return model


def sparsity_report(model: nn.Module, *, sparsity: str, keep_dense: Sequence[str] = ("lm_head",)) -> dict:
    """Zero fraction of each pruned layer and over all of them (JSON-serialisable)."""
    names = sparse_linear_names(model, sparsity=sparsity, keep_dense=keep_dense)
    zeros = {n: int((model.get_submodule(n).weight == 0).sum()) for n in names}
    total = sum(model.get_submodule(n).weight.numel() for n in names)
    return {"sparsity": sparsity, "num_layers": len(names), "num_weights": total,
            "zero_fraction": (sum(zeros.values()) / total) if total else 0.0,
            "dense_layers": [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in zeros]}


def is_2_4(w: torch.Tensor) -> bool:
    """Every group of 4 consecutive inputs has at least 2 zeros."""
    n, k = w.shape
    return k % 4 == 0 and bool(((w.reshape(n, k // 4, 4) == 0).sum(-1) >= 2).all())


def pack_2_4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [n, k]`` already 2:4 sparse -> ``(values [n, k/2] in w's dtype, codes uint8 [ceil(n*k/8)])``."""
    n, k = w.shape
    if not is_2_4(w):
        raise ValueError(f"tensor [{n}, {k}] is not 2:4 sparse (a group of 4 inputs has more than 2 non-zeros)")
    g = w.detach().reshape(n, k // 4, 4)
    idx = g.float().abs().topk(2, dim=-1).indices.sort(-1).values  # the non-zeros (and zeros where fewer)
    values = g.gather(-1, idx).reshape(n, k // 2).contiguous()
    codes = idx.reshape(-1).to(torch.uint8)
    codes = torch.cat([codes, codes.new_zeros(-codes.numel() % 4)]).reshape(-1, 4)
    packed = codes[:, 0] | (codes[:, 1] << 2) | (codes[:, 2] << 4) | (codes[:, 3] << 6)
    return values, packed.contiguous()


def unpack_2_4(values: torch.Tensor, codes: torch.Tensor, *, shape: Sequence[int]) -> torch.Tensor:
    """The dense ``[n, k]`` tensor ``pack_2_4`` stored."""
    n, k = shape
    idx = torch.stack([(codes >> s) & 3 for s in (0, 2, 4, 6)], -1).reshape(-1)[: n * k // 2]
    idx = idx.to(torch.int64).reshape(n, k // 4, 2)
    dense = torch.zeros(n, k // 4, 4, dtype=values.dtype)
    return dense.scatter_(-1, idx, values.reshape(n, k // 4, 2)).reshape(n, k)


def pack_unstructured(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` -> ``(non-zero values, flat, row-major, in w's dtype; bitmask uint8 [ceil(numel/8)])``."""
    flat = w.detach().reshape(-1)
    mask = flat != 0
    bits = torch.cat([mask, mask.new_zeros(-mask.numel() % 8)]).reshape(-1, 8).to(torch.uint8)
    packed = (bits << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)
    return flat[mask].contiguous(), packed.contiguous()


def unpack_unstructured(values: torch.Tensor, bitmask: torch.Tensor, *, shape: Sequence[int]) -> torch.Tensor:
    """The dense tensor ``pack_unstructured`` stored."""
    numel = 1
    for s in shape:
        numel *= s
    mask = ((bitmask[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)[:numel].bool()
    if int(mask.sum()) != values.numel():
        raise ValueError(f"bitmask has {int(mask.sum())} positions, values {values.numel()}")
    dense = torch.zeros(numel, dtype=values.dtype)
    dense[mask] = values
    return dense.reshape(*shape)


class NeedsGPUError(RuntimeError):
    """A GPU-only path was asked for on a model that is not on CUDA."""


def to_semi_structured_gpu(model: nn.Module, *, keep_dense: Sequence[str] = ("lm_head",)) -> nn.Module:
    """Swap every 2:4-sparse Linear weight of a CUDA model (fp16 / bf16) for
    ``torch.sparse.to_sparse_semi_structured`` (in place), so matmuls use the sparse tensor-core kernels.
    Raises ``NeedsGPUError`` on a CPU model. Not run on the CPU box (no GPU there)."""
    param = next(model.parameters())
    if param.device.type != "cuda":
        raise NeedsGPUError(f"2:4 semi-structured kernels need a GPU (CUDA): the model is on {param.device.type}; "
                            "on CPU the 2:4 weights stay dense (smaller on disk, no CPU speedup)")
    from torch.sparse import to_sparse_semi_structured

    for name in sparse_linear_names(model, sparsity="2:4", keep_dense=keep_dense):
        lin = model.get_submodule(name)
        if is_2_4(lin.weight.detach()):
            lin.weight = nn.Parameter(to_sparse_semi_structured(lin.weight.detach()), requires_grad=False)
    return model
