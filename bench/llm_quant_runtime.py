"""SmolLM2-135M (30 layers) and a 20-layer student: perplexity and speed per quantization x runtime variant.

Perplexity on 8 held-out windows of 256 tokens (test split, seed 0, batch 1 so dynamic activation scales see one
window); prefill tokens/s at 256 tokens; decode tokens/s at batch 1 (32 new tokens after a 16-token prompt,
prefill subtracted; median of 3). 1 torch thread. Prints JSON lines; figures go to bench/llm_notes.md.

    nice -n 5 .venv/bin/python bench/llm_quant_runtime.py --model /tmp/slimray-llm/teacher --label teacher30
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import torch

from slimray.families.causal_lm import data as D
from slimray.families.causal_lm.evaluate import decode_tokens_per_s, perplexity, prefill_tokens_per_s
from slimray.families.causal_lm.quantize import quantize_lm
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
    ap.add_argument("--runtimes", default="hf_eager,static_compiled")
    ap.add_argument("--num-windows", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = load_causal_lm(args.model)
    splits = D.split_documents(D.load_wiki_summaries(), seed=0, val_fraction=0.05, test_fraction=0.05)
    windows = D.pack_windows(splits["test"], tok, window_len=256, num_windows=args.num_windows)
    for name in args.variants.split(","):
        t0 = time.perf_counter()
        q = quantize_lm(model, **VARIANTS[name])
        row = {"model": args.label, "variant": name, "layers": model.config.num_hidden_layers,
               "quantize_seconds": round(time.perf_counter() - t0, 1)}
        row["perplexity"] = round(perplexity(q, windows, batch_size=1), 2)
        row["prefill_tok_s_256"] = round(prefill_tokens_per_s(q, prompt_len=256), 1)
        for rt in args.runtimes.split(","):
            try:
                t0 = time.perf_counter()
                row[f"decode_b1_{rt}"] = round(decode_tokens_per_s(q, runtime=rt, batch_size=1, num_new_tokens=32), 1)
                row[f"decode_b1_{rt}_seconds"] = round(time.perf_counter() - t0, 1)
            except Exception as err:  # noqa: BLE001 - a variant that does not run in a runtime is a result too
                row[f"decode_b1_{rt}"] = f"error: {type(err).__name__}: {str(err)[:160]}"
                traceback.print_exc()
        print(json.dumps(row), flush=True)
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
