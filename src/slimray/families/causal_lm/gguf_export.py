"""GGUF out, for llama.cpp users: a causal-LM folder (a run's winner or any trial) written as one GGUF file with the
``gguf`` library, and read back to check it.

What is written, for Llama-architecture models (``llama``, ``mistral``: llama.cpp's ``llama`` graph):

- the weights, taken from the folder as plain ``transformers`` loads it (compressed-tensors int8/int4 winners are
  decompressed to float first, so a quantized winner is re-quantized into the GGUF type chosen here);
- 2-D weights in ``q8_0`` (default), ``q4_0``, ``f16``, ``bf16`` or ``f32``; a matrix whose rows do not split into
  the type's 32-value blocks falls back to f16, and norms stay f32, as llama.cpp's own converter does;
- the query and key projections re-ordered from Hugging Face's rotate-half layout to the interleaved one llama.cpp's
  rotary embedding expects (``transformers`` undoes this when it reads a GGUF back);
- the hyperparameters llama.cpp reads (``llama.*``), and the tokenizer: byte-level BPE only (the GPT-2 family:
  SmolLM, Llama 3, Qwen), tokens with their types, merges, special ids and the chat template (``gguf.SpecialVocab``).
  llama.cpp picks its pre-tokenizer regex by name; the name is derived from the tokenizer's pre-tokenizer
  (``gpt-2``, ``smollm``), else ``default`` and the check says so.

:func:`check_gguf` reads the file back through ``transformers``' GGUF loader (independent of this writer) and
compares it with the source on held-out windows: top-1 agreement, both perplexities, and whether the tokenizer
rebuilt from the GGUF encodes text to the same ids. Pure torch/transformers/gguf: no Ray.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from slimray.schema import ConfigError

GgufType = Literal["q8_0", "q4_0", "f16", "bf16", "f32"]
GGUF_TYPES: tuple[str, ...] = ("q8_0", "q4_0", "f16", "bf16", "f32")
GGUF_ARCH = {"llama": "llama", "mistral": "llama"}  # HF model_type -> llama.cpp architecture

# HF parameter name (under model.layers.N.) -> GGUF tensor name (under blk.N.)
_BLOCK_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _qtype(name: str):
    import gguf

    return {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0,
            "f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
            "f32": gguf.GGMLQuantizationType.F32}[name]


def _file_type(name: str):
    import gguf

    return {"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
            "f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
            "f32": gguf.LlamaFileType.ALL_F32}[name]


def interleave_rotary(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Rows of a q/k projection from rotate-half order (HF) to interleaved pairs (llama.cpp): within each head,
    row ``i`` of the first half and row ``i`` of the second half become rows ``2i`` and ``2i+1``."""
    rows = w.shape[0]
    assert rows % (2 * num_heads) == 0, (rows, num_heads)
    return w.reshape(num_heads, 2, rows // num_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def tokenizer_pre(tokenizer_json: dict) -> str:
    """The llama.cpp pre-tokenizer name for this tokenizer.json, read from its structure (not a guess by model name):
    byte-level alone is GPT-2's (``gpt-2``); individual digits then byte-level is SmolLM's; anything else ``default``."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    kind = pre.get("type")
    if kind == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if kind == "Sequence":
        steps = pre.get("pretokenizers") or []
        kinds = [s.get("type") for s in steps]
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
            return "smollm"
    return "default"


def _check_tokenizer(folder: Path) -> dict:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"GGUF export needs {path} (a fast byte-level BPE tokenizer)")
    data = json.loads(path.read_text())
    model = data.get("model") or {}
    decoder = (data.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or decoder != "ByteLevel":
        raise ConfigError(f"GGUF export handles byte-level BPE tokenizers (GPT-2 style: SmolLM, Llama 3, Qwen); "
                          f"{path} has model {model.get('type')!r} with decoder {decoder!r}")
    return data


def _tokens(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    import gguf

    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _encode(w: torch.Tensor, qtype: str) -> tuple[np.ndarray, Any, str]:
    """A tensor as GGUF data: (array, raw dtype or None, the type actually used)."""
    import gguf

    a = w.detach().to(torch.float32).cpu().numpy()
    if a.ndim < 2 or qtype == "f32":
        return a, None, "f32"
    if qtype in ("q8_0", "q4_0"):
        block = gguf.GGML_QUANT_SIZES[_qtype(qtype)][0]
        if a.shape[-1] % block:
            return a.astype(np.float16), None, "f16"
        return gguf.quants.quantize(a, _qtype(qtype)), _qtype(qtype), qtype
    if qtype == "bf16":
        return gguf.quants.quantize(a, _qtype("bf16")), _qtype("bf16"), "bf16"
    return a.astype(np.float16), None, "f16"


def _load_float(folder: Path):
    """The folder in plain transformers with float weights: compressed-tensors int8/int4 decompressed
    (``run_compressed=False``; the default keeps the int8 values and a scale)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    cfg = json.loads((folder / "config.json").read_text())
    method = (cfg.get("quantization_config") or {}).get("quant_method")
    extra = {"quantization_config": CompressedTensorsConfig(run_compressed=False)} if method == "compressed-tensors" else {}
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra).eval()


def write_gguf(folder: str | Path, out: str | Path, *, qtype: GgufType = "q8_0", name: str | None = None) -> dict[str, Any]:
    """Write ``folder`` (an HF causal-LM folder that plain transformers loads) as the GGUF file ``out``, atomically.

    Returns what was written: architecture, tensor types counted, tokenizer pre-tokenizer, bytes.
    """
    import gguf
    from transformers import AutoTokenizer

    folder, out = Path(folder), Path(out)
    if qtype not in GGUF_TYPES:
        raise ConfigError(f"gguf type {qtype!r}: one of {', '.join(GGUF_TYPES)}")
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"{folder} is not a model folder (no config.json)")
    model_type = json.loads(cfg_file.read_text()).get("model_type")
    if model_type not in GGUF_ARCH:
        raise ConfigError(f"GGUF export writes Llama-architecture models ({', '.join(GGUF_ARCH)}); {folder} is "
                          f"{model_type!r}: serve or export its HF folder instead")
    tok_json = _check_tokenizer(folder)
    model = _load_float(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    num_kv = c.num_key_value_heads or c.num_attention_heads
    rope_theta = getattr(c, "rope_theta", None) or (getattr(c, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    rope_type = (getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}).get("rope_type", "default")
    if rope_type not in ("default", None):
        raise ConfigError(f"GGUF export writes plain RoPE; {folder} uses rope_type {rope_type!r}")
    arch = GGUF_ARCH[model_type]
    pre = tokenizer_pre(tok_json)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.{os.getpid()}")
    counts: dict[str, int] = {}
    try:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name(name or folder.name)
        w.add_context_length(int(c.max_position_embeddings))
        w.add_embedding_length(int(c.hidden_size))
        w.add_block_count(int(c.num_hidden_layers))
        w.add_feed_forward_length(int(c.intermediate_size))
        w.add_head_count(int(c.num_attention_heads))
        w.add_head_count_kv(int(num_kv))
        w.add_rope_dimension_count(int(head_dim))
        if head_dim * c.num_attention_heads != c.hidden_size:
            w.add_key_length(int(head_dim))
            w.add_value_length(int(head_dim))
        w.add_rope_freq_base(float(rope_theta))
        w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
        w.add_vocab_size(int(c.vocab_size))
        w.add_file_type(_file_type(qtype))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        tokens, types = _tokens(tokenizer, int(c.vocab_size))
        w.add_token_list(tokens)
        w.add_token_types(types)
        gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)

        state = model.state_dict()
        tied = bool(getattr(c, "tie_word_embeddings", False))

        def put(gguf_name: str, t: torch.Tensor) -> None:
            if not t.is_floating_point():
                raise ConfigError(f"{folder}: {gguf_name} is stored as {t.dtype}; GGUF export reads float folders and "
                                  f"compressed-tensors ones (decompressed first)")
            data, raw, used = _encode(t, qtype)
            w.add_tensor(gguf_name, data, raw_dtype=raw)
            counts[used] = counts.get(used, 0) + 1

        put("token_embd.weight", state["model.embed_tokens.weight"])
        for i in range(c.num_hidden_layers):
            for hf, gg in _BLOCK_TENSORS.items():
                t = state[f"model.layers.{i}.{hf}"]
                if hf.startswith("self_attn.q_proj"):
                    t = interleave_rotary(t, c.num_attention_heads)
                elif hf.startswith("self_attn.k_proj"):
                    t = interleave_rotary(t, num_kv)
                put(f"blk.{i}.{gg}", t)
        put("output_norm.weight", state["model.norm.weight"])
        if not tied:
            put("output.weight", state["lm_head.weight"])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"format": "gguf", "architecture": arch, "gguf_type": qtype, "tensor_types": counts,
            "tokenizer_pre": pre, "bytes": out.stat().st_size, "source": str(folder)}


def check_gguf(folder: str | Path, gguf_file: str | Path, windows: torch.Tensor, *, texts: list[str] = (),
               llama_cpp: bool = False) -> dict[str, Any]:
    """Read ``gguf_file`` back with transformers' GGUF loader and compare it with ``folder`` on ``windows``
    ([N, T] token ids): next-token top-1 agreement (a fraction), both perplexities, and whether the tokenizer
    rebuilt from the GGUF encodes ``texts`` to the ids the folder's tokenizer gives. ``llama_cpp``: also run the file
    in llama.cpp when it is installed (:func:`check_llama_cpp`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slimray.families.causal_lm.evaluate import argmax_predictions, perplexity_and_agreement

    folder, gguf_file = Path(folder), Path(gguf_file)
    source = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    back = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32).eval()
    reference = argmax_predictions(source, windows)
    ppl_src, _ = perplexity_and_agreement(source, windows, reference_argmax=reference)
    ppl_gguf, agree = perplexity_and_agreement(back, windows, reference_argmax=reference)
    tok_src = AutoTokenizer.from_pretrained(folder)
    tok_gguf = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    same_ids = all(tok_src(t, add_special_tokens=False)["input_ids"] == tok_gguf(t, add_special_tokens=False)["input_ids"]
                   for t in texts)
    check = {"num_windows": int(windows.shape[0]), "window_len": int(windows.shape[1]),
             "top1_agreement": float(agree), "perplexity_source": float(ppl_src), "perplexity_gguf": float(ppl_gguf),
             "perplexity_ratio": float(ppl_gguf / ppl_src), "tokenizer_same_ids": bool(same_ids),
             "num_texts": len(texts)}
    if llama_cpp:
        check.update(check_llama_cpp(gguf_file, windows, reference))
    return check


def _model_folder(run_dir: Path, model: str | None) -> Path:
    """The winner (default; its plain float ``export/`` copy when the run wrote one), ``teacher``, or a student under
    ``students/`` (checked names: no path traversal)."""
    from slimray.schema import check_name

    if model is None:  # a winner in slimray's own sparse packing has a plain float copy in export/ beside it
        path = run_dir / "export" if (run_dir / "export" / "config.json").is_file() else run_dir / "winner"
    else:
        try:
            check_name(model, what="model")
        except ValueError as err:
            raise ConfigError(str(err)) from None
        path = run_dir / "teacher" if model == "teacher" else run_dir / "students" / model
    if not (path / "config.json").is_file():
        have = ["teacher"] + sorted(p.name for p in (run_dir / "students").glob("*") if (p / "config.json").is_file())
        raise ConfigError(f"no causal-LM folder at {path}; this run has the winner (default) and: {', '.join(have)}")
    return path


def _check_windows(run_dir: Path, tokenizer, *, num_windows: int = 8) -> tuple[torch.Tensor, list[str], str]:
    """Held-out windows of the run's own test split (its config.json), at most ``num_windows``; a run whose data file
    is gone is checked on the packaged Wikipedia summaries instead, and the check says so."""
    from slimray.families.causal_lm.data import load_jsonl_texts, load_wiki_summaries, pack_windows, split_documents

    d = json.loads((run_dir / "config.json").read_text()).get("data", {})
    source = "the run's test split"
    try:
        if d.get("source", "wiki") == "wiki":
            docs = load_wiki_summaries()
        else:
            docs = load_jsonl_texts(d["path"], text_field=d.get("text_field", "text"), group_field=d.get("group_field"))
    except (OSError, KeyError, ValueError, ConfigError):
        docs, source = load_wiki_summaries(), "the packaged Wikipedia summaries (the run's data file could not be read)"
    split = split_documents(docs, seed=d.get("seed", 0), val_fraction=d.get("val_fraction", 0.05),
                            test_fraction=d.get("test_fraction", 0.05))
    window_len = int(d.get("window_len", 256))
    windows = pack_windows(split["test"], tokenizer, window_len=window_len,
                           num_windows=min(num_windows, int(d.get("num_eval_windows", num_windows))))
    return windows, [doc.text[:400] for doc in split["test"][:4]], source


def check_llama_cpp(gguf_file: str | Path, windows: torch.Tensor, reference_argmax: torch.Tensor) -> dict[str, Any]:
    """llama.cpp (``llama-cpp-python``, when installed) loads the file and its next-token argmax on ``windows`` is
    compared with the source's; ``{"llama_cpp": "not installed"}`` otherwise."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return {"llama_cpp": "not installed (pip install llama-cpp-python; see docs/llm-vllm.md)"}
    n_ctx = int(windows.shape[1])
    llm = Llama(model_path=str(gguf_file), n_ctx=n_ctx, n_batch=n_ctx, n_threads=1, logits_all=True, verbose=False)
    same = count = 0
    for ids, ref in zip(windows.tolist(), reference_argmax):
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids) - 1])
        same += int((logits.argmax(-1) == ref.numpy()).sum())
        count += len(ids) - 1
    llm.close()
    return {"llama_cpp": "loaded", "llama_cpp_top1_agreement": same / count}


def export_lm_run(run_dir: str | Path, *, fmt: str, out: str | Path, trial: str | None = None,
                  gguf_type: GgufType = "q8_0") -> dict[str, Any]:
    """``slimray export RUN --format gguf`` for a causal-LM run: the winner (or ``--trial teacher`` / a student's
    name) as a GGUF file, then read back and compared with the folder on held-out text; the check is written
    beside it as ``OUT.check.json``."""
    from transformers import AutoTokenizer

    from slimray.storage import write_json_atomic

    run_dir, out = Path(run_dir), Path(out)
    if fmt != "gguf":
        raise ConfigError(f"--format {fmt}: a causal-LM run exports gguf (its winner folder is already the HF / "
                          f"compressed-tensors folder that vLLM and transformers load: {run_dir / 'winner'})")
    folder = _model_folder(run_dir, trial)
    info = write_gguf(folder, out, qtype=gguf_type, name=f"{run_dir.name}-{trial or 'winner'}")
    windows, texts, source = _check_windows(run_dir, AutoTokenizer.from_pretrained(folder))
    check = {**info, **check_gguf(folder, out, windows, texts=texts, llama_cpp=True), "data": source}
    check["summary"] = (f"check on {check['num_windows']} held-out windows of {check['window_len']} tokens: top-1 agreement "
                        f"{100 * check['top1_agreement']:.1f}%, perplexity {check['perplexity_gguf']:.2f} vs "
                        f"{check['perplexity_source']:.2f} ({check['perplexity_ratio']:.3f}x), tokenizer "
                        f"{'same ids' if check['tokenizer_same_ids'] else 'DIFFERENT ids'}"
                        + (f", llama.cpp agreement {100 * check['llama_cpp_top1_agreement']:.1f}%"
                           if "llama_cpp_top1_agreement" in check else f"; llama.cpp {check['llama_cpp']}"))
    write_json_atomic(out.with_name(out.name + ".check.json"), check)
    return check
