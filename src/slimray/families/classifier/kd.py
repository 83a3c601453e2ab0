"""The training step shared by distillation workers and sweep fine-tunes (pure torch, no ray).

The loss is knowledge distillation from teacher logits (Hinton et al.):
``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)``; with ``alpha == 0`` or
no teacher logits it is plain cross-entropy on labels. The teacher logits either come precomputed with
each batch or from a teacher run in the loop (``features.TeacherInLoop``), which can also supply a hidden
feature for feature KD (``+ weight * MSE(projection(student feature), teacher feature)``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

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


@dataclass
class EpochStats:
    loss: float
    num_samples: int
    seconds: float
    breakdown: dict[str, float] = field(default_factory=dict)

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
    teacher: TeacherInLoop | None = None,
    feature_weight: float = 0.0,
    profile: bool = False,
) -> EpochStats:
    """One pass over ``loader`` yielding (x, y) or (x, y, teacher_logits) batches.

    ``teacher`` (in-loop teacher) supplies the teacher's logits, and its tapped feature when ``model`` is a
    ``KDStudent`` returning ``(logits, projected feature)``; the feature term ``feature_weight * MSE`` is
    then added to the logit/label loss. With ``profile`` the epoch's wall time is split into ``data_s``
    (waiting for the loader), ``teacher_s``, ``forward_s`` (student forward + loss), ``backward_s`` (with
    DDP this includes the gradient all-reduce it does not overlap) and ``step_s`` (optimizer).
    """
    model.train()
    total, n = 0.0, 0
    times = dict.fromkeys(("data_s", "teacher_s", "forward_s", "backward_s", "step_s"), 0.0)
    clock = time.perf_counter
    start = mark = clock()
    for batch in loader:
        if device is not None:
            batch = [b.to(device, non_blocking=True) for b in batch]
        x, y = batch[0], batch[1]
        t_logits = batch[2] if len(batch) > 2 else None
        t_feat = None
        if profile:
            now = clock()
            times["data_s"] += now - mark
            mark = now
        if teacher is not None:
            t_logits, t_feat = teacher(x)
            if profile:
                now = clock()
                times["teacher_s"] += now - mark
                mark = now
        with torch.autocast(device_type=device.type if device else "cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = model(x)
        logits, s_feat = out if isinstance(out, tuple) else (out, None)
        loss = kd_loss(logits.float(), y, t_logits, temperature=temperature, alpha=alpha)
        if s_feat is not None:
            if t_feat is None:
                raise ValueError("feature KD needs the teacher in the loop (teacher_outputs: in_loop)")
            loss = loss + feature_weight * feature_loss(s_feat, t_feat)
        if profile:
            now = clock()
            times["forward_s"] += now - mark
            mark = now
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if profile:
            now = clock()
            times["backward_s"] += now - mark
            mark = now
        optimizer.step()
        total += loss.item() * len(y)
        n += len(y)
        if profile:
            now = clock()
            times["step_s"] += now - mark
            mark = now
    return EpochStats(loss=total / max(n, 1), num_samples=n, seconds=clock() - start, breakdown=times if profile else {})


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
