"""A run's config, whatever its model family: the document's ``family:`` (default ``classifier``) picks the
family, and the family's strict schema validates the rest. Used by the CLI and by job submission, so one
``--config``/``--recipe`` handling serves every family."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slimray import families
from slimray.schema import ConfigError


def _document(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read it as YAML/JSON: {err}") from None


def family_of(*, recipe: str | None = None, config: str | Path | None = None) -> families.Family:
    if config is not None:
        return families.for_document(_document(Path(config)), source=str(config))
    from slimray.config import recipe_path

    name = recipe or "mnist"
    return families.for_recipe(name) or families.for_document(_document(recipe_path(name)), source=f"recipe {name}")


def load_run_config(*, recipe: str | None = None, config: str | Path | None = None) -> tuple[families.Family, Any]:
    """(family, validated config) for ``--recipe`` or ``--config`` (relative paths in a config file resolved
    against its folder). Fails before Ray starts, naming the file and field."""
    if recipe and config:
        raise ConfigError("give --recipe or --config, not both")
    family = family_of(recipe=recipe, config=config)
    return family, family.load("loader")(recipe=None if config is not None else (recipe or "mnist"), config=config)


def config_from_json(text: str, *, source: str) -> tuple[families.Family, Any]:
    """A config shipped as JSON (a submitted job's environment)."""
    try:
        doc = json.loads(text)
    except ValueError:
        raise ConfigError(f"{source}: not a JSON config document") from None
    family = families.for_document(doc, source=source)
    return family, family.load("config").from_json(text, source=source)


def with_overrides(family: families.Family, cfg: Any, **fields: Any) -> Any:
    """``cfg`` with command-line overrides (``name``, ``port``, ``grpc_port``, ``num_workers``, ``use_gpu``) applied and
    validated again (an override the family's config has no field for fails, naming it)."""
    data = cfg.model_dump()
    for key in ("num_workers", "use_gpu"):
        if fields.get(key):
            if key not in type(cfg.distill).model_fields:
                raise ConfigError(f"--{key.replace('_', '-')}: the {family.name} family's distill section has no {key}")
            data["distill"][key] = fields[key]
    if fields.get("name"):
        data["name"] = fields["name"]
    if fields.get("port"):
        data["serve"]["port"] = fields["port"]
    if fields.get("grpc_port"):
        data["serve"]["grpc_port"] = fields["grpc_port"]
    return family.load("config").from_dict(data, source="the command line")
