"""Shared fixtures: one local Ray per test session (2 CPUs, like CI), a small trained digits model,
and one tiny end-to-end digits run that the pipeline, sweep and serving tests all read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from slimray.config import PipelineConfig, load_config
from slimray.families.classifier.datasets import load_digits
from slimray.families.classifier import build_model
from slimray.families.classifier.spec import CNNSpec
from slimray.families.classifier.kd import finetune

REPO = Path(__file__).resolve().parents[1]
DIGITS_CNN = CNNSpec(in_channels=1, image_size=8, conv_channels=[16, 32], fc_hidden=[64], num_classes=10)


@pytest.fixture(scope="session")
def digits():
    return load_digits(seed=0)


@pytest.fixture(scope="session")
def trained_digits_cnn(digits):
    """A CNN trained in-process on digits for a few seconds (no Ray): ~95%+ on held-out digits."""
    torch.manual_seed(0)
    model = build_model(DIGITS_CNN)
    x, y = digits.normalized("train")
    finetune(model, x, y, None, epochs=25, lr=3e-3, batch_size=64, seed=0)
    return model.eval()


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from slimray.runtime import init_ray

    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "30")
    init_ray(num_cpus=2, dashboard=True)  # some tests read the State API (ray.util.state.list_actors)
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


def tiny_digits_config(name: str = "digits-test") -> PipelineConfig:
    """The digits recipe cut down so the whole pipeline runs in about a minute on 2 cores."""
    cfg = load_config(recipe="digits").model_dump()
    cfg["name"] = name
    cfg["teacher"]["epochs"] = 12
    cfg["distill"]["epochs"] = 12
    cfg["search"]["space"] = {"prune_ratios": [0.0, 0.5], "quantizations": ["none", "static_int8"], "runtimes": ["torch", "onnxruntime"]}
    cfg["search"]["finetune_epochs"] = 2
    cfg["search"]["num_timing_repeats"] = 5
    cfg["search"]["max_accuracy_drop"] = 5.0
    return PipelineConfig.model_validate(cfg)


@pytest.fixture(scope="session")
def digits_run(ray_session, tmp_path_factory):
    """One tiny end-to-end digits run (teacher, 2-worker distillation, sweep); returns (run_dir, report)."""
    from slimray.pipelines import run_pipeline

    out = tmp_path_factory.mktemp("runs")
    cfg = tiny_digits_config()
    report = run_pipeline(cfg, out_dir=out)
    return out / cfg.name, report
