"""The compression search for causal LMs: one Ray Tune trial per (model, quantization, runtime), on the shared
Tune engine (``slimray.sweep.engine.run_tuner``).

A trial (1 CPU, 1 torch thread) loads a float model folder (the teacher, or a distilled student), writes the
artifact this candidate would be into a temporary folder to count its bytes on disk (``artifacts.save_lm``: int8
methods store int8 weights + per-channel scales), quantizes the model, then measures perplexity and top-1
agreement with the teacher on the held-out evaluation windows, prefill tokens/s and batch-1 decode tokens/s in the
candidate's runtime. Trials run ``max_concurrent_trials`` at once, so their speeds are a first pass: the driver
re-times the finalists side by side (``slimray.pipelines.causal_lm``). A trial whose result file exists is not
rerun; a failing trial leaves ``trials/<key>.error.json`` and the search goes on.
"""

from __future__ import annotations

import json
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from slimray.artifacts import write_json_atomic


def candidate_key(model: str, quant: str, runtime: str) -> str:
    return f"{model}-{quant}-{runtime}"


def measure_candidate(*, model_dir: str, model_name: str, quant: str, runtime: str, keep_float: list[str],
                      windows: torch.Tensor, reference_argmax: torch.Tensor, search: dict[str, Any],
                      tmp_root: str | Path) -> dict[str, Any]:
    """One candidate's row (pure torch; see the module doc)."""
    from slimray.families.causal_lm.artifacts import LMArtifactMeta, compact_storage, load_lm, save_lm
    from slimray.families.causal_lm.evaluate import (
        decode_tokens_per_s, dir_size_bytes, perplexity_and_agreement, prefill_tokens_per_s)
    from slimray.families.causal_lm.quantize import quantize_lm

    t0 = time.perf_counter()
    model, tokenizer, _ = load_lm(model_dir)
    meta = LMArtifactMeta(quant_method=quant, keep_float=keep_float, runtime=runtime,
                          storage=compact_storage(quant))
    Path(tmp_root).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=tmp_root) as d:
        size = dir_size_bytes(save_lm(model, tokenizer, Path(d) / "candidate", meta=meta))
    num_params = sum(p.numel() for p in model.parameters())
    model = quantize_lm(model, method=quant, keep_float=keep_float, inplace=True)
    ppl, agree = perplexity_and_agreement(model, windows, reference_argmax=reference_argmax)
    prefill = prefill_tokens_per_s(model, prompt_len=search["prefill_len"], num_repeats=search["num_repeats"])
    decode = decode_tokens_per_s(model, runtime=runtime, batch_size=1, num_new_tokens=search["num_new_tokens"],
                                 num_repeats=search["num_repeats"])
    return {
        "key": candidate_key(model_name, quant, runtime), "status": "ok", "model": model_name, "model_dir": model_dir,
        "quantization": quant, "runtime": runtime, "storage": meta.storage, "keep_float": keep_float,
        "num_layers": int(model.config.num_hidden_layers), "params": int(num_params),
        "perplexity": ppl, "top1_agreement": agree, "prefill_tokens_per_s": prefill, "decode_tokens_per_s_b1": decode,
        "size_bytes": size, "trial_seconds": time.perf_counter() - t0,
    }


def _trial(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    key = config["candidate"]
    model_name, quant, runtime = ctx["candidates"][key]
    trials = Path(ctx["run_dir"]) / "trials"
    out = trials / f"{key}.json"
    try:
        if out.exists():
            row = json.loads(out.read_text())
        else:
            ev = ray.get(ctx["eval_ref"])
            row = measure_candidate(model_dir=ctx["model_dirs"][model_name], model_name=model_name, quant=quant,
                                    runtime=runtime, keep_float=ctx["keep_float"], windows=ev["windows"],
                                    reference_argmax=ev["reference_argmax"], search=ctx["search"], tmp_root=trials / ".tmp")
            write_json_atomic(out, row)
        tune.report({"perplexity": row["perplexity"], "decode_tokens_per_s_b1": row["decode_tokens_per_s_b1"]})
    except Exception as err:  # a failing trial is recorded, the search goes on
        write_json_atomic(out.with_suffix(".error.json"), {"error": repr(err), "traceback": traceback.format_exc()})
        raise


def run_search(*, run_dir: Path, candidates: dict[str, tuple[str, str, str]], model_dirs: dict[str, str],
               windows: torch.Tensor, reference_argmax: torch.Tensor, search: dict[str, Any]) -> list[dict[str, Any]]:
    """Every candidate (key -> (model, quantization, runtime)) as one Tune trial; rows in ``candidates`` order, a
    failed candidate as a row with status ``error``."""
    from slimray.sweep.engine import make_tune_config, run_tuner

    ctx = {"run_dir": str(run_dir), "candidates": candidates, "model_dirs": model_dirs, "keep_float": search["keep_float"],
           "search": search, "eval_ref": ray.put({"windows": windows, "reference_argmax": reference_argmax})}
    todo = [k for k in candidates if not (run_dir / "trials" / f"{k}.json").exists()]
    if todo:
        run_tuner(
            tune.with_resources(tune.with_parameters(_trial, ctx=ctx), {"cpu": 1}),
            param_space={"candidate": tune.grid_search(todo)},
            tune_config=make_tune_config(algorithm="grid", num_samples=None, max_concurrent_trials=search["max_concurrent_trials"],
                                         metric="decode_tokens_per_s_b1", mode="max"),
            run_name="lm-search", storage_path=str((run_dir / "ray").resolve()), resume=True,
            describe=lambda c: c["candidate"],
        )
    rows = []
    for key, (model_name, quant, runtime) in candidates.items():
        f = run_dir / "trials" / f"{key}.json"
        if f.exists():
            rows.append(json.loads(f.read_text()))
            continue
        err = f.with_suffix(".error.json")
        msg = json.loads(err.read_text())["error"] if err.exists() else "trial did not finish"
        rows.append({"key": key, "status": "error", "model": model_name, "quantization": quant, "runtime": runtime, "error": msg})
    return rows
