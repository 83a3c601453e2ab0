"""Why a sweep trial failed, in one line a user can act on, and what to run instead when most trials fail.

A trial records the stage it was in (prune, fine-tune, quantize, export, memory probe, timing, evaluation);
``explain`` turns the exception and that stage into ``{"error", "where", "advice", "line"}``: the exception type
and message, the layer or operator it names (an ONNX operator, a module of the model, else the deepest frame
of the model's own code), and the setting to change. ``most_failed`` reads a finished sweep and, when more
than half its trials failed, says so and names the prune ratios, quantizations and runtimes that ran.
Pure python: no ray, no torch.
"""

from __future__ import annotations

import re
import traceback
from collections import Counter
from typing import Any

STAGES = ("prune", "finetune", "quantize", "export", "memory_probe", "timing", "evaluate")

_ONNX_OP = re.compile(r"operator '([\w:.]+)'")
_MODULE = re.compile(r"(?:layer|module|normalized_shape|embed_dim)\s*[=:]?\s*'?([\w.\[\]]+)'?", re.I)
_PRUNE_HEADS = re.compile(r"not divisible by num_heads|divide evenly by `num_heads`", re.I)


def _advice(stage: str, *, ratio: float, method: str, runtime: str, message: str) -> str:
    if _PRUNE_HEADS.search(message):
        return (f"prune ratio {ratio:g} breaks attention head widths: leave {ratio:g} out of search.space.prune_ratios "
                "or set search.space.round_to to a multiple of the head count")
    if stage == "prune":
        return f"this architecture cannot be pruned at {ratio:g}: leave {ratio:g} out of search.space.prune_ratios (0 is not pruned)"
    if stage == "finetune":
        return f"fine-tuning the model pruned at {ratio:g} failed: lower search.finetune_lr or leave {ratio:g} out of search.space.prune_ratios"
    if stage == "quantize":
        return f"quantization {method!r} does not apply to this model: leave {method!r} out of search.space.quantizations"
    if stage == "export":
        return (f"the model does not export for runtime {runtime!r}: leave {runtime!r} out of search.space.runtimes "
                "(or replace the operator named above in the model)")
    if stage == "memory_probe":
        return (f"the saved {method}@{runtime} artifact does not load and run in a fresh process: leave {method!r} or "
                f"{runtime!r} out of the search space")
    if "Errno 28" in message or "no space left" in message.lower():
        return "the disk is full: free space under the run folder and resume the run"
    return f"leave the setting {method}@{runtime} (prune {ratio:g}) out of the search space"


def _where(err: BaseException, message: str) -> str | None:
    op = _ONNX_OP.search(message)
    if op:
        return f"operator {op.group(1)}"
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if f.name == "forward" and "site-packages" not in f.filename and "/slimray/" not in f.filename]
    if frames:  # the model's own code (a user's forward), deepest frame
        f = frames[-1]
        return f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} in {f.name}"
    m = _MODULE.search(message)
    return m.group(0) if m else None


def explain(err: BaseException, *, stage: str, ratio: float, method: str, runtime: str) -> dict[str, str | None]:
    """One failed trial: ``error`` (type: message, first line), ``where`` (layer/operator), ``advice`` and ``line``."""
    if stage not in STAGES:
        raise ValueError(f"unknown trial stage {stage!r} (one of {STAGES})")
    message = " ".join(str(err).split())[:400]
    error = f"{type(err).__name__}: {message}" if message else type(err).__name__
    where = _where(err, message)
    advice = _advice(stage, ratio=ratio, method=method, runtime=runtime, message=message)
    line = f"prune {ratio:g} {method}@{runtime} failed at {stage}: {error[:200]}" + (f" [{where}]" if where else "") + f" -> {advice}"
    return {"error": error, "where": where, "stage": stage, "advice": advice, "line": line}


def most_failed(trials: list[dict[str, Any]]) -> str | None:
    """When more than half the trials failed: how many, and the settings that ran (or, if none ran, what to try)."""
    failed = [t for t in trials if t.get("status") != "ok"]
    if not trials or 2 * len(failed) <= len(trials):
        return None
    ok = [t for t in trials if t.get("status") == "ok"]
    head = f"{len(failed)} of {len(trials)} sweep trials failed"
    stages = Counter(t.get("stage") or "unknown" for t in failed)
    head += " (" + ", ".join(f"{n} at {s}" for s, n in stages.most_common()) + ")"
    if not ok:
        return head + ("; none ran: try search.space with prune_ratios [0.0], quantizations ['none'], runtimes ['torch'] "
                       "and read the first failure above")

    def values(key: str) -> list[Any]:
        return sorted({t.get(key, "torch" if key == "runtime" else None) for t in ok}, key=str)

    return (head + f"; settings that ran: prune_ratios {values('prune_ratio')}, quantizations {values('quantization')}, "
            f"runtimes {values('runtime')} (use these in search.space)")
