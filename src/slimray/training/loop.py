"""The training step shared by distillation workers and sweep fine-tunes (pure torch, no ray).

The loss is knowledge distillation from precomputed teacher logits (Hinton et al.):
``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)``; with ``alpha == 0`` or
no teacher logits it is plain cross-entropy on labels.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def kd_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    *,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    ce = F.cross_entropy(student_logits, labels)
    if teacher_logits is None or alpha == 0.0:
        return ce
    t = temperature
    kd = F.kl_div(
        F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1), reduction="batchmean", log_target=True
    ) * (t * t)
    return alpha * kd + (1.0 - alpha) * ce


@dataclass
class EpochStats:
    loss: float
    num_samples: int
    seconds: float

    @property
    def samples_per_s(self) -> float:
        return self.num_samples / max(self.seconds, 1e-9)


def train_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    *,
    temperature: float,
    alpha: float,
    device: torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> EpochStats:
    """One pass over ``loader`` yielding (x, y) or (x, y, teacher_logits) batches."""
    model.train()
    total, n = 0.0, 0
    start = time.perf_counter()
    for batch in loader:
        if device is not None:
            batch = [b.to(device, non_blocking=True) for b in batch]
        x, y = batch[0], batch[1]
        t_logits = batch[2] if len(batch) > 2 else None
        with torch.autocast(device_type=device.type if device else "cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(x)
        loss = kd_loss(logits.float(), y, t_logits, temperature=temperature, alpha=alpha)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(y)
        n += len(y)
    return EpochStats(loss=total / max(n, 1), num_samples=n, seconds=time.perf_counter() - start)


def finetune(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 128,
    temperature: float = 4.0,
    alpha: float = 0.7,
    seed: int = 0,
) -> nn.Module:
    """A short single-process KD fine-tune (used after pruning); returns ``model`` in eval mode."""
    if epochs == 0:
        return model.eval()
    gen = torch.Generator().manual_seed(seed)
    tensors = (x, y) if teacher_logits is None else (x, y, teacher_logits)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*tensors), batch_size=batch_size, shuffle=True, generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        train_epoch(model, loader, opt, temperature=temperature, alpha=alpha)
    return model.eval()
