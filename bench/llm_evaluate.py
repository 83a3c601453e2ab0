"""``evaluate.evaluate_lm`` on the SmolLM2 teacher (fp32) and a student folder (optionally quantized): perplexity,
top-1 agreement with the teacher, prefill tok/s (256), decode tok/s at batch 1 and 8 (hf_eager), size on disk,
peak memory of a batch-1 generate. 1 thread; 4 test windows of 256. Prints JSON lines.

    nice -n 5 .venv/bin/python bench/llm_evaluate.py --teacher /tmp/slimray-llm/teacher --student /tmp/slimray-llm/student20
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from slimray.families.causal_lm import data as D
from slimray.families.causal_lm.evaluate import evaluate_lm
from slimray.families.causal_lm.quantize import quantize_lm
from slimray.families.causal_lm.teacher import load_causal_lm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--student", type=Path, required=True)
    ap.add_argument("--quant", default="token_int8")
    ap.add_argument("--num-windows", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    teacher, tok = load_causal_lm(args.teacher)
    student, _ = load_causal_lm(args.student, with_tokenizer=False)
    splits = D.split_documents(D.load_wiki_summaries(), seed=0, val_fraction=0.05, test_fraction=0.05)
    windows = D.pack_windows(splits["test"], tok, window_len=256, num_windows=args.num_windows)
    for label, model, folder, quant in (("teacher_fp32", teacher, args.teacher, "none"),
                                        (f"student_{args.quant}", quantize_lm(student, method=args.quant), args.student, args.quant)):
        r = evaluate_lm(model, windows, teacher=teacher, folder=folder, num_new_tokens=16, quant_method=quant)
        print(json.dumps({"model": label, **r.model_dump()}), flush=True)


if __name__ == "__main__":
    main()
