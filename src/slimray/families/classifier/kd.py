"""The training step shared by distillation workers and sweep fine-tunes (pure torch, no ray).

The loss is knowledge distillation from teacher logits (Hinton et al.):
``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)``; with ``alpha == 0`` or
no teacher logits it is plain cross-entropy on labels. The teacher logits either come precomputed with
each batch or from a teacher run in the loop (``features.TeacherInLoop``), which can also supply a hidden
feature for feature KD (``+ weight * MSE(projection(student feature), teacher feature)``).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from slimray.families.base import EpochStats, run_epoch
from slimray.families.classifier.features import TeacherInLoop, feature_loss


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


def batch_loss(
    model: nn.Module,
    batch,
    *,
    temperature: float,
    alpha: float,
    device: torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
    teacher: TeacherInLoop | None = None,
    feature_weight: float = 0.0,
) -> tuple[torch.Tensor, int, dict[str, float]]:
    """The KD loss of one (x, y) or (x, y, teacher_logits) batch: (loss, examples, parts).

    ``teacher`` (in-loop teacher) supplies the teacher's logits, and its tapped feature when ``model`` is a
    ``KDStudent`` returning ``(logits, projected feature)``; the feature term ``feature_weight * MSE`` is
    then added to the logit/label loss. The teacher's time is the ``teacher_s`` part.
    """
    if device is not None:
        batch = [b.to(device, non_blocking=True) for b in batch]
    x, y = batch[0], batch[1]
    t_logits = batch[2] if len(batch) > 2 else None
    t_feat, parts = None, {}
    if teacher is not None:
        t0 = time.perf_counter()
        t_logits, t_feat = teacher(x)
        parts["teacher_s"] = time.perf_counter() - t0
    with torch.autocast(device_type=device.type if device else "cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
        out = model(x)
    logits, s_feat = out if isinstance(out, tuple) else (out, None)
    loss = kd_loss(logits.float(), y, t_logits, temperature=temperature, alpha=alpha)
    if s_feat is not None:
        if t_feat is None:
            raise ValueError("feature KD needs the teacher in the loop (teacher_outputs: in_loop)")
        loss = loss + feature_weight * feature_loss(s_feat, t_feat)
    return loss, len(y), parts


def train_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, *, profile: bool = False, **loss_kwargs) -> EpochStats:
    """One single-process pass over ``loader`` (``run_epoch`` with ``batch_loss(**loss_kwargs)``)."""
    return run_epoch(model, loader, lambda m, b: batch_loss(m, b, **loss_kwargs), optimizer, profile=profile)


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
