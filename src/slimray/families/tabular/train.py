"""The tabular family's Ray Train task (pure torch): MSE KD from the teacher's precomputed predictions mixed with
MSE on the targets (``alpha`` on the teacher, ``1 - alpha`` on the labels; ``alpha = 0`` trains on labels alone, as
the teacher itself is trained). Validation is R² on the held-out split, in standardised units (R² is scale-free)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from slimray.families.base import TrainTask
from slimray.families.tabular.model import build


def r2_score(pred: torch.Tensor, y: torch.Tensor) -> float:
    ss_res = torch.sum((y - pred) ** 2)
    ss_tot = torch.sum((y - y.mean()) ** 2).clamp_min(1e-12)
    return float(1.0 - ss_res / ss_tot)


class TabularTask(TrainTask):
    """Data: ``x_train``, ``y_train``, ``t_train`` (teacher predictions, when alpha > 0), ``x_val``, ``y_val``; its job's
    ``task``: ``alpha``, the weight of the MSE to the teacher."""

    headline = "val_r2"

    def __init__(self, config: dict[str, Any], data: dict[str, Any], **kwargs: Any):
        super().__init__(config, data, **kwargs)
        self.alpha = float(config["task"]["alpha"])
        parts = [torch.from_numpy(data["x_train"]), torch.from_numpy(data["y_train"])]
        if self.alpha > 0:
            parts.append(torch.from_numpy(data["t_train"]))
        self.dataset = torch.utils.data.TensorDataset(*parts)
        self.sampler = torch.utils.data.DistributedSampler(self.dataset, num_replicas=self.world, rank=self.rank,
                                                           shuffle=True, seed=config["seed"])
        self.x_val, self.y_val = torch.from_numpy(data["x_val"]), torch.from_numpy(data["y_val"])

    def build(self) -> nn.Module:
        return build(self.config["spec"])

    @classmethod
    def rebuild(cls, config: dict[str, Any], state: dict[str, torch.Tensor]) -> nn.Module:
        model = build(config["spec"])
        model.load_state_dict(state)
        return model.eval()

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def steps_per_epoch(self) -> int:
        return -(-len(self.sampler) // self.config["batch_size"])

    def batches(self, epoch: int) -> Iterator[Any]:
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=self.config["batch_size"], sampler=self.sampler)
        return iter(loader)

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, int, dict[str, float]]:
        x, y = batch[0].to(self.device), batch[1].to(self.device)
        pred = model(x)
        label = nn.functional.mse_loss(pred, y)
        if self.alpha == 0:
            return label, len(x), {"label": label.item()}
        kd = nn.functional.mse_loss(pred, batch[2].to(self.device))
        return self.alpha * kd + (1 - self.alpha) * label, len(x), {"kd": kd.item(), "label": label.item()}

    def validate(self, student: nn.Module) -> dict[str, float]:
        student.eval()
        with torch.inference_mode():
            pred = student(self.x_val.to(self.device)).cpu()
        student.train()
        return {"val_r2": r2_score(pred, self.y_val), "val_mse": float(torch.mean((pred - self.y_val) ** 2))}
