"""The shared base of every family's run document, and the one loader of recipes and config files.

A run document is ``family``, ``name``, then the family's sections; the sections every family on the shared pipeline
(``slimray.pipelines.flow``) reads have their base here: ``DistillBase`` (Ray Train budget, the labels-only baseline),
``SearchBase`` (quality budget, trials at once, finalists re-timed side by side, the noise margin) and the serve section
(``slimray.serving.options.ServeConfig``, the one serve schema, checked in full when the document loads).
``load_family_config`` reads a packaged recipe or the user's file for any family: relative paths in the sections it
names are resolved against the file's folder, and every error names the file and the field.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt

from slimray.schema import ConfigError, RunName, StrictModel, format_validation_error
from slimray.serving.options import ServeConfig

C = TypeVar("C", bound=StrictModel)


class DistillBase(StrictModel):
    """Ray Train distillation: every student is distilled and, with ``labels_only_baseline``, trained on labels alone
    with the same budget; the search starts from whichever validates better."""

    num_workers: PositiveInt = Field(2, description="Ray Train workers (data parallel)")
    epochs: PositiveInt = 20
    batch_size: PositiveInt = 128
    lr: PositiveFloat = 1e-3
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="weight of the KD term; 1 - alpha goes to the labels")
    seed: int = 0
    labels_only_baseline: bool = Field(True, description="also train each student on labels only, same budget")


class SearchBase(StrictModel):
    """The compression search and the winner rule every family shares (the quality budget is the family's own field:
    ``Recipe.budget`` reads it)."""

    max_concurrent_trials: PositiveInt = Field(2, description="Tune trials at once (one CPU each)")
    use_tune: bool = Field(True, description="one Ray Tune trial per candidate; false: candidates run in the driver")
    num_finalists: PositiveInt = Field(3, description="fastest feasible candidates re-timed side by side")
    num_rounds: PositiveInt = Field(5, description="rounds of side-by-side timing, at least")
    max_rounds: PositiveInt | None = Field(None, description="more rounds, up to this, until the same finalist leads two "
                                           "rounds running; None: num_rounds exactly")
    include_teacher: bool = Field(False, description="also search the teacher's own compressions (is a student needed "
                                  "at all?), beside the students'")
    noise_margin: NonNegativeFloat = Field(0.03, description="a lead under this fraction is a tie (the smaller wins)")

    @property
    def most_rounds(self) -> int:
        """The side-by-side rounds a search may time: ``max_rounds``, never fewer than ``num_rounds``."""
        return max(self.num_rounds, self.max_rounds or 0)


class RunConfigBase(StrictModel):
    family: str
    name: RunName
    recipe: str | None = None
    serve: ServeConfig = Field(default_factory=ServeConfig)


def recipe_file(name: str) -> Path:
    return Path(str(resources.files("slimray.recipes") / f"{name}.yaml"))


def load_family_config(cls: type[C], *, recipe: str | None = None, config: str | Path | None = None,
                       relative: tuple[tuple[str, str], ...] = ()) -> C:
    """A packaged recipe or a config file as ``cls``; ``relative`` lists (section, key) whose relative paths are
    resolved against the config file's folder."""
    if (recipe is None) == (config is None):
        raise ConfigError("give exactly one of recipe or config")
    path = Path(config) if config is not None else recipe_file(str(recipe))
    if recipe is not None and not path.is_file():
        raise ConfigError(f"unknown recipe {recipe!r}")
    if config is None or not path.is_file():
        return cls.from_file(path)
    import yaml

    try:
        raw: Any = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse {path}: {err}") from None
    if not isinstance(raw, dict):
        return cls.from_file(path)
    base = path.resolve().parent
    for section, key in relative:
        sec = raw.get(section)
        if isinstance(sec, dict) and isinstance(sec.get(key), str) and not Path(sec[key]).is_absolute():
            sec[key] = str((base / sec[key]).resolve())
    from pydantic import ValidationError

    try:
        return cls.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source=str(path))) from None
