"""Causal-LM artifacts (pure torch/transformers, no ray, no pickle): an HF folder (config + tokenizer + weights)
plus ``slimray_lm.json`` recording how slimray runs it: the quantization applied at load, the runtime, how the
weights are stored, and the reports that produced it (kept layers, widths, KD).

Storage (``LMArtifactMeta.storage``), given the float model:
- ``float``: ``model.safetensors`` as ``save_pretrained`` writes it (a ``bf16`` artifact in bfloat16): plain
  ``transformers`` loads the folder; int8 modules are rebuilt from the float weights at load.
- ``int8`` / ``int4``: a standard quantized HF folder in compressed-tensors (``ctformat``: W8A8 ``int-quantized``
  for the int8 methods, W4A16 asymmetric ``pack-quantized`` with groups of 32 for ``int4_weight_only``), the format
  vLLM and plain ``transformers`` (with the ``compressed-tensors`` package) load; layers kept float are the config's
  ``ignore``, and so is ``lm_head`` (vLLM's LM head takes no compressed-tensors scheme; the loader quantizes it
  from the stored float weights when the method does). ``load_lm`` rebuilds slimray's own modules from the stored codes one layer at a time
  (``_load_compact``), so the whole float model never exists (SmolLM2 token_int8: 552 MiB peak to load and
  generate, the float teacher 680, 1588 when the float model was built first). About a quarter of the float bytes
  for the Linear layers with int8, an eighth with int4.
- ``sparse`` / ``sparse_int8`` (a ``meta.sparsity`` other than none, see ``sparsity.py``):
  ``slimray_sparse.safetensors`` / ``slimray_sparse_int8.safetensors``: each pruned Linear weight (the model given
  is already pruned) as ``<name>.weight.sp24_values`` + ``<name>.weight.sp24_codes`` (2:4: kept values ``[out,
  in/2]`` and 2-bit positions, four per byte) or ``<name>.weight.spu_values`` + ``<name>.weight.spu_mask`` (the
  non-zero values and a bitmask, eight positions per byte); ``sparse_int8`` packs the int8 codes (zeros stay
  zero under the symmetric per-channel scale) and adds ``<name>.weight.scale``; layers kept dense are stored as for
  ``int8`` / the model (bf16 where the method is bf16), and so is a pruned layer whose packing would not be smaller
  (unstructured below 12.5% for int8, 6.25% for bf16, 3.1% for float32: the bitmask costs 1/8 byte a weight).
  ``load_lm`` rebuilds the dense weights on CPU, bit for bit. This packing is slimray's own (no engine reads it): a
  sparse winner is also written as a standard float folder (``export_hf``).

Written into a temporary sibling folder and renamed, so a folder that exists is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from safetensors.torch import save_file

from slimray.families.causal_lm import ctformat
from slimray.families.causal_lm.quantize import (
    LAYERWISE_METHODS, Int4WeightOnlyLinear, QuantMethod, linear_names, quantize_lm, quantize_linear,
    quantized_linear_names, replace_modules, untie_lm_head)
from slimray.families.causal_lm.runtime import ArtifactRuntime
from slimray.families.causal_lm.sparsity import (
    SPARSITY_RE, pack_2_4, pack_unstructured, parse_sparsity, sparse_linear_names, unpack_2_4, unpack_unstructured)
from slimray.families.causal_lm.teacher import load_causal_lm
from slimray.schema import StrictModel

META_FILE = "slimray_lm.json"
WEIGHTS = "model.safetensors"
LEGACY_FILES = ("slimray_int8.safetensors", "slimray_int4.safetensors")  # before compressed-tensors: no longer read
INT8_METHODS = ("dynamic_int8", "token_int8", "torchao_int8_weight_only", "torchao_int8_dynamic")
SPARSE_FILE = "slimray_sparse.safetensors"
SPARSE_INT8_FILE = "slimray_sparse_int8.safetensors"
WEIGHT_FILES = {"int8": WEIGHTS, "int4": WEIGHTS, "sparse": SPARSE_FILE, "sparse_int8": SPARSE_INT8_FILE}
SPARSE_INT8_METHODS = ("token_int8", "dynamic_int8")
SPARSE_FLOAT_METHODS = ("none", "bf16")


def compact_storage(method: str, *, sparsity: str = "none") -> str:
    """The smallest storage that rebuilds ``method``'s model: int4 for int4, int8 for int8 methods, else float;
    with a sparsity, ``sparse_int8`` for token/dynamic int8 and ``sparse`` for none/bf16 (others are refused)."""
    if sparsity != "none":
        if method in SPARSE_INT8_METHODS:
            return "sparse_int8"
        if method in SPARSE_FLOAT_METHODS:
            return "sparse"
        raise ValueError(f"quant_method {method!r} cannot be combined with sparsity {sparsity!r}; use one of "
                         f"{SPARSE_FLOAT_METHODS + SPARSE_INT8_METHODS}")
    return "int4" if method == "int4_weight_only" else ("int8" if method in INT8_METHODS else "float")


class LMArtifactMeta(StrictModel):
    """What ``slimray_lm.json`` holds."""

    format: Literal["slimray.causal_lm/1", "slimray.causal_lm/2"] = Field(
        "slimray.causal_lm/2", description="2: int8 / int4 in compressed-tensors (1: slimray's former files, refused at load)")
    quant_method: QuantMethod = "none"
    keep_float: list[str] = Field(default_factory=list)
    runtime: ArtifactRuntime = "hf_eager"
    storage: Literal["float", "int8", "int4", "sparse", "sparse_int8"] = Field(
        "float", description="how the weights are stored (see the module doc)")
    sparsity: str = Field("none", pattern=SPARSITY_RE.pattern, description="magnitude sparsity of the Linear layers (sparsity.py)")
    sparsity_keep_dense: list[str] = Field(["lm_head"], description="Linear layers left dense by the sparsity")
    reports: dict = Field(default_factory=dict, description="pruning / distillation reports, JSON-serialisable")


def _atomic_folder(out_dir: str | Path, write) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; artifacts are written once")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        write(tmp)
        os.rename(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def sparse_state(model: torch.nn.Module, *, meta: LMArtifactMeta) -> tuple[dict[str, torch.Tensor], bool]:
    """The tensors ``slimray_sparse*.safetensors`` hold for the pruned float ``model`` (see the module doc) and whether
    ``lm_head`` was stored on its own (pruned or int8: then the stored config is untied)."""
    kind, _ = parse_sparsity(meta.sparsity)
    sparse = set(sparse_linear_names(model, sparsity=meta.sparsity, keep_dense=meta.sparsity_keep_dense))
    int8 = set(linear_names(model, keep_float=meta.keep_float)) if meta.storage == "sparse_int8" else set()
    dtype = torch.bfloat16 if meta.quant_method == "bf16" else None
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    head_own = "lm_head" in sparse | int8
    for key, t in model.state_dict().items():
        module = key.rsplit(".", 1)[0]
        is_weight = key.endswith(".weight")
        if is_weight and module in sparse | int8:
            w = t.detach().float() if module in int8 else t.detach()
            if module in int8:
                scale = w.abs().amax(1).clamp(min=1e-8) / 127.0
                w = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
                out[f"{key}.scale"] = scale.contiguous()
            elif dtype is not None:
                w = w.to(dtype)
            packed = None
            if module in sparse:
                packed = pack_2_4(w) if kind == "2:4" else pack_unstructured(w)
                if packed[0].numel() * packed[0].element_size() + packed[1].numel() >= w.numel() * w.element_size():
                    packed = None  # the mask would cost more than the zeros save (low sparsity, int8): stored dense
            if packed is None:
                out[f"{key}.int8" if module in int8 else key] = w.contiguous()
            else:
                out[f"{key}.{'sp24' if kind == '2:4' else 'spu'}_values"] = packed[0]
                out[f"{key}.{'sp24_codes' if kind == '2:4' else 'spu_mask'}"] = packed[1]
            continue
        if t.data_ptr() in seen and not head_own:  # a tied copy (lm_head = embeddings): stored once
            continue
        seen.add(t.data_ptr())
        t = t.detach().clone()
        out[key] = (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous()
    return out, head_own


def save_lm(model: torch.nn.Module, tokenizer, out_dir: str | Path, *, meta: LMArtifactMeta | None = None) -> Path:
    """Write the float ``model`` + ``tokenizer`` + meta into ``out_dir`` atomically (``out_dir`` must not exist),
    the weights as ``meta.storage`` says (``int8`` needs an int8 ``meta.quant_method``, ``int4`` int4_weight_only)."""
    meta = meta or LMArtifactMeta()
    if meta.storage == "int8" and meta.quant_method not in INT8_METHODS:
        raise ValueError(f"storage int8 is for the int8 methods {INT8_METHODS}, not {meta.quant_method!r}")
    if meta.storage == "int4" and meta.quant_method != "int4_weight_only":
        raise ValueError(f"storage int4 is for int4_weight_only, not {meta.quant_method!r}")
    if meta.storage.startswith("sparse") and (meta.sparsity == "none" or compact_storage(meta.quant_method, sparsity=meta.sparsity) != meta.storage):
        raise ValueError(f"storage {meta.storage} needs a sparsity (got {meta.sparsity!r}) and a matching quant_method "
                         f"(got {meta.quant_method!r}; sparse: {SPARSE_FLOAT_METHODS}, sparse_int8: {SPARSE_INT8_METHODS})")
    if meta.sparsity != "none" and not meta.storage.startswith("sparse") and meta.storage != "float":
        raise ValueError(f"sparsity {meta.sparsity!r} is stored as sparse / sparse_int8 or float, not {meta.storage}")

    def write(tmp: Path) -> None:
        if meta.storage in ctformat.CT_FORMATS:
            # the LM head stays float in the file: vLLM's LM head takes no compressed-tensors scheme, and tied to the
            # embeddings it costs no bytes; load_lm quantizes it at load when the method does
            names = quantized_linear_names(model, method="int4_weight_only" if meta.storage == "int4" else "token_int8",
                                           keep_float=meta.keep_float)
            ctformat.write_compressed(model, tmp, storage=meta.storage, names=[n for n in names if n != "lm_head"])
        elif meta.storage in WEIGHT_FILES:
            import copy

            tensors, head_int8 = sparse_state(model, meta=meta)
            save_file(tensors, str(tmp / WEIGHT_FILES[meta.storage]), metadata={"format": f"slimray.{meta.storage}-{meta.sparsity}/1"})
            config = copy.deepcopy(model.config)
            config.architectures = [type(model).__name__]  # what save_pretrained records; engines and checks read it
            if head_int8:
                config.tie_word_embeddings = False
            config.save_pretrained(tmp)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(tmp)
        elif meta.quant_method == "bf16":
            import copy

            copy.deepcopy(model).to(torch.bfloat16).save_pretrained(tmp)
        else:
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / META_FILE).write_text(meta.model_dump_json(indent=2) + "\n")

    return _atomic_folder(out_dir, write)


def export_hf(model: torch.nn.Module, tokenizer, out_dir: str | Path, *, dtype: torch.dtype = torch.float32) -> Path:
    """A standard HF folder (safetensors + config + tokenizer, no slimray files) of the float ``model`` in
    ``dtype``: what plain ``transformers``, vLLM or ``ray.serve.llm`` load. Atomic like ``save_lm``."""
    import copy

    def write(tmp: Path) -> None:
        m = model if dtype == next(model.parameters()).dtype else copy.deepcopy(model).to(dtype)
        m.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _atomic_folder(out_dir, write)


def load_meta(path: str | Path) -> LMArtifactMeta:
    f = Path(path) / META_FILE
    return LMArtifactMeta.from_dict(json.loads(f.read_text()), source=str(f)) if f.is_file() else LMArtifactMeta()


def _rebuild(stored, base: str, suffix: str, shape: torch.Size) -> torch.Tensor:
    """The dense float weight ``base`` from its stored parts (``stored.get_tensor``); ``suffix`` names the main part."""
    t = stored.get_tensor(f"{base}.{suffix}")
    if suffix in ("sp24_values", "spu_values"):
        w = (unpack_2_4(t, stored.get_tensor(f"{base}.sp24_codes"), shape=shape) if suffix == "sp24_values"
             else unpack_unstructured(t, stored.get_tensor(f"{base}.spu_mask"), shape=shape))
        return w.float() * stored.get_tensor(f"{base}.scale")[:, None] if w.dtype == torch.int8 else w
    assert suffix == "int8", suffix  # a sparse_int8 layer whose packing would not pay: int8 codes + scales
    return t.float() * stored.get_tensor(f"{base}.scale")[:, None]


def _release_freed_memory() -> None:
    """Give memory freed so far back to the OS (glibc ``malloc_trim``; a no-op elsewhere), so that rebuilding one
    float layer after another does not pile up freed heap pages in the process's resident set."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        import ctypes
        import ctypes.util

        try:
            _MALLOC_TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None
_MAIN_PARTS = ("int8", "sp24_values", "spu_values")
_SIDE_PARTS = ("scale", "sp24_codes", "spu_mask")


def _load_compact(path: Path, meta: LMArtifactMeta) -> tuple[torch.nn.Module, object, bool]:
    """``(model, tokenizer, quantized)`` from compact storage, one layer at a time: the model is built without
    initialising (untouched memory), the small tensors (embeddings, norms, float layers) are assigned as stored, and
    each compactly stored Linear is rebuilt in float and, for the ``LAYERWISE_METHODS``, replaced by its quantized
    module at once, so the whole float model never exists (``quantized``: the method is applied already)."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.initialization import no_init_weights

    from slimray.families.hf import read_hf_folder
    from slimray.families.causal_lm.teacher import SUPPORTED_MODEL_TYPES

    weights = path / WEIGHT_FILES[meta.storage]
    read_hf_folder(str(path), field="model folder", model_types=SUPPORTED_MODEL_TYPES, files=(weights.name,),
                   what="the causal_lm family")
    config = AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    if hasattr(config, "quantization_config"):  # compressed-tensors: slimray builds its own modules from the codes
        del config.quantization_config
    dtype = torch.bfloat16 if meta.quant_method == "bf16" else torch.float32
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    layerwise = meta.quant_method in LAYERWISE_METHODS
    targets = set(quantized_linear_names(model, method=meta.quant_method, keep_float=meta.keep_float)) if layerwise else set()
    head_at_load = meta.storage in ctformat.CT_FORMATS and "lm_head" in targets  # stored float (see save_lm)
    if head_at_load:
        targets.discard("lm_head")
    elif tied & {f"{n}.weight" for n in targets}:
        targets.discard("lm_head")  # tied to the embeddings: quantize_lm unties it after loading
        layerwise = False
    loaded: set[str] = set()

    def assign(key: str, t: torch.Tensor) -> None:
        if key not in expected:
            raise ValueError(f"{weights}: unexpected tensor {key!r}")
        if t.shape != expected[key]:
            raise ValueError(f"{weights}: {key!r} has shape {tuple(t.shape)}, the config says {tuple(expected[key])}")
        module_name, _, attr = key.rpartition(".")
        module = model.get_submodule(module_name)
        old = getattr(module, attr)
        t = t.to(old.dtype)
        if isinstance(old, torch.nn.Parameter):
            setattr(module, attr, torch.nn.Parameter(t, requires_grad=old.requires_grad))
        else:
            module._buffers[attr] = t
        loaded.add(key)

    with safe_open(str(weights), framework="pt") as stored:
        keys = list(stored.keys())
        compact = []  # (base, main part) of the compactly stored weights
        if meta.storage in ctformat.CT_FORMATS:  # compressed-tensors: int8 weights / packed int4 codes + their params
            layers = ctformat.compact_layers(keys, lambda k: stored.get_slice(k).get_dtype())
            compact = [(f"{m}.weight", kind) for m, kind in layers.items()]
            skip = {f"{m}.{p}" for m in layers for p in ("weight", *ctformat.SIDE_PARTS)}
        for key in keys:  # first the plain tensors: embeddings, norms, biases, layers kept float
            base, _, suffix = key.rpartition(".")
            if meta.storage in ctformat.CT_FORMATS:
                if key not in skip:
                    assign(key, stored.get_tensor(key))
            elif suffix in _MAIN_PARTS:
                compact.append((base, suffix))
            elif suffix not in _SIDE_PARTS or not base.endswith(".weight"):
                assign(key, stored.get_tensor(key))
    if tied:
        model.tie_weights()
    for base, suffix in compact:  # then each compact Linear: rebuilt, and quantized before the next one
        if base not in expected:
            raise ValueError(f"{weights}: unexpected tensor {base!r}")
        module_name = base.rsplit(".", 1)[0]
        with safe_open(str(weights), framework="pt") as stored:  # reopened: the file's pages read so far are unmapped
            if meta.storage == "int4":  # the stored codes as they are (no float weight, no re-quantization)
                if not (layerwise and module_name in targets):
                    raise ValueError(f"{weights}: {module_name} is stored int4 but {meta.quant_method} does not quantize it")
                codes = ctformat.read_int4(stored, module_name)
                replace_modules(model, [module_name], lambda linear: Int4WeightOnlyLinear.from_codes(*codes, bias=linear.bias))
                loaded.add(base)
                continue
            if meta.storage == "int8":
                q, scale = ctformat.read_int8(stored, module_name)
                assign(base, q.float() * scale[:, None])
            else:
                assign(base, _rebuild(stored, base, suffix, expected[base]))
        if layerwise and module_name in targets:
            replace_modules(model, [module_name], lambda linear: quantize_linear(linear, method=meta.quant_method))
            _release_freed_memory()  # the float weight just dropped: glibc would keep it in its heap
    missing = set(expected) - loaded - tied
    if missing:
        raise ValueError(f"{weights}: missing {sorted(missing)}")
    if head_at_load:  # the method quantizes the LM head: from its float weights, as quantize_lm would
        untie_lm_head(model)
        replace_modules(model, ["lm_head"], lambda linear: quantize_linear(linear, method=meta.quant_method))
    # save_lm stores every layer the method quantizes compactly, so none of them is left in float here
    assert not layerwise or not any(isinstance(model.get_submodule(n), torch.nn.Linear) for n in targets), targets
    model.eval()
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    return model, tok, layerwise


def load_lm(path: str | Path):
    """``(model, tokenizer, meta)`` with the recorded quantization applied (eval mode); compact storage is rebuilt
    layer by layer (``_load_compact``)."""
    meta = load_meta(path)
    legacy = [f for f in LEGACY_FILES if (Path(path) / f).is_file()]
    if legacy:
        raise ValueError(f"{path}: {legacy[0]} is slimray's former private int8/int4 storage, no longer read (int8 and "
                         f"int4 are now stored in compressed-tensors): rerun the run with --fresh")
    if meta.storage in WEIGHT_FILES:
        model, tok, quantized = _load_compact(Path(path), meta)
    else:
        (model, tok), quantized = load_causal_lm(path), False
    if meta.quant_method != "none" and not quantized:
        model = quantize_lm(model, method=meta.quant_method, keep_float=meta.keep_float, inplace=True)
    return model, tok, meta
