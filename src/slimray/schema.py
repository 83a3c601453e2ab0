"""The one strict pydantic base every slimray config and spec derives from.

``StrictModel`` forbids unknown fields, so a typo in a YAML file fails at load time naming the field;
``from_file`` reads YAML or JSON and turns pydantic's errors into a ``ConfigError`` that names the
file, the field path and what was allowed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Self

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError



NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(value: str, *, what: str = "name") -> str:
    """Names become folder names: letters, digits, '.', '_', '-' only (no path traversal)."""
    if not NAME_RE.match(value) or ".." in value:
        raise ValueError(f"{what} {value!r} must match {NAME_RE.pattern} and contain no '..'")
    return value


RunName = Annotated[str, AfterValidator(check_name)]  # a run's name: its folder under the output folder


def check_prune_ratios(value: list[float]) -> list[float]:
    """Fractions removed by structured pruning: each in [0, 1) (0 keeps the model whole), at least one; sorted,
    repeats dropped."""
    if not value:
        raise ValueError("at least one prune ratio")
    bad = [r for r in value if not 0.0 <= r < 1.0]
    if bad:
        raise ValueError(f"prune ratios must be in [0, 1): {bad}")
    return sorted(set(value))


PruneRatios = Annotated[list[float], AfterValidator(check_prune_ratios)]  # every family's search.prune_ratios


class ConfigError(ValueError):
    """A config or spec that does not validate; the message names the file and fields."""


class ClusterTooSmallError(RuntimeError):
    """The cluster cannot fit what was asked for; raised before anything waits on resources."""


class DeploymentFailedError(RuntimeError):
    """Serve could not start an application; the message carries what its replicas raised (``slimray.serving.app``)."""


# Tags of tagged unions (``Annotated[..., Tag(name)]``): pydantic puts them in an error's location, where
# they name no field of the file; the message leaves them out so that it reads like the YAML path.
UNION_TAGS: set[str] = set()


def format_validation_error(err: ValidationError, *, source: str) -> str:
    lines = [f"invalid {err.title} in {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if p not in UNION_TAGS) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (not allowed here; check the spelling)"
        lines.append(f"  - {loc}: {msg}")
    return "\n".join(lines)


class StrictModel(BaseModel):
    """Base for configs and specs: unknown fields are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "<dict>") -> Self:
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise ConfigError(format_validation_error(err, source=source)) from None

    @classmethod
    def from_file(cls, path: str | Path) -> Self:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        text = path.read_text()
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as err:
            raise ConfigError(f"cannot parse {path}: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_json(cls, text: str, *, source: str = "<json>") -> Self:
        try:
            return cls.model_validate_json(text)
        except ValidationError as err:
            raise ConfigError(format_validation_error(err, source=source)) from None
