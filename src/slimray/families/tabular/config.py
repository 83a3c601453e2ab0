"""The tabular family's run document: ``data`` (a CSV file and its target column), ``teacher`` (an MLP trained first
on Ray Train), ``distill`` (the students' hidden widths), ``search`` (prune ratios x quantizations) on the shared base
(``slimray.configbase``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, PositiveInt, field_validator

from slimray.compress.quantize import QuantMethod
from slimray.configbase import DistillBase, RunConfigBase, SearchBase, load_family_config
from slimray.schema import PruneRatios, RunName, StrictModel


class TabularData(StrictModel):
    path: str = Field(description="a CSV file with a header row; every column but the target is a numeric feature")
    target: str = Field(description="the column to predict")
    val_fraction: float = Field(0.2, gt=0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0, lt=0.5)
    seed: int = 0

    @field_validator("path")
    @classmethod
    def _exists(cls, v: str) -> str:
        if not Path(v).is_file():
            raise ValueError(f"no file at {v}")
        return v


class TabularTeacher(StrictModel):
    hidden: list[PositiveInt] = Field([256, 256], min_length=1, description="the teacher MLP's hidden widths")
    epochs: PositiveInt = 30
    lr: float = Field(1e-3, gt=0)


class TabularDistill(DistillBase):
    students: list[list[PositiveInt]] = Field([[64, 64]], min_length=1, description="hidden widths of each student")


class TabularSearch(SearchBase):
    max_quality_drop: float = Field(0.02, ge=0, description="R² the winner may lose against the teacher (0.02: 2 points)")
    prune_ratios: PruneRatios = Field([0.0, 0.5])
    quant_methods: list[QuantMethod] = Field(["none", "dynamic_int8"], min_length=1,
                                             description="names in the shared quantization registry (slimray.compress.quantize)")
    timing_batch_size: PositiveInt = Field(256, description="rows per forward when speeds are measured")


class TabularConfig(RunConfigBase):
    family: Literal["tabular"] = Field(description="the model family; required for this one")
    name: RunName = "tabular"
    data: TabularData
    teacher: TabularTeacher = Field(default_factory=TabularTeacher)
    distill: TabularDistill = Field(default_factory=TabularDistill)
    search: TabularSearch = Field(default_factory=TabularSearch)


def load_tabular_config(*, recipe: str | None = None, config: str | Path | None = None) -> TabularConfig:
    return load_family_config(TabularConfig, recipe=recipe, config=config, relative=(("data", "path"),))
