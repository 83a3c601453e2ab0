"""The quality a compressed model must keep: top-1 accuracy by default, or the user's own metric.

``eval.metric`` is ``accuracy`` (percent) or an import path ``package.module:function`` called as
``fn(predictions, labels) -> float`` with two int64 NumPy arrays (predicted class, true class), imported from
``teacher.code_dir`` like the model's factory. ``higher_is_better`` gives its direction; the budget is
``max_drop`` (in the metric's units) or ``max_relative_drop`` (a fraction of the teacher's value).

The sweep ranks trials on a signed *quality* (the value, negated when lower is better), so "within the
budget of the teacher" and the Pareto front mean the same for every metric. Pure python + torch, no ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from pydantic import Field, model_validator

from slimray.compress.measure import predict_logits
from slimray.families.classifier.usermodule import check_factory_path, import_factory
from slimray.schema import StrictModel


class EvalConfig(StrictModel):
    metric: str = Field("accuracy", description="'accuracy' (top-1, percent) or 'package.module:function'(predictions, labels) -> float")
    higher_is_better: bool = Field(True, description="direction of the metric")
    max_drop: float | None = Field(None, ge=0, description="budget in the metric's units (accuracy default: search.max_accuracy_drop)")
    max_relative_drop: float | None = Field(None, ge=0, lt=1, description="budget as a fraction of the teacher's value")

    @model_validator(mode="after")
    def _budget(self) -> EvalConfig:
        if self.metric != "accuracy":
            check_factory_path(self.metric)
            if self.max_drop is None and self.max_relative_drop is None:
                raise ValueError("a metric of your own needs its budget: eval.max_drop or eval.max_relative_drop")
        elif not self.higher_is_better:
            raise ValueError("accuracy is higher-is-better; eval.higher_is_better: false is for a metric of your own")
        if self.max_drop is not None and self.max_relative_drop is not None:
            raise ValueError("give eval.max_drop or eval.max_relative_drop, not both")
        return self


@dataclass(frozen=True)
class Metric:
    name: str
    fn: Callable[[np.ndarray, np.ndarray], float] | None  # None: accuracy in percent
    higher_is_better: bool
    max_drop: float | None
    max_relative_drop: float | None

    def value(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1024) -> float:
        """The metric of ``model`` on (x, y), in its own units."""
        pred = predict_logits(model, x, batch_size=batch_size).argmax(1)
        if self.fn is None:
            return 100.0 * (pred == y).float().mean().item()
        out = self.fn(pred.numpy().astype(np.int64), y.numpy().astype(np.int64))
        try:
            out = float(out)
        except (TypeError, ValueError):
            raise ValueError(f"eval.metric {self.name!r} returned {type(out).__name__}, not a number") from None
        if not math.isfinite(out):
            raise ValueError(f"eval.metric {self.name!r} returned {out}")
        return out

    def quality(self, value: float) -> float:
        """Higher is better, whatever the metric's direction."""
        return value if self.higher_is_better else -value

    def budget(self, teacher_value: float) -> float:
        """How much quality the winner may lose against the teacher, in the metric's units."""
        if self.max_relative_drop is not None:
            return self.max_relative_drop * abs(teacher_value)
        assert self.max_drop is not None
        return self.max_drop

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "higher_is_better": self.higher_is_better, "max_drop": self.max_drop,
                "max_relative_drop": self.max_relative_drop}


def load_metric(cfg: EvalConfig, *, default_max_drop: float, code_dir: str | None = None) -> Metric:
    """The configured metric (the user's function imported now, so a bad path fails before any work)."""
    if cfg.metric == "accuracy":
        drop = cfg.max_drop if cfg.max_drop is not None or cfg.max_relative_drop is not None else default_max_drop
        return Metric("accuracy", None, True, drop, cfg.max_relative_drop)
    fn = import_factory(cfg.metric, code_dir=code_dir, field="eval.metric")
    return Metric(cfg.metric, fn, cfg.higher_is_better, cfg.max_drop, cfg.max_relative_drop)
