"""SmolLM2-135M (30 layers) and a 20-layer student: perplexity and speed per quantization x runtime variant.

Perplexity on 8 held-out windows of 256 tokens (test split, seed 0; batch 1, so dynamic activation scales see one
window). Speed, 1 torch thread: all variants are built first, then timed in interleaved rounds (A, B, C, A, B, C,
...); the other jobs on this shared 2-core machine (load average 5-11 during these runs) made single timings vary
up to 10x, so the figures are the fastest of the rounds (least disturbed; medians printed beside them). Per round:
prefill of a 256-token prompt; decode of 1 and of 32 new tokens after a 16-token prompt, decode tok/s =
31 / (t32 - t1). Compiled runtimes are compiled (and warmed) before the rounds. Prints JSON lines; figures go to
bench/llm_notes.md.

    nice -n 5 .venv/bin/python bench/llm_quant_runtime.py --model /tmp/slimray-llm/teacher --label teacher30
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from slimray.families.causal_lm import data as D
from slimray.families.causal_lm.evaluate import perplexity
from slimray.families.causal_lm.quantize import quantize_lm
from slimray.families.causal_lm.runtime import greedy_decode, hf_generate, make_session
from slimray.families.causal_lm.teacher import load_causal_lm

VARIANTS = {
    "fp32": dict(method="none"),
    "bf16": dict(method="bf16"),
    "dynamic_int8_all": dict(method="dynamic_int8"),
    "dynamic_int8_keep_down": dict(method="dynamic_int8", keep_float=["*.down_proj"]),
    "token_int8_all": dict(method="token_int8"),
    "token_int8_keep_lm_head": dict(method="token_int8", keep_float=["lm_head"]),
    "torchao_int8_wo": dict(method="torchao_int8_weight_only"),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--label", required=True)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--compiled", default="fp32,token_int8_all", help="variants also timed in static_compiled")
    ap.add_argument("--num-windows", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = load_causal_lm(args.model)
    splits = D.split_documents(D.load_wiki_summaries(), seed=0, val_fraction=0.05, test_fraction=0.05)
    windows = D.pack_windows(splits["test"], tok, window_len=256, num_windows=args.num_windows)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, model.config.vocab_size, (1, 16), generator=g)
    long_prompt = torch.randint(3, model.config.vocab_size, (1, 256), generator=g)
    built, rows = {}, {}
    for name in args.variants.split(","):
        t0 = time.perf_counter()
        q = quantize_lm(model, **VARIANTS[name])
        rows[name] = {"model": args.label, "variant": name, "layers": model.config.num_hidden_layers,
                      "perplexity": round(perplexity(q, windows, batch_size=1), 2)}
        runners = {"hf_eager": lambda n, q=q: hf_generate(q, prompt, num_new_tokens=n)}
        if name in args.compiled.split(","):
            s = make_session(q, "static_compiled", max_cache_len=64)
            t1 = time.perf_counter()
            greedy_decode(s, prompt, num_new_tokens=4)
            rows[name]["compile_seconds"] = round(time.perf_counter() - t1, 1)
            runners["static_compiled"] = lambda n, s=s: greedy_decode(s, prompt, num_new_tokens=n)
        built[name] = (q, runners)
        print(json.dumps({"built": name, "seconds": round(time.perf_counter() - t0, 1), **rows[name]}), flush=True)
    times: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        for name, (q, runners) in built.items():
            with torch.inference_mode():
                t0 = time.perf_counter()
                q(long_prompt, use_cache=True, logits_to_keep=1)
                times.setdefault((name, "prefill"), []).append(time.perf_counter() - t0)
            for rt, run in runners.items():
                t0 = time.perf_counter()
                run(1)
                t1 = time.perf_counter()
                run(32)
                t2 = time.perf_counter()
                times.setdefault((name, rt, 1), []).append(t1 - t0)
                times.setdefault((name, rt, 32), []).append(t2 - t1)
    for name, row in rows.items():
        row["prefill_tok_s_256"] = round(256 / min(times[(name, "prefill")]), 1)
        row["prefill_tok_s_256_median"] = round(256 / statistics.median(times[(name, "prefill")]), 1)
        for rt in built[name][1]:
            row[f"decode_b1_{rt}"] = round(31 / (min(times[(name, rt, 32)]) - min(times[(name, rt, 1)])), 1)
            row[f"decode_b1_{rt}_median"] = round(31 / (statistics.median(times[(name, rt, 32)]) - statistics.median(times[(name, rt, 1)])), 1)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
