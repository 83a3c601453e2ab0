"""The model-family registry: every family's parts resolve and fit the shared engines; artifacts and config
documents name their family; a family's TrainTask trains in one process through the shared epoch loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimray import families
from slimray.families.base import TrainTask, describe_val, run_epoch
from slimray.schema import ConfigError


@pytest.mark.parametrize("name", families.names())
def test_every_family_names_parts_that_fit_the_shared_engines(name):
    from slimray.pipelines import Stages
    from slimray.serving.codecs import Codec

    fam = families.get(name)
    assert hasattr(fam.load("config"), "from_file") and callable(fam.load("loader"))
    assert issubclass(fam.load("stages"), Stages) and fam.load("stages").names
    assert issubclass(fam.load("train_task"), TrainTask)
    codec = fam.load("codec")
    assert issubclass(codec, Codec) and codec.kind == name
    assert callable(fam.load("serve_check"))
    for recipe in fam.recipes:
        assert families.for_recipe(recipe) is fam


def test_formats_and_recipes_are_unique():
    fams = [families.get(n) for n in families.names()]
    assert len({f.artifact_format for f in fams}) == len(fams)
    recipes = [r for f in fams for r in f.recipes]
    assert len(recipes) == len(set(recipes))


def test_documents_name_their_family():
    assert families.for_document({"name": "x"}).name == "classifier"
    assert families.for_document({"family": "sentence_encoder"}).name == "sentence_encoder"
    with pytest.raises(ConfigError, match="my.yaml: family: unknown model family 'speech'"):
        families.for_document({"family": "speech"}, source="my.yaml")
    with pytest.raises(ConfigError, match="family must be a string"):
        families.for_document({"family": 3})


def test_artifacts_name_their_family(tmp_path):
    from slimray.families.classifier.artifacts import ArtifactSpec, save_artifact
    from slimray.families.classifier.spec import InputSpec, MLPSpec, build_model

    spec = MLPSpec(in_features=4, hidden=[8], num_classes=3)
    save_artifact(tmp_path / "m", build_model(spec), ArtifactSpec(name="m", model=spec, input=InputSpec(shape=[4], min_value=-10, max_value=10)))
    assert families.for_artifact(tmp_path / "m").name == "classifier"
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "spec.json").write_text('{"format": "slimray.text-model/1"}')
    assert families.for_artifact(tmp_path / "t").name == "sentence_encoder"


def test_a_family_task_trains_in_one_process_through_the_shared_epoch_loop():
    """The classifier's TrainTask outside Ray: the shared loop's contract (build, batches, loss, validate,
    split/load parts) is all it needs."""
    from slimray.families.classifier.spec import MLPSpec
    from slimray.families.classifier.train import ClassifierTask

    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    spec = MLPSpec(in_features=6, hidden=[16], num_classes=2)
    cfg = {"spec": spec.model_dump(), "lr": 0.05, "epochs": 3, "batch_size": 32, "seed": 0, "weight_decay": 0.0,
           "lr_schedule": "constant", "task": {"alpha": 0.0, "temperature": 4.0}}
    task = ClassifierTask(cfg, {"x_train": x, "y_train": y, "x_val": x[:64], "y_val": y[:64]})
    torch.manual_seed(0)
    net = task.build()
    opt = task.optimizer(task.parameters(net))
    losses = []
    for epoch in range(3):
        task.set_epoch(epoch)
        stats = run_epoch(net, task.batches(epoch), task.loss, opt, lr_at=lambda s: cfg["lr"] * task.lr_factor(epoch=epoch, step=s))
        losses.append(stats.loss)
        assert task.epoch_counts(stats.num_samples) == {"samples_seen": 256, "distinct_samples": 256, "max_seen_per_sample": 1}
    assert losses[-1] < losses[0]
    parts = task.split_state(net.state_dict())
    student = ClassifierTask.rebuild(cfg, parts["model"])
    metrics = task.validate(student)
    assert metrics["val_accuracy"] > 80.0 and describe_val(metrics).startswith("val acc ")


def test_registered_formats_are_the_ones_the_artifact_writers_write():
    from slimray.families.classifier.artifacts import FORMAT as CLASSIFIER_FORMAT
    from slimray.families.causal_lm.artifacts import LMArtifactMeta
    from slimray.families.sentence_encoder.models import FORMAT as TEXT_FORMAT

    assert families.get("classifier").artifact_format == CLASSIFIER_FORMAT
    assert families.get("sentence_encoder").artifact_format == TEXT_FORMAT
    assert families.get("causal_lm").artifact_format == LMArtifactMeta().format


def test_a_causal_lm_folder_names_its_family(tmp_path):
    (tmp_path / "slimray_lm.json").write_text('{"format": "slimray.causal_lm/1"}')
    assert families.for_artifact(tmp_path).name == "causal_lm"
