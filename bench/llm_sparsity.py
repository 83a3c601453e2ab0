"""Magnitude sparsity on the SmolLM2 teacher (issue #17), no recovery training: held-out perplexity and top-1
agreement with the dense teacher for dense vs 2:4 vs unstructured, and the size on disk of each artifact
(``artifacts.save_lm``: float, int8, sparse, sparse_int8). Also checks that the packed folders reload to the very
same logits. 1 torch thread; CPU speed is not measured here (sparsity is for size and GPU speed). JSON lines.

    nice -n 19 .venv/bin/python bench/llm_sparsity.py --teacher /tmp/smollm-clone/runs/smollm/teacher --num-windows 8
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from slimray.families.causal_lm import data as D
from slimray.families.causal_lm.artifacts import LMArtifactMeta, compact_storage, load_lm, save_lm
from slimray.families.causal_lm.evaluate import argmax_predictions, dir_size_bytes, perplexity_and_agreement
from slimray.families.causal_lm.sparsity import sparsify_lm, sparsity_report
from slimray.families.causal_lm.teacher import load_causal_lm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--num-windows", type=int, default=8)
    ap.add_argument("--window-len", type=int, default=256)
    ap.add_argument("--sparsities", nargs="+", default=["none", "2:4", "unstructured_50"])
    ap.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()))
    args = ap.parse_args()
    torch.set_num_threads(1)
    teacher, tok = load_causal_lm(args.teacher)
    splits = D.split_documents(D.load_wiki_summaries(), seed=0, val_fraction=0.05, test_fraction=0.05)
    windows = D.pack_windows(splits["test"], tok, window_len=args.window_len, num_windows=args.num_windows)
    ref = argmax_predictions(teacher, windows)
    work = Path(tempfile.mkdtemp(prefix="slimray-sparsity-", dir=args.tmp))
    try:
        for sp in args.sparsities:
            t0 = time.perf_counter()
            model = teacher if sp == "none" else sparsify_lm(teacher, sparsity=sp)
            ppl, agree = perplexity_and_agreement(model, windows, reference_argmax=ref)
            row = {"sparsity": sp, "perplexity": ppl, "top1_agreement": agree,
                   "num_windows": int(windows.shape[0]), "window_len": int(windows.shape[1])}
            if sp != "none":
                rep = sparsity_report(model, sparsity=sp)
                row.update(zero_fraction=rep["zero_fraction"], num_pruned_weights=rep["num_weights"], dense_layers=rep["dense_layers"])
            for quant in ("none", "token_int8"):
                meta = LMArtifactMeta(quant_method=quant, sparsity=sp, storage=compact_storage(quant, sparsity=sp))
                folder = save_lm(model, tok, work / f"{sp.replace(':', 'of')}-{quant}", meta=meta)
                row[f"size_bytes_{meta.storage}"] = dir_size_bytes(folder)
                if sp != "none" and quant == "none":  # the packed folder reloads bit for bit
                    reloaded, _, _ = load_lm(folder)
                    with torch.inference_mode():
                        row["reload_identical_logits"] = bool(torch.equal(reloaded(windows[:1]).logits, model(windows[:1]).logits))
                    del reloaded
                shutil.rmtree(folder)
            row["seconds"] = time.perf_counter() - t0
            print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
