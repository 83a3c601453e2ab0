"""Model families: the plug-in point. A family is one kind of model (a classifier, a sentence encoder, ...) and
says, in its own folder, how to load a teacher, derive a student, compute the KD loss on a Ray Train worker,
prune, quantize, evaluate, encode requests and store artifacts. Everything else is shared: one Ray Train loop
(``slimray.training.distill``) runs any family's ``TrainTask``, one Tune engine (``slimray.sweep.engine``) runs
every sweep, one Serve builder (``slimray.serving.app``) serves every artifact through the family's codec.

A family is registered here by name, with its hooks given as import paths (``"module:attribute"``), so that
importing the registry loads neither ray nor a family's heavy dependencies (transformers). A new family is a
folder under ``slimray/families/`` whose ``__init__`` declares its ``Family``, plus its package's name in ``DECLARED``
below (the tabular family is built that way; the first three are registered here). A family with a ``recipe`` runs on
the shared pipeline (``slimray.pipelines.flow``).

Config documents name their family with ``family:`` (default ``classifier``); artifacts name theirs through
their ``spec.json`` format.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimray.schema import ConfigError


@dataclass(frozen=True)
class Family:
    """One model family and where its parts live (``"module:attribute"`` import paths, resolved on use)."""

    name: str
    description: str
    config: str  # the strict pydantic config of a run of this family (a StrictModel with from_file)
    loader: str  # load(recipe=..., config=...) -> config, relative paths resolved against the file's folder
    stages: str  # its Stages on the one pipeline (slimray.pipelines): distil, search, report (Ray side)
    train_task: str  # a TrainTask subclass, built on every Ray Train worker (pure torch)
    serve_check: str  # check(url, run_dir, serve_cfg): one request compared with the in-process model, usage printed
    codec: str  # the serving codec (request decoding, answer encoding) of its artifacts
    artifact_format: str  # the ``format`` field of its artifacts' spec.json
    recipes: tuple[str, ...] = ()
    export: str | None = None  # export(run_dir, fmt=, out=, trial=, **options) -> check dict with a "summary" line
    export_formats: tuple[str, ...] = ()  # what ``slimray export --format`` takes for its runs
    recipe: str | None = None  # its hooks for the shared pipeline (slimray.families.recipe.Recipe)
    artifact_spec: str | None = None  # the StrictModel of its artifacts' spec.json (checked before serving)
    student_sweep: str | None = None  # a distillation sweep (Tune over Train) the pipeline runs when a config asks for one
    student_sweep_check: str | None = None  # check(cfg) before anything trains: the sweep's trials fit the cluster

    def load(self, hook: str) -> Any:
        """The object a hook names, e.g. ``family.load("config")``."""
        return resolve(getattr(self, hook))


_REGISTRY: dict[str, Family] = {}

#: families declared in their own package (its ``__init__`` defines ``FAMILY``, hooks named as strings), loaded on
#: first use of the registry; a new family is one entry here
DECLARED: tuple[str, ...] = (
    "slimray.families.tabular",
)
_loaded = False


def _load_declared() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for package in DECLARED:
        register(importlib.import_module(package).FAMILY)


def resolve(path: str) -> Any:
    module, _, attr = path.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def register(family: Family) -> Family:
    if family.name in _REGISTRY and _REGISTRY[family.name] != family:
        raise ValueError(f"model family {family.name!r} is already registered")
    _REGISTRY[family.name] = family
    return family


def names() -> list[str]:
    _load_declared()
    return sorted(_REGISTRY)


def get(name: str) -> Family:
    _load_declared()
    if name not in _REGISTRY:
        raise ConfigError(f"family: unknown model family {name!r}; known: {', '.join(names())}")
    return _REGISTRY[name]


def for_document(data: Any, *, source: str = "the config") -> Family:
    """The family a config document declares (``family:``; absent means ``classifier``)."""
    name = data.get("family", "classifier") if isinstance(data, dict) else "classifier"
    if not isinstance(name, str):
        raise ConfigError(f"{source}: family must be a string naming a model family ({', '.join(names())})")
    try:
        return get(name)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def for_recipe(name: str) -> Family | None:
    _load_declared()
    return next((f for f in _REGISTRY.values() if name in f.recipes), None)


def for_artifact(model_dir: str | Path) -> Family:
    """The family whose artifact format ``model_dir/spec.json`` declares (unreadable specs: classifier, whose
    loader then reports the damage)."""
    fmt = None
    for meta in ("spec.json", "slimray_lm.json"):  # causal LMs are HF folders with slimray_lm.json beside
        try:
            fmt = json.loads((Path(model_dir) / meta).read_text()).get("format")
            break
        except (OSError, ValueError, AttributeError):
            continue
    if fmt is None:
        return get("classifier")
    _load_declared()
    kind = str(fmt).split("/")[0]  # any version of a family's format (its loader refuses one it no longer reads)
    return next((f for f in _REGISTRY.values() if f.artifact_format.split("/")[0] == kind), get("classifier"))


register(Family(
    name="classifier",
    description="any nn.Module from a tensor (image, feature vector) to class logits",
    config="slimray.config:PipelineConfig",
    loader="slimray.config:load_config",
    stages="slimray.pipelines.flow:FlowStages",
    train_task="slimray.families.classifier.train:ClassifierTask",
    serve_check="slimray.serving.checks:check_classifier",
    codec="slimray.serving.codecs:ClassifierCodec",
    artifact_format="slimray.model/1",
    artifact_spec="slimray.families.classifier.artifacts:ArtifactSpec",
    recipe="slimray.families.classifier.recipe:ClassifierRecipe",
    student_sweep="slimray.sweep.distill_search:sweep_students",
    student_sweep_check="slimray.sweep.distill_search:check_student_sweep",
    recipes=("mnist", "digits"),
    export="slimray.exports:export_run",
    export_formats=("onnx", "torch-export"),
))
register(Family(
    name="sentence_encoder",
    description="a BERT-class encoder from sentences to embeddings (mean-pooled), e.g. all-MiniLM-L6-v2",
    config="slimray.families.sentence_encoder.config:TextPipelineConfig",
    loader="slimray.families.sentence_encoder.config:load_text_config",
    stages="slimray.pipelines.flow:FlowStages",
    train_task="slimray.families.sentence_encoder.train:EncoderTask",
    serve_check="slimray.serving.checks:check_encoder",
    codec="slimray.serving.codecs:SentenceEncoderCodec",
    artifact_format="slimray.text-model/1",
    artifact_spec="slimray.families.sentence_encoder.models:TextArtifactSpec",
    recipe="slimray.families.sentence_encoder.recipe:EncoderRecipe",
    recipes=("minilm", "minilm-tiny"),
))

register(Family(
    name="causal_lm",
    description="decoder language models (GPT/Llama class) from a local HF folder or the packaged SmolLM2 GGUF",
    config="slimray.families.causal_lm.config:LMPipelineConfig",
    loader="slimray.families.causal_lm.config:load_lm_config",
    stages="slimray.pipelines.flow:FlowStages",
    train_task="slimray.families.causal_lm.train:CausalLMTask",
    serve_check="slimray.serving.checks:check_causal_lm",
    codec="slimray.families.causal_lm.serving:CausalLMCodec",
    artifact_format="slimray.causal_lm/2",
    recipe="slimray.families.causal_lm.recipe:CausalLMRecipe",
    recipes=("smollm", "smollm-tiny"),
    export="slimray.families.causal_lm.gguf_export:export_lm_run",
    export_formats=("gguf",),
))
