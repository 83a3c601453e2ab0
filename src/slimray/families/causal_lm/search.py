"""The causal-LM compression candidates, pure torch: the grid (model x sparsity x quantization x runtime), the key
of a candidate, how one candidate is built and measured into a row, and the advice for a failed one.

A candidate's trial (1 CPU, 1 torch thread, its own process: ``CausalLMRecipe.fresh_trial_process``) loads a float
model folder (the teacher, or a distilled student), prunes it to the candidate's sparsity (``sparsity.sparsify_lm``;
magnitude, no recovery training; sparse layers stored packed), writes the artifact this candidate would be into a
temporary folder to count its bytes on disk (``artifacts.save_lm``: int8 and int4 in compressed-tensors, as the
winner is stored), quantizes the model, then measures perplexity and top-1 agreement with the teacher on the held-out
evaluation windows, prefill tokens/s and batch-1 decode tokens/s in the candidate's runtime. Trials run several at
once, so their speeds are a first pass: the shared pipeline re-times the finalists side by side.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from slimray.families.causal_lm.vllm_engine import VLLM_QUANT_METHODS


def candidate_key(model: str, quant: str, runtime: str, sparsity: str = "none") -> str:
    """``model-quant-runtime``; a sparse candidate adds its tag: ``model-2of4-quant-runtime``."""
    if sparsity == "none":
        return f"{model}-{quant}-{runtime}"
    from slimray.families.causal_lm.sparsity import sparsity_tag

    return f"{model}-{sparsity_tag(sparsity)}-{quant}-{runtime}"


def candidate_grid(models: list[str], *, sparsities: list[str], quant_methods: list[str], runtimes: list[str],
                   compiled_quant_methods: list[str], sparse_quant_methods: list[str]) -> dict[str, tuple[str, str, str, str]]:
    """key -> (model, quantization, runtime, sparsity) for models x sparsities x runtimes x quant_methods, with
    ``static_compiled`` only for ``compiled_quant_methods``, a sparsity other than none only for
    ``sparse_quant_methods``, and ``vllm`` only for the dense folders vLLM loads (``VLLM_QUANT_METHODS``)."""
    out = {}
    for m in models:
        for sp in sparsities:
            for rt in runtimes:
                for q in quant_methods:
                    if rt == "static_compiled" and q not in compiled_quant_methods:
                        continue
                    if sp != "none" and q not in sparse_quant_methods:
                        continue
                    if rt == "vllm" and (q not in VLLM_QUANT_METHODS or sp != "none"):  # what vLLM loads as stored
                        continue
                    out[candidate_key(m, q, rt, sp)] = (m, q, rt, sp)
    return out


def measure_candidate(*, model_dir: str, model_name: str, quant: str, runtime: str, keep_float: list[str],
                      windows: torch.Tensor, reference_argmax: torch.Tensor, search: dict[str, Any],
                      tmp_root: str | Path, sparsity: str = "none",
                      sparsity_keep_dense: list[str] | tuple[str, ...] = ("lm_head",)) -> dict[str, Any]:
    """One candidate's row (pure torch; see the module doc)."""
    from slimray.families.causal_lm.artifacts import LMArtifactMeta, compact_storage, load_lm, save_lm
    from slimray.families.causal_lm.evaluate import (
        decode_tokens_per_s, dir_size_bytes, perplexity_and_agreement, prefill_tokens_per_s)
    from slimray.families.causal_lm.quantize import quantize_lm
    from slimray.families.causal_lm.sparsity import sparsify_lm, sparsity_report

    t0 = time.perf_counter()
    model, tokenizer, _ = load_lm(model_dir)
    sparse_report = None
    if sparsity != "none":
        model = sparsify_lm(model, sparsity=sparsity, keep_dense=sparsity_keep_dense, inplace=True)
        sparse_report = sparsity_report(model, sparsity=sparsity, keep_dense=sparsity_keep_dense)
        sparse_report.pop("dense_layers")
    meta = LMArtifactMeta(quant_method=quant, keep_float=keep_float, runtime=runtime,
                          storage=compact_storage(quant, sparsity=sparsity), sparsity=sparsity,
                          sparsity_keep_dense=list(sparsity_keep_dense))
    Path(tmp_root).mkdir(parents=True, exist_ok=True)
    num_params = sum(p.numel() for p in model.parameters())
    engine_load_s = None
    with tempfile.TemporaryDirectory(dir=tmp_root) as d:
        folder = save_lm(model, tokenizer, Path(d) / "candidate", meta=meta)
        size = dir_size_bytes(folder)
        if runtime == "vllm":  # the stored folder itself, in vLLM: what the winner would be served as
            from slimray.families.causal_lm.vllm_engine import VllmModel

            del model
            engine = VllmModel(folder, quant_method=quant, num_threads=1,
                               max_model_len=max(search["prefill_len"], windows.shape[1]) + search["num_new_tokens"] + 16)
            engine_load_s = engine.load_seconds
            ppl, agree = engine.perplexity_and_agreement(windows, reference_argmax=reference_argmax)
            prefill = engine.prefill_tokens_per_s(prompt_len=search["prefill_len"], num_repeats=search["num_repeats"])
            decode = engine.decode_tokens_per_s(batch_size=1, num_new_tokens=search["num_new_tokens"], num_repeats=search["num_repeats"])
            num_layers = int(engine.llm.llm_engine.model_config.hf_config.num_hidden_layers)
    if runtime != "vllm":
        num_layers = int(model.config.num_hidden_layers)
        model = quantize_lm(model, method=quant, keep_float=keep_float, inplace=True)
        ppl, agree = perplexity_and_agreement(model, windows, reference_argmax=reference_argmax)
        prefill = prefill_tokens_per_s(model, prompt_len=search["prefill_len"], num_repeats=search["num_repeats"])
        decode = decode_tokens_per_s(model, runtime=runtime, batch_size=1, num_new_tokens=search["num_new_tokens"],
                                     num_repeats=search["num_repeats"])
    return {
        "key": candidate_key(model_name, quant, runtime, sparsity), "status": "ok", "model": model_name, "model_dir": model_dir,
        "quantization": quant, "runtime": runtime, "sparsity": sparsity, "sparsity_report": sparse_report,
        "storage": meta.storage, "keep_float": keep_float,
        "num_layers": num_layers, "params": int(num_params), "engine_load_seconds": engine_load_s,
        "perplexity": ppl, "top1_agreement": agree, "prefill_tokens_per_s": prefill, "decode_tokens_per_s_b1": decode,
        "size_bytes": size, "trial_seconds": time.perf_counter() - t0,
    }


def trial_advice(error: str, *, quant: str, runtime: str) -> str:
    """What to change when a causal-LM trial fails (one line, for the console and the report)."""
    if "cpu_gemm_wna16" in error:
        return ("vLLM's CPU build has no int4 (W4A16) kernel on this CPU (its kernel needs AVX512): int4 runs in "
                "hf_eager here; leave int4_weight_only out or drop vllm from search.runtimes")
    if "Errno 28" in error or "no space left" in error.lower():
        return "the disk is full: free space under the run folder and resume the run"
    return f"leave {quant} out of search.quant_methods (or {runtime} out of search.runtimes)"
