"""The metric the winner must keep: accuracy by default, or the user's own function with its direction and
budget (absolute or relative to the teacher)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from slimray.compress.measure import accuracy
from slimray.evaluation import EvalConfig, load_metric
from slimray.schema import ConfigError

CODE_DIR = str(Path(__file__).resolve().parent / "byom")


class Fixed(torch.nn.Module):
    """Predicts class (x[:, 0] > 0): logits from the first feature."""

    def forward(self, x):
        return torch.stack([-x[:, 0], x[:, 0]], dim=1)


@pytest.fixture()
def data():
    x = torch.tensor([[1.0], [-1.0], [2.0], [-3.0], [0.5]])
    y = torch.tensor([1, 0, 0, 0, 1])
    return x, y


def test_accuracy_is_the_default_and_keeps_the_search_budget(data):
    m = load_metric(EvalConfig(), default_max_drop=0.5)
    assert m.name == "accuracy" and m.budget(99.0) == 0.5
    assert m.value(Fixed(), *data) == pytest.approx(accuracy(Fixed(), *data)) == pytest.approx(80.0)


def test_a_user_metric_with_direction_and_relative_budget(data):
    m = load_metric(EvalConfig(metric="user_metrics:error_rate", higher_is_better=False, max_relative_drop=0.1),
                    default_max_drop=0.5, code_dir=CODE_DIR)
    err = m.value(Fixed(), *data)
    assert err == pytest.approx(0.2)
    assert m.quality(err) == pytest.approx(-0.2)  # lower is better: ranked on the negated value
    assert m.budget(0.2) == pytest.approx(0.02)
    f1 = load_metric(EvalConfig(metric="user_metrics:macro_f1", max_drop=0.05), default_max_drop=0.5, code_dir=CODE_DIR)
    assert 0 < f1.value(Fixed(), *data) < 1 and f1.budget(0.9) == 0.05


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"metric": "user_metrics:macro_f1"}, "needs its budget"),
        ({"higher_is_better": False}, "accuracy is higher-is-better"),
        ({"metric": "user_metrics:macro_f1", "max_drop": 0.1, "max_relative_drop": 0.1}, "not both"),
        ({"metric": "f1 score", "max_drop": 0.1}, "must look like 'package.module:function'"),
    ],
)
def test_bad_eval_configs_fail_at_load(kw, needle):
    with pytest.raises(ConfigError) as err:
        EvalConfig.from_dict(kw)
    assert needle in str(err.value)


def test_metric_that_cannot_be_imported_or_returns_junk(data):
    with pytest.raises(ConfigError, match="eval.metric 'user_metrics:nope'"):
        load_metric(EvalConfig(metric="user_metrics:nope", max_drop=1), default_max_drop=0.5, code_dir=CODE_DIR)
    junk = load_metric(EvalConfig(metric="user_metrics:not_a_number", max_drop=1), default_max_drop=0.5, code_dir=CODE_DIR)
    with pytest.raises(ValueError, match="returned str, not a number"):
        junk.value(Fixed(), *data)


@pytest.fixture(autouse=True)
def _clean_sys_path():
    before = list(sys.path)
    yield
    sys.path[:] = before
