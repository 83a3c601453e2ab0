"""Sweep space files (``tune/*.yaml``): what a sweep ranges over, validated before Ray starts.

One file may hold a distillation space (``distill``: temperature, alpha, lr, weight decay, batch size,
epochs, student width and depth, KD loss kind), how that space is searched (``search``: grid / random /
Optuna TPE, ASHA over epochs, workers per trial), and a compression space (``compress``: prune ratios x
quantizations x runtimes, the same fields as the recipe's ``search.space``). A file holding only the
compression fields at its top level (the older ``tune/*-grid.yaml`` layout) is read as ``compress``.

A value is one of: a number (fixed), a list (grid points, or a categorical choice), ``{uniform: [lo, hi]}``,
``{loguniform: [lo, hi]}`` or ``{randint: [lo, hi]}`` (both ends included). Grid search takes lists only.

    slimray sweep --recipe mnist --space tune/mnist-distill.yaml

The compression space itself is ``SearchSpace`` (a recipe's ``search.space`` or a ``compress`` section). Pure
pydantic, no ray: ``slimray.sweep.distill_search`` turns a space into Ray Tune's search space.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import Field, PositiveInt, field_validator, model_validator

from slimray.compress.prune import PruneSpec
from slimray.compress.quantize import QuantMethod, QuantSpec
from slimray.compress.runtime import DEVICE_METHODS, Device, RuntimeName, RuntimeSpec, unsupported_reason
from slimray.schema import ConfigError, PruneRatios, StrictModel


class Uniform(StrictModel):
    uniform: tuple[float, float]


class LogUniform(StrictModel):
    loguniform: tuple[float, float]


class RandInt(StrictModel):
    randint: tuple[int, int] = Field(description="integers lo..hi, both included")


FloatDomain = Union[float, list[float], Uniform, LogUniform]
IntDomain = Union[int, list[int], RandInt]
LossKind = Literal["logits", "features", "labels"]

# field -> (lowest allowed, highest allowed, low end open)
BOUNDS: dict[str, tuple[float, float, bool]] = {
    "temperature": (0.0, 100.0, True),
    "alpha": (0.0, 1.0, False),
    "lr": (0.0, 10.0, True),
    "weight_decay": (0.0, 10.0, False),
    "batch_size": (1, 65536, False),
    "epochs": (1, 10000, False),
    "width": (0.0, 16.0, True),
    "depth": (0, 16, False),
}


def domain_values(domain: Any) -> list[Any]:
    """The grid points of a domain (a fixed value is one point); ranges have none."""
    if domain is None:
        return []
    if isinstance(domain, list):
        return domain
    if isinstance(domain, (Uniform, LogUniform, RandInt)):
        return []
    return [domain]


def domain_ends(domain: Any) -> list[Any]:
    """Every value the bounds check must look at: list entries, or a range's two ends."""
    if isinstance(domain, Uniform):
        return list(domain.uniform)
    if isinstance(domain, LogUniform):
        return list(domain.loguniform)
    if isinstance(domain, RandInt):
        return list(domain.randint)
    return domain_values(domain)


def is_range(domain: Any) -> bool:
    return isinstance(domain, (Uniform, LogUniform, RandInt))


class DistillSpace(StrictModel):
    """Distillation hyperparameters; a field left out keeps the recipe's ``distill`` value."""

    temperature: FloatDomain | None = None
    alpha: FloatDomain | None = None
    lr: FloatDomain | None = None
    weight_decay: FloatDomain | None = None
    batch_size: IntDomain | None = None
    epochs: IntDomain | None = Field(None, description="epochs per trial; with ASHA one number (its budget)")
    width: FloatDomain | None = Field(None, description="multiplier of every hidden width of the recipe's student")
    depth: IntDomain | None = Field(None, description="conv blocks (CNN) or hidden layers (MLP) of the student")
    loss: LossKind | list[LossKind] | None = Field(None, description="KD loss kind(s): logits, features, labels")

    @model_validator(mode="after")
    def _check(self) -> DistillSpace:
        for name, (lo, hi, open_low) in BOUNDS.items():
            domain = getattr(self, name)
            if isinstance(domain, list) and not domain:
                raise ValueError(f"{name}: an empty list; give at least one value")
            for v in domain_ends(domain):
                if v < lo or v > hi or (open_low and v == lo):
                    side = ">" if open_low else ">="
                    raise ValueError(f"{name}: {v} is out of range (must be {side} {lo:g} and <= {hi:g})")
            if isinstance(domain, (Uniform, LogUniform, RandInt)):
                a, b = domain_ends(domain)
                if not a < b:
                    raise ValueError(f"{name}: range [{a}, {b}] must have lo < hi")
        if isinstance(self.loss, list) and not self.loss:
            raise ValueError("loss: an empty list; give at least one value")
        if not self.params():
            raise ValueError("the distillation space is empty: give at least one of " + ", ".join(type(self).model_fields))
        return self

    def params(self) -> dict[str, Any]:
        """The fields that are set, as given."""
        return {k: getattr(self, k) for k in type(self).model_fields if getattr(self, k) is not None}

    def varying(self) -> list[str]:
        """Fields with more than one value (what the trial table shows)."""
        return [k for k, d in self.params().items() if is_range(d) or len(domain_values(d)) > 1]

    @property
    def has_ranges(self) -> bool:
        return any(is_range(d) for d in self.params().values())

    @property
    def grid_size(self) -> int:
        return math.prod(max(1, len(domain_values(d))) for d in self.params().values())

    def grid(self) -> list[dict[str, Any]]:
        """Every grid point (lists only)."""
        keys = list(self.params())
        return [dict(zip(keys, combo)) for combo in itertools.product(*(domain_values(self.params()[k]) for k in keys))]


class DistillSearch(StrictModel):
    """How the distillation space is searched, and what each trial may use."""

    algorithm: Literal["grid", "random", "optuna"] = Field("grid", description="optuna: TPE on held-out accuracy")
    num_samples: PositiveInt | None = Field(None, description="trials drawn by random/optuna (needed when a field is a range)")
    scheduler: Literal["none", "asha"] = Field("none", description="asha stops weak trials early; epochs are its budget")
    grace_period: PositiveInt = Field(1, description="asha: epochs every trial gets")
    reduction_factor: float = Field(2.0, gt=1, description="asha: keep 1/reduction_factor of the trials at each rung")
    num_workers: PositiveInt = Field(1, description="Ray Train workers per trial")
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False
    max_concurrent_trials: PositiveInt | None = Field(None, description="default: as many as the cluster fits")
    num_startup_trials: PositiveInt = Field(4, description="optuna: random trials before TPE takes over")
    tie_tolerance: float = Field(
        0.1, ge=0, description="held-out accuracy points within which trials tie; ties go to the smaller, then faster student"
    )
    seed: int = 0


COMPRESS_KEYS = {"device", "prune_ratios", "quantizations", "runtimes", "importance", "round_to"}


class SearchSpace(StrictModel):
    """Compression search space: prune ratio x quantization x runtime, for one device (files under tune/).

    A quantization the device has no kernels for is an error at load; (quantization, runtime) pairs that
    cannot run together are dropped from the space (listed in ``dropped``), e.g. bf16 in ONNX Runtime.
    """

    device: Device = Field("cpu", description="where the model will be served: cpu or cuda")
    prune_ratios: PruneRatios = Field(default_factory=lambda: [0.0, 0.25, 0.5])
    quantizations: list[QuantMethod] = Field(default_factory=lambda: ["none", "dynamic_int8", "static_int8", "bf16"])
    runtimes: list[RuntimeName] = Field(default_factory=lambda: ["torch"], description="torch, torch_compile, onnxruntime")
    importance: Literal["l1", "l2", "taylor"] = "l1"
    round_to: PositiveInt | None = None

    @field_validator("quantizations", "runtimes")
    @classmethod
    def _nonempty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one entry")
        return list(dict.fromkeys(v))

    @model_validator(mode="after")
    def _device(self) -> SearchSpace:
        bad = [q for q in self.quantizations if q not in DEVICE_METHODS[self.device]]
        if bad:
            raise ValueError(
                f"quantizations {bad} cannot run on device {self.device!r} (it runs {sorted(DEVICE_METHODS[self.device])})"
            )
        if not self.settings:
            reasons = "; ".join(f"{q} in {r}: {why}" for q, r, why in self.dropped)
            raise ValueError(f"no (quantization, runtime) pair in this space can run: {reasons}")
        return self

    @property
    def settings(self) -> list[tuple[str, str]]:
        """The (quantization, runtime) pairs that can run on the device, in the order given."""
        return [
            (q, r) for r in self.runtimes for q in self.quantizations
            if unsupported_reason(device=self.device, runtime=r, method=q) is None
        ]

    @property
    def dropped(self) -> list[tuple[str, str, str]]:
        """(quantization, runtime, why) for the pairs left out of the space."""
        out = []
        for r in self.runtimes:
            for q in self.quantizations:
                why = unsupported_reason(device=self.device, runtime=r, method=q)
                if why is not None:
                    out.append((q, r, why))
        return out

    def prune_spec(self, ratio: float) -> PruneSpec:
        return PruneSpec(ratio=ratio, importance=self.importance, round_to=self.round_to)

    def quant_spec(self, method: str) -> QuantSpec:
        return QuantSpec(method=method)

    def runtime_spec(self, name: str) -> RuntimeSpec:
        return RuntimeSpec(name=name)

    @property
    def num_trials(self) -> int:
        return len(self.prune_ratios) * len(self.settings)


class SweepSpaceFile(StrictModel):
    """A ``tune/*.yaml`` file: a distillation space, a compression space, or both."""

    distill: DistillSpace | None = None
    search: DistillSearch = Field(default_factory=DistillSearch)
    compress: dict[str, Any] | None = Field(None, description="a compression space (validated as SearchSpace)")

    @model_validator(mode="after")
    def _check(self) -> SweepSpaceFile:
        if self.distill is None and self.compress is None:
            raise ValueError("the file holds neither a 'distill' nor a 'compress' space")
        if self.compress is not None:
            SearchSpace.from_dict(self.compress, source="compress")
        d, s = self.distill, self.search
        if d is None:
            return self
        if s.algorithm == "grid":
            ranged = [k for k, v in d.params().items() if is_range(v)]
            if ranged:
                raise ValueError(f"search.algorithm 'grid' takes lists only; {ranged} are ranges (use random or optuna)")
            if s.num_samples is not None:
                raise ValueError("search.num_samples applies to random/optuna; grid runs every point once")
        elif d.has_ranges and s.num_samples is None:
            raise ValueError("search.num_samples is required when a distill field is a range")
        if s.scheduler == "asha":
            if d.epochs is None or is_range(d.epochs) or len(domain_values(d.epochs)) != 1:
                raise ValueError("search.scheduler 'asha' needs distill.epochs as one number (the budget it stops trials within)")
            epochs = domain_values(d.epochs)[0]
            if epochs <= s.grace_period:
                raise ValueError(f"search.scheduler 'asha': distill.epochs {epochs} must exceed search.grace_period {s.grace_period}")
        return self

    @property
    def num_trials(self) -> int:
        if self.distill is None:
            return 0
        if self.search.algorithm == "grid":
            return self.distill.grid_size
        return self.search.num_samples or max(1, self.distill.grid_size // 2)


def load_space_file(path: str | Path) -> SweepSpaceFile:
    """Read a space file; a bare compression space (top-level prune_ratios, ...) is read as ``compress``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"space file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse {path}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    if data and set(data) <= COMPRESS_KEYS:
        data = {"compress": data}
    return SweepSpaceFile.from_dict(data, source=str(path))
