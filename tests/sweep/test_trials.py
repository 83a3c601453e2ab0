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
                     max_concurrent_trials=1, advice=_advice, use_tune=use_tune)
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


def _epochs(key: str, shared: dict):
    for epoch in range(1, 4):
        yield {"key": key, "status": "ok", "epoch": epoch, "score": shared["base"] * epoch}


def test_a_generator_measure_reports_steps_and_its_last_step_is_the_result(tmp_path):
    out = run_trials(run_dir=tmp_path, keys=["a"], measure=_epochs, shared={"base": 2}, run_name="t", max_concurrent_trials=1,
                     use_tune=False)
    assert out["a"]["epoch"] == 3 and out["a"]["score"] == 6
    assert not (tmp_path / "trials" / "a.partial.json").exists()
    # a trial a scheduler stopped after its first step: the step it reported is its result
    (tmp_path / "trials" / "b.partial.json").write_text(json.dumps({"key": "b", "status": "ok", "epoch": 1}))
    assert read_result(tmp_path, "b")["epoch"] == 1


def _axes_key(config: dict) -> str:
    return f"r{config['ratio']}-{config['q']}"


def test_sampled_search_over_axes_under_a_scheduler_returns_the_keys_drawn(tmp_path, ray_session):
    from ray.tune.schedulers import ASHAScheduler

    from slimray.sweep.trials import Sampling

    keys = [_axes_key({"ratio": r, "q": q}) for r in (1, 2, 3) for q in ("x", "y")]
    asha = ASHAScheduler(time_attr="epoch", metric="score", mode="max", max_t=3, grace_period=1, reduction_factor=2)
    out = run_trials(run_dir=tmp_path, keys=keys, measure=_epochs, shared={"base": 1}, run_name="s", max_concurrent_trials=1,
                     axes={"ratio": [1, 2, 3], "q": ["x", "y"]}, key_of=_axes_key, timing_lock=True,
                     sampling=Sampling(algorithm="random", num_samples=4, metric="score", mode="max", scheduler=asha))
    assert 1 <= len(out) <= 4 and set(out) <= set(keys)  # the keys drawn (a key drawn twice is one result)
    assert all(r["status"] == "ok" and 1 <= r["epoch"] <= 3 for r in out.values())
    with pytest.raises(FileExistsError, match="--resume"):
        run_trials(run_dir=tmp_path, keys=keys, measure=_epochs, shared={"base": 1}, run_name="s", max_concurrent_trials=1,
                   axes={"ratio": [1, 2, 3], "q": ["x", "y"]}, key_of=_axes_key, resume=False,
                   sampling=Sampling(algorithm="random", num_samples=4))


def test_in_the_driver_a_measure_sees_what_a_trial_sees(tmp_path, ray_session):
    """use_tune=False: object-store references in ``shared`` are fetched and ``shared["timing"]`` is a no-op hold."""
    import numpy as np
    import ray

    def measure(key: str, shared: dict) -> dict:
        with shared["timing"](key):
            return {"key": key, "status": "ok", "score": int(shared["base"].sum())}

    out = run_trials(run_dir=tmp_path, keys=["a"], measure=measure, shared={"base": ray.put(np.arange(4))},
                     run_name="d", max_concurrent_trials=1, use_tune=False)
    assert out["a"]["score"] == 6
