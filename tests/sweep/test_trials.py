"""The one compression-search trainable: results written once and reused, failures recorded with advice, the search
going on; the same contract in the driver (``use_tune=False``) and as Tune trials."""

from __future__ import annotations

import json

import pytest

from slimray.sweep.trials import read_result, run_trials


def _measure(key: str, shared: dict) -> dict:
    if key == "bad":
        raise ValueError("no kernel for this")
    return {"key": key, "status": "ok", "score": shared["base"] + len(key)}


def _advice(error: str, key: str) -> str:
    return f"leave {key} out ({error[:20]})"


@pytest.mark.parametrize("use_tune", [False, True])
def test_results_are_written_once_and_failures_carry_advice(tmp_path, use_tune, request):
    if use_tune:
        request.getfixturevalue("ray_session")
    out = run_trials(run_dir=tmp_path, keys=["a", "bad", "ccc"], measure=_measure, shared={"base": 10}, run_name="t",
                     max_concurrent_trials=1, advice=_advice, use_tune=use_tune, metric="score")
    assert list(out) == ["a", "bad", "ccc"]
    assert out["a"]["score"] == 11 and out["ccc"]["score"] == 13
    assert out["bad"]["status"] == "error" and "no kernel" in out["bad"]["error"] and out["bad"]["advice"].startswith("leave bad out")
    saved = json.loads((tmp_path / "trials" / "bad.error.json").read_text())
    assert "Traceback" in saved["traceback"] and saved["advice"].startswith("leave bad out")
    # a rerun keeps finished results (a changed measure is not called for them)
    (tmp_path / "trials" / "a.json").write_text(json.dumps({"key": "a", "status": "ok", "score": -1}))
    again = run_trials(run_dir=tmp_path, keys=["a", "ccc"], measure=_measure, shared={"base": 0}, run_name="t",
                       max_concurrent_trials=1, use_tune=use_tune)
    assert again["a"]["score"] == -1 and again["ccc"]["score"] == 13


def test_a_key_that_never_ran_reads_as_not_finished(tmp_path):
    r = read_result(tmp_path, "never", advice=_advice)
    assert r == {"status": "error", "error": "trial did not finish", "advice": "leave never out (trial did not finish)"}
