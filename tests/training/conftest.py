"""Training fixtures: the trained digits CNN saved as a teacher artifact (safetensors + spec.json)."""

from __future__ import annotations

import pytest
import torch

from slimray.families.classifier.artifacts import ArtifactSpec, save_artifact

from ..conftest import DIGITS_CNN


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, trained_digits_cnn, digits):
    path = tmp_path_factory.mktemp("teacher") / "teacher"
    save_artifact(path, trained_digits_cnn, ArtifactSpec(name="teacher", model=DIGITS_CNN, input=digits.input))
    return path


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """In-process torch work in these tests uses one thread (2 cores, shared with Ray workers)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
