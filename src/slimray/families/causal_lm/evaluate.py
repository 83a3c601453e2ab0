"""Held-out quality and speed of causal LMs (pure torch, no ray; call with 1 torch thread for stable numbers).

Quality, on windows from ``data.pack_windows`` (non-overlapping, so stride = window length): perplexity is
``exp`` of the mean next-token negative log-likelihood over every predicted token (each window predicts its
tokens 1..L-1 from the ones before it; the first token of a window is not scored). Top-1 agreement is the
fraction of those positions where the model's argmax equals the teacher's.

Speed, on fixed random prompts (seeded; content does not change the cost): prefill tokens/s is
``prompt_len / median(forward time)`` for one ``[1, prompt_len]`` forward; decode tokens/s at batch B is
``B * (N - 1) / median(t_N - t_1)``, where ``t_k`` is the time to prefill a short prompt and produce k tokens,
so the prefill is subtracted and only the one-token steps are counted. Decoding goes through a ``runtime``
session (``hf_eager`` is the teacher as given). Size on disk is the sum of a folder's files. Peak memory
(``probe_peak_memory``) is measured in a fresh process: the growth of its peak resident set (``VmHWM``) while it
loads the folder (quantizing it as asked) and generates 16 tokens; in the calling process the allocator keeps what
earlier work freed, so the growth there reads ~0 (it did, here).
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from slimray.compress.measure import torch_threads
from slimray.families.causal_lm.runtime import RuntimeName, greedy_decode, hf_generate, make_session
from slimray.schema import StrictModel

__all__ = ["LMEvaluation", "perplexity", "top1_agreement", "argmax_predictions", "perplexity_and_agreement", "prefill_tokens_per_s", "decode_tokens_per_s",
           "dir_size_bytes", "probe_peak_memory", "evaluate_lm"]


@torch.inference_mode()
def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids, use_cache=False).logits.float()


@torch.inference_mode()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, *, batch_size: int = 4) -> float:
    """Token-level perplexity over ``windows [N, L]`` (N*(L-1) predicted tokens)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        ids = windows[i:i + batch_size]
        logits = _logits(model, ids)[:, :-1]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total += nll.item()
        count += ids[:, 1:].numel()
    return math.exp(total / count)


@torch.inference_mode()
def top1_agreement(model: torch.nn.Module, teacher: torch.nn.Module, windows: torch.Tensor, *, batch_size: int = 4) -> float:
    """Fraction of predicted positions where ``model``'s next-token argmax equals ``teacher``'s."""
    model.eval()
    teacher.eval()
    same, count = 0, 0
    for i in range(0, len(windows), batch_size):
        ids = windows[i:i + batch_size]
        a = _logits(model, ids)[:, :-1].argmax(-1)
        b = _logits(teacher, ids)[:, :-1].argmax(-1)
        same += (a == b).sum().item()
        count += a.numel()
    return same / count


@torch.inference_mode()
def argmax_predictions(model: torch.nn.Module, windows: torch.Tensor, *, batch_size: int = 4) -> torch.Tensor:
    """The model's next-token argmax at every predicted position: int32 ``[N, L-1]`` (a teacher's, computed once)."""
    model.eval()
    return torch.cat([_logits(model, windows[i:i + batch_size])[:, :-1].argmax(-1).int()
                      for i in range(0, len(windows), batch_size)])


@torch.inference_mode()
def perplexity_and_agreement(model: torch.nn.Module, windows: torch.Tensor, *, reference_argmax: torch.Tensor | None = None,
                             batch_size: int = 4) -> tuple[float, float | None]:
    """``perplexity`` and ``top1_agreement`` in one pass, against a reference model's ``argmax_predictions``."""
    model.eval()
    total, count, same = 0.0, 0, 0
    for i in range(0, len(windows), batch_size):
        ids = windows[i:i + batch_size]
        logits = _logits(model, ids)[:, :-1]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
        count += ids[:, 1:].numel()
        if reference_argmax is not None:
            same += (logits.argmax(-1) == reference_argmax[i:i + batch_size].long()).sum().item()
    return math.exp(total / count), (same / count if reference_argmax is not None else None)


def _prompt(model: torch.nn.Module, *, batch_size: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (batch_size, length), generator=g)


@torch.inference_mode()
def prefill_tokens_per_s(model: torch.nn.Module, *, prompt_len: int = 256, num_repeats: int = 3, seed: int = 0) -> float:
    """Tokens/s of one forward over a ``[1, prompt_len]`` prompt (median of ``num_repeats`` after a warm-up)."""
    ids = _prompt(model, batch_size=1, length=prompt_len, seed=seed)
    model(ids, use_cache=False, logits_to_keep=1)
    times = []
    for _ in range(num_repeats):
        t0 = time.perf_counter()
        model(ids, use_cache=True, logits_to_keep=1)
        times.append(time.perf_counter() - t0)
    return prompt_len / statistics.median(times)


def decode_tokens_per_s(model: torch.nn.Module, *, runtime: RuntimeName = "hf_eager", batch_size: int = 1,
                        num_new_tokens: int = 32, prompt_len: int = 16, num_repeats: int = 3, seed: int = 0) -> float:
    """Generated tokens/s (all rows together) of the one-token decode steps, prefill subtracted (see module doc)."""
    if num_new_tokens < 2:
        raise ValueError("num_new_tokens must be at least 2")
    ids = _prompt(model, batch_size=batch_size, length=prompt_len, seed=seed)
    if runtime == "hf_eager":
        def run(n: int) -> None:
            hf_generate(model, ids, num_new_tokens=n)
    else:
        session = make_session(model, runtime, max_cache_len=prompt_len + num_new_tokens, batch_size=batch_size)

        def run(n: int) -> None:
            greedy_decode(session, ids, num_new_tokens=n)
    run(num_new_tokens)  # warm-up (and compile)
    t1, tn = [], []
    for _ in range(num_repeats):
        for n, acc in ((1, t1), (num_new_tokens, tn)):
            t0 = time.perf_counter()
            run(n)
            acc.append(time.perf_counter() - t0)
    total = statistics.median(tn)
    step_time = total - statistics.median(t1)
    if step_time <= 0.05 * total:  # timing noise swamps the steps (a few tokens of a tiny model): count the whole
        return batch_size * num_new_tokens / total  # run, prefill included, a lower bound instead of a huge ratio
    return batch_size * (num_new_tokens - 1) / step_time


def dir_size_bytes(path: str | Path) -> int:
    """Bytes of all files under ``path`` (a model folder as saved)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


_PROBE = """
import json, sys, torch
from slimray.compress.measure import peak_memory_bytes
torch.set_num_threads(1)
path, method, keep = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
def run():
    if method == "artifact":  # a slimray artifact as it is served: load_lm applies its storage and quantization
        from slimray.families.causal_lm.artifacts import load_lm
        from slimray.families.causal_lm.runtime import hf_generate

        model = load_lm(path)[0]
        ids = torch.randint(3, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
        hf_generate(model, ids, num_new_tokens=16)
        return
    from slimray.families.causal_lm.quantize import quantize_lm
    from slimray.families.causal_lm.runtime import hf_generate
    from slimray.families.causal_lm.teacher import load_causal_lm

    model, _ = load_causal_lm(path, with_tokenizer=False)
    if method != "none":
        model = quantize_lm(model, method=method, keep_float=keep, inplace=True)
    ids = torch.randint(3, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    hf_generate(model, ids, num_new_tokens=16)

import transformers, slimray.families.causal_lm.quantize  # noqa: imported before the baseline
print(json.dumps({"peak_memory_bytes": peak_memory_bytes(run)[0]}))
"""


def probe_peak_memory(folder: str | Path, *, quant_method: str = "none", keep_float: tuple[str, ...] = (),
                      timeout_s: float = 600.0) -> int | None:
    """Peak resident-set growth (bytes) of loading ``folder`` (+ quantizing) and generating 16 tokens, measured in a
    fresh process; ``None`` where the platform cannot measure it. ``quant_method="artifact"``: the folder is a
    slimray artifact loaded with ``artifacts.load_lm`` (its own storage and quantization)."""
    out = subprocess.run([sys.executable, "-c", _PROBE, str(folder), quant_method, json.dumps(list(keep_float))],
                         capture_output=True, text=True, timeout=timeout_s, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        from slimray.compress.memprobe import failure_cause

        raise RuntimeError(f"memory probe of {Path(folder).name} failed in a fresh process: {failure_cause(out.stderr, out.returncode)}")
    return json.loads(lines[-1])["peak_memory_bytes"]


class LMEvaluation(StrictModel):
    """One model's figures; speeds in tokens/s, ``None`` where not measured."""

    perplexity: float
    num_windows: int
    window_len: int
    top1_agreement: float | None = None
    prefill_tokens_per_s: float | None = None
    decode_tokens_per_s_b1: float | None = None
    decode_tokens_per_s_b8: float | None = None
    runtime: str = "hf_eager"
    size_bytes: int | None = None
    peak_memory_bytes: int | None = None


def evaluate_lm(model: torch.nn.Module, windows: torch.Tensor, *, teacher: torch.nn.Module | None = None,
                runtime: RuntimeName = "hf_eager", folder: str | Path | None = None, speed: bool = True,
                quant_method: str = "none", keep_float: tuple[str, ...] = (),
                prefill_len: int = 256, num_new_tokens: int = 32, num_threads: int = 1,
                decode_batch_sizes: tuple[int, ...] = (1, 8)) -> LMEvaluation:
    """Perplexity (+ agreement with ``teacher``), prefill/decode speed in ``runtime``, and for a ``folder`` its size
    and the peak memory of serving it (fresh process, ``quant_method`` / ``keep_float`` applied at load);
    deterministic given the inputs (random prompts are seeded)."""
    with torch_threads(num_threads):
        result = {"perplexity": perplexity(model, windows), "num_windows": len(windows), "window_len": windows.shape[1],
                  "runtime": runtime}
        if teacher is not None:
            result["top1_agreement"] = top1_agreement(model, teacher, windows)
        if speed:
            result["prefill_tokens_per_s"] = prefill_tokens_per_s(model, prompt_len=prefill_len)
            for b in decode_batch_sizes:
                if b in (1, 8):
                    result[f"decode_tokens_per_s_b{b}"] = decode_tokens_per_s(
                        model, runtime=runtime, batch_size=b, num_new_tokens=num_new_tokens)
        if folder is not None:
            result["size_bytes"] = dir_size_bytes(folder)
            result["peak_memory_bytes"] = probe_peak_memory(folder, quant_method=quant_method, keep_float=keep_float)
    return LMEvaluation(**result)
