"""Where the minilm winner's speed comes from: each compression step timed side by side, in one process.

Run from the repository root with the virtual environment active, on a finished minilm run::

    python bench/minilm_speed.py --run-dir runs/minilm [--out bench-minilm.json]

It loads the run's teacher (fp32, 6 layers, from where the config names it) and distilled student (fp32, 4 layers) and builds, in memory, the
variants between them: the teacher under each quantization (bf16, dynamic int8, torchao int8 + compile), the
student at sequence length 64 and 48, under each quantization. Every variant is timed round-robin (one at a time,
``--repeats`` passes, median) on ``--threads`` torch threads over the same held-out sentences, tokenised once per
sequence length and padded to each batch's longest sentence, at batch 1 and 32: the same measurement the run's
report uses. Its cosine to the teacher's embeddings on ``--quality-sentences`` held-out sentences stands beside
it. Compilation happens in the warm-up pass (about a minute per torchao model on 1 thread) and is not timed.
Ratios are against the teacher in the same invocation; the absolute numbers are this machine's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", type=Path, required=True, help="a finished minilm run (students/student/, config.json)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sentences", type=int, default=256, help="held-out sentences per timing pass at batch 32")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quality-sentences", type=int, default=500)
    ap.add_argument("--out", type=Path, help="write the table as JSON here")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")

    from slimray.compress.cpu import bf16_slow_reason
    from slimray.families.sentence_encoder.compress import sentences_per_s, timing_batches
    from slimray.families.sentence_encoder.config import TextPipelineConfig
    from slimray.families.sentence_encoder.data import split_by_article
    from slimray.families.sentence_encoder.models import (embed_texts, load_teacher, load_text_artifact, load_tokenizer,
                                                          quantize_text, teacher_dir)

    run_dir = args.run_dir
    cfg = TextPipelineConfig.from_file(run_dir / "config.json")
    _, held = split_by_article(heldout_fraction=cfg.data.heldout_fraction, seed=cfg.data.seed, max_train=1,
                               max_heldout=cfg.data.max_heldout_sentences, min_words=cfg.data.min_words)
    texts = held.texts
    tok_dir = teacher_dir(cfg.model)  # the teacher stays where the user keeps it (the MiniLM wheel, or their folder)
    teacher = load_teacher(tok_dir)
    student, _ = load_text_artifact(run_dir / "students" / "student")
    quants = ["none", "dynamic_int8", "torchao_int8_dynamic"] + ([] if bf16_slow_reason() else ["bf16"])
    variants: dict[str, tuple[torch.nn.Module, int]] = {}
    for q in quants:
        variants[f"teacher {q} seq64"] = (teacher if q == "none" else quantize_text(teacher, q), 64)
    for q in quants:
        m = student if q == "none" else quantize_text(student, q)
        for seq in (64, 48):
            variants[f"student {q} seq{seq}"] = (m, seq)

    torch.set_num_threads(args.threads)
    qual = texts[: args.quality_sentences]
    ref = embed_texts(teacher, load_tokenizer(tok_dir, max_seq_len=64), qual, max_seq_len=64)
    rows: dict[str, dict[str, float]] = {}
    for name, (model, seq) in variants.items():
        t0 = time.perf_counter()
        emb = embed_texts(model, load_tokenizer(tok_dir, max_seq_len=seq), qual, max_seq_len=seq)  # also compiles
        rows[name] = {"cosine_to_teacher": float(np.mean(np.sum(emb * ref, axis=1))), "warmup_s": time.perf_counter() - t0}
        print(f"[bench] {name}: cosine {rows[name]['cosine_to_teacher']:.4f} (quality pass + warm-up {rows[name]['warmup_s']:.0f}s)",
              flush=True)
    for bs in (1, 32):
        n = args.sentences if bs > 1 else max(16, args.sentences // 4)
        batches = {seq: timing_batches(load_tokenizer(tok_dir, max_seq_len=seq), texts[:n], batch_size=bs, max_seq_len=seq)
                   for seq in (48, 64)}
        for name, (model, seq) in variants.items():  # warm-up at this batch size (a new shape may recompile)
            sentences_per_s(model, batches[seq][:2], num_threads=args.threads, repeats=1)
        samples: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, (model, seq) in variants.items():
                samples[name].append(sentences_per_s(model, batches[seq], num_threads=args.threads, repeats=1, warmup=0)["sentences_per_s"])
        for name in variants:
            rows[name][f"batch_{bs}"] = statistics.median(samples[name])
    base = rows["teacher none seq64"]
    print(f"\n{args.threads} thread(s), {args.sentences} held-out sentences at batch 32, median of {args.repeats} round-robin passes\n")
    print("| variant | cosine to teacher | sentences/s b1 | sentences/s b32 | vs teacher b1 | vs teacher b32 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} | {r['cosine_to_teacher']:.4f} | {r['batch_1']:.1f} | {r['batch_32']:.1f} | "
              f"{r['batch_1'] / base['batch_1']:.2f}x | {r['batch_32'] / base['batch_32']:.2f}x |")
    if args.out:
        args.out.write_text(json.dumps({"threads": args.threads, "sentences": args.sentences, "repeats": args.repeats,
                                        "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
