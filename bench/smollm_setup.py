"""What the SmolLM2 bench scripts share: the packaged teacher converted once under ``work/teacher``, and the
Wikipedia summaries split by article (seed 0) into held-out test windows of 256 tokens, 4 calibration windows of
128 and training windows. Imported by the scripts beside it (``python bench/NAME.py`` puts ``bench/`` on the path)."""

from __future__ import annotations

from pathlib import Path

import torch

from slimray.families.causal_lm import data as D
from slimray.families.causal_lm.teacher import ensure_smollm2_teacher, load_causal_lm


def smollm_setup(work: Path, *, num_eval_windows: int, train_len: int, num_train_windows: int):
    """``(teacher folder, teacher, tokenizer, test, calib, train)`` windows as int64 ``[N, L]`` tensors."""
    folder = ensure_smollm2_teacher(work / "teacher")
    teacher, tok = load_causal_lm(folder)
    splits = D.split_documents(D.load_wiki_summaries(), seed=0, val_fraction=0.05, test_fraction=0.05)
    test = D.pack_windows(splits["test"], tok, window_len=256, num_windows=num_eval_windows)
    calib = D.pack_windows(splits["val"], tok, window_len=128, num_windows=4)
    train: torch.Tensor = D.pack_windows(splits["train"], tok, window_len=train_len, num_windows=num_train_windows)
    return folder, teacher, tok, test, calib, train, splits
