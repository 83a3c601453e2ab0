"""Embedding + hidden-state knowledge distillation for sentence encoders (pure torch, no ray).

The teacher is run once (``teacher_targets``): its normalised mean-pooled embeddings and the token hidden
states of the layers the student mirrors are cached (hidden states ragged, float16: only real tokens),
so a training step runs the student alone. Loss = embedding term (1 - cosine, MSE, or both) +
``hidden_weight`` x token-level MSE between student layer k's output and its teacher target layer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from slimray.families.sentence_encoder.models import forward_hidden, mean_pool, tokenize


@dataclass
class KDData:
    """Tokenised sentences and cached teacher outputs (numpy, so they travel through Ray's object store)."""

    ids: np.ndarray  # (N, L) int32, padded with 0
    lengths: np.ndarray  # (N,) int32
    embeddings: np.ndarray  # (N, H) float32, normalised
    hidden: list[np.ndarray]  # per target layer: (total tokens, H) float16
    offsets: np.ndarray  # (N + 1,) int64 into hidden rows

    def __len__(self) -> int:
        return len(self.lengths)


def target_layers(student_layers: Sequence[int]) -> list[int]:
    """Teacher hidden-state index each student layer imitates: the output of the layer it came from."""
    return [i + 1 for i in student_layers]


def teacher_targets(teacher: nn.Module, tokenizer, texts: Sequence[str], *, max_seq_len: int, hidden_layers: Sequence[int],
                    batch_size: int = 64, log_every_s: float = 30.0, label: str = "teacher") -> KDData:
    """Run the teacher once over ``texts`` (length-sorted batches) and cache what distillation needs."""
    n = len(texts)
    enc = tokenizer.encode_batch(list(texts))
    lengths = np.array([max(1, min(len(e.ids), max_seq_len)) for e in enc], dtype=np.int32)
    ids = np.zeros((n, max_seq_len), dtype=np.int32)
    for i, e in enumerate(enc):
        ids[i, : lengths[i]] = e.ids[: lengths[i]]
    offsets = np.zeros(n + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(lengths)
    hidden_dim = teacher.config.hidden_size
    hidden = [np.zeros((int(offsets[-1]), hidden_dim), dtype=np.float16) for _ in hidden_layers]
    emb = np.zeros((n, hidden_dim), dtype=np.float32)
    order = np.argsort(lengths, kind="stable")
    start = last_log = time.perf_counter()
    with torch.inference_mode():
        for bi in range(0, n, batch_size):
            idx = order[bi : bi + batch_size]
            width = int(lengths[idx].max())
            b_ids = torch.from_numpy(ids[idx, :width].astype(np.int64))
            b_mask = (torch.arange(width)[None, :] < torch.from_numpy(lengths[idx])[:, None]).long()
            hs = forward_hidden(teacher, b_ids, b_mask, all_layers=True)
            emb[idx] = mean_pool(hs[-1], b_mask).numpy()
            for t, layer in enumerate(hidden_layers):
                h = hs[layer].float().numpy()
                for r, j in enumerate(idx):
                    hidden[t][offsets[j] : offsets[j + 1]] = h[r, : lengths[j]]
            now = time.perf_counter()
            if now - last_log > log_every_s:
                done = bi + len(idx)
                print(f"[{label}] {done}/{n} sentences, {done / (now - start):.0f}/s", flush=True)
                last_log = now
    return KDData(ids=ids, lengths=lengths, embeddings=emb, hidden=hidden, offsets=offsets)


def make_batch(data: KDData, idx: np.ndarray) -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """One training batch, trimmed to its longest sentence."""
    lengths = data.lengths[idx]
    width = int(lengths.max())
    ids = torch.from_numpy(data.ids[idx, :width].astype(np.int64))
    mask = (torch.arange(width)[None, :] < torch.from_numpy(lengths)[:, None]).long()
    hidden = []
    for layer in data.hidden:
        h = np.zeros((len(idx), width, layer.shape[1]), dtype=np.float32)
        for r, j in enumerate(idx):
            h[r, : lengths[r]] = layer[data.offsets[j] : data.offsets[j + 1]]
        hidden.append(torch.from_numpy(h))
    return {"ids": ids, "mask": mask, "embeddings": torch.from_numpy(data.embeddings[idx]), "hidden": hidden}


def kd_loss(student: nn.Module, batch: dict, *, embed_loss: str, hidden_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    mask = batch["mask"]
    use_hidden = hidden_weight > 0 and len(batch["hidden"]) > 0
    out = forward_hidden(student, batch["ids"], mask, all_layers=use_hidden)
    last = out[-1] if use_hidden else out
    emb = mean_pool(last, mask)
    target = batch["embeddings"]
    parts: dict[str, float] = {}
    loss = torch.zeros((), dtype=torch.float32)
    if "cosine" in embed_loss:
        cos = (1 - (emb * target).sum(-1)).mean()
        loss = loss + cos
        parts["cosine"] = float(cos.detach())
    if "mse" in embed_loss:
        mse = ((emb - target) ** 2).sum(-1).mean()
        loss = loss + mse
        parts["mse"] = float(mse.detach())
    if use_hidden:
        m = mask.unsqueeze(-1).float()
        denom = m.sum() * last.shape[-1]
        hl = sum(((out[k + 1].float() - t) ** 2 * m).sum() / denom for k, t in enumerate(batch["hidden"]))
        loss = loss + hidden_weight * hl
        parts["hidden"] = float(hl.detach())
    return loss, parts


def epoch_batches(idx: np.ndarray, lengths: np.ndarray, *, batch_size: int, rng: np.random.Generator,
                  bucket: bool, pool_batches: int = 8) -> list[np.ndarray]:
    """Split one epoch's (already shuffled) sentence indices ``idx`` into batches.

    With ``bucket`` the indices are taken ``pool_batches`` batches at a time, sorted by length inside the
    pool and cut into batches, and the batches are then shuffled: each batch holds sentences of similar
    length, so padding (most of a random batch's compute at sequence length 64) nearly vanishes, while
    every sentence is still seen once per epoch and batch composition still changes from epoch to epoch.
    """
    if not bucket:
        return [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
    pool = batch_size * pool_batches
    batches = []
    for i in range(0, len(idx), pool):
        chunk = idx[i : i + pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    return [batches[k] for k in rng.permutation(len(batches))]


def trainable_parameters(student: nn.Module, *, freeze_word_embeddings: bool) -> list[nn.Parameter]:
    """The parameters distillation updates; the word-embedding table (half the model, copied from the teacher)
    is frozen when asked, which removes its dense AdamW update and its all-reduce from every step."""
    if freeze_word_embeddings:
        student.embeddings.word_embeddings.weight.requires_grad_(False)
    return [p for p in student.parameters() if p.requires_grad]


def autocast(enabled: bool):
    """bf16 autocast on CPU (a no-op context when not ``enabled``)."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def lr_factor(step: int, total: int, *, warmup: int, schedule: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine" and total > warmup:
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))
    return 1.0


def student_cosine(student: nn.Module, ids: np.ndarray, lengths: np.ndarray, teacher_emb: np.ndarray, *, batch_size: int = 64) -> float:
    """Mean cosine of the student's embeddings to the cached teacher's (float32)."""
    was_training = student.training
    student.eval()
    total = 0.0
    with torch.inference_mode():
        for i in range(0, len(lengths), batch_size):
            sl = slice(i, i + batch_size)
            width = int(lengths[sl].max())
            b_ids = torch.from_numpy(ids[sl, :width].astype(np.int64))
            b_mask = (torch.arange(width)[None, :] < torch.from_numpy(lengths[sl])[:, None]).long()
            emb = mean_pool(forward_hidden(student, b_ids, b_mask), b_mask)
            total += float((emb * torch.from_numpy(teacher_emb[sl])).sum())
    student.train(was_training)
    return total / len(lengths)


def finetune_kd(student: nn.Module, data: KDData, *, epochs: float, batch_size: int, lr: float, embed_loss: str,
                hidden_weight: float, seed: int, weight_decay: float = 0.01, warmup: int = 10,
                freeze_word_embeddings: bool = True, bucket_by_length: bool = True, bf16_autocast: bool = False) -> nn.Module:
    """Single-process KD (used after pruning): ``epochs`` may be fractional (a share of one pass)."""
    if epochs <= 0:
        return student.eval()
    rng = np.random.default_rng(seed)
    steps_per_epoch = math.ceil(len(data) / batch_size)
    total = max(1, int(round(epochs * steps_per_epoch)))
    params = trainable_parameters(student, freeze_word_embeddings=freeze_word_embeddings)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    student.train()
    step, batches = 0, []
    while step < total:
        if not batches:
            batches = epoch_batches(rng.permutation(len(data)), data.lengths, batch_size=batch_size, rng=rng, bucket=bucket_by_length)
        batch = make_batch(data, batches.pop())
        for g in opt.param_groups:
            g["lr"] = lr * lr_factor(step, total, warmup=warmup, schedule="cosine")
        with autocast(bf16_autocast):
            loss, _ = kd_loss(student, batch, embed_loss=embed_loss, hidden_weight=hidden_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
    student.embeddings.word_embeddings.weight.requires_grad_(True)
    return student.eval()


def tokenize_texts(tokenizer, texts: Sequence[str], *, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    return tokenize(tokenizer, texts, max_seq_len=max_seq_len)
