"""The classifier's trial, pure: the objective ASHA ranks by, trial keys."""

from __future__ import annotations

import pytest

from slimray.families.classifier.search import PENALTY_PER_POINT, objective, parse_setting, setting_name, trial_key


def test_objective_prefers_fast_feasible_trials():
    assert objective(99.0, 2.0, 98.0) > objective(99.5, 3.0, 98.0)  # both feasible: faster wins
    assert objective(97.9, 1.0, 98.0) < objective(98.0, 50.0, 98.0)  # under the floor loses to any feasible trial
    assert objective(97.0, 1.0, 98.0) == pytest.approx(-1.0 - PENALTY_PER_POINT)
    assert objective(90.0, 1.0, None) == -1.0


def test_setting_names_and_keys_round_trip():
    assert parse_setting(setting_name("static_int8", "onnxruntime")) == ("static_int8", "onnxruntime")
    assert trial_key(0.5, "none") == "prune0.50-none"  # torch keeps the short key
    assert trial_key(0.25, "static_int8", "onnxruntime") == "prune0.25-static_int8-onnxruntime"
