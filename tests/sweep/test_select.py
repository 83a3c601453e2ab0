"""Winner selection: fastest within the accuracy budget, ties to the smaller model; the Pareto front."""

from __future__ import annotations

from slimray.sweep.select import choose, feasible, pareto_front


def t(key, acc, lat, size=100, status="ok"):
    return {"key": key, "accuracy": acc, "lat": lat, "size_bytes": size, "status": status}


TRIALS = [t("a", 99.0, 10.0), t("b", 98.8, 5.0), t("c", 98.0, 1.0), t("d", 98.9, 5.0, size=50), t("e", 0, 0, status="error")]


def test_fastest_feasible_wins_and_ties_go_to_smaller():
    w, ok, _ = choose(TRIALS, quality_key="accuracy", higher_is_better=True, floor=98.6, speed_key="lat", faster="min")
    assert ok and w["key"] == "d"  # b and d tie on latency; d is smaller


def test_infeasible_falls_back_to_most_accurate():
    w, ok, _ = choose(TRIALS, quality_key="accuracy", higher_is_better=True, floor=99.5, speed_key="lat", faster="min")
    assert not ok and w["key"] == "a"


def test_feasible_excludes_errors():
    assert {x["key"] for x in feasible(TRIALS, teacher_accuracy=99.0, max_drop=10)} == {"a", "b", "c", "d"}


def test_pareto_front():
    assert [x["key"] for x in pareto_front(TRIALS, latency_key="lat")] == ["c", "d", "a"]


def test_non_dominated_takes_a_direction_per_goal():
    from slimray.sweep.select import non_dominated

    rows = [{"key": "teacher", "ppl": 19.0, "tok_s": 15.0, "status": "ok"},
            {"key": "int8", "ppl": 19.7, "tok_s": 21.0, "status": "ok"},
            {"key": "student", "ppl": 22.4, "tok_s": 22.0, "status": "ok"},
            {"key": "slow-student", "ppl": 22.5, "tok_s": 14.0, "status": "ok"},  # beaten on both by the teacher
            {"key": "same-as-teacher", "ppl": 19.0, "tok_s": 15.0, "status": "ok"},  # equal: neither beats the other
            {"key": "failed", "status": "error"}]
    front = non_dominated(rows, goals={"ppl": "min", "tok_s": "max"})
    assert [r["key"] for r in front] == ["teacher", "int8", "student", "same-as-teacher"]


def test_one_rule_for_either_direction_of_quality_and_speed():
    from slimray.sweep.select import choose

    rows = [{"key": "a", "r2": 0.95, "rps": 100.0, "size_bytes": 10}, {"key": "b", "r2": 0.80, "rps": 900.0, "size_bytes": 5},
            {"key": "c", "r2": 0.93, "rps": 300.0, "size_bytes": 8}, {"key": "d", "status": "error"}]
    w, ok, tied = choose(rows, quality_key="r2", higher_is_better=True, floor=0.9, speed_key="rps")
    assert (w["key"], ok, tied) == ("c", True, [])
    ppl = [{"key": "x", "perplexity": 20.0, "ms": 30.0}, {"key": "y", "perplexity": 25.0, "ms": 10.0}]
    w, ok, _ = choose(ppl, quality_key="perplexity", higher_is_better=False, floor=21.0, speed_key="ms", faster="min")
    assert (w["key"], ok) == ("x", True)
    w, ok, _ = choose(ppl, quality_key="perplexity", higher_is_better=False, floor=15.0, speed_key="ms", faster="min")
    assert (w["key"], ok) == ("x", False)  # nothing feasible: the best quality, said so


def test_a_lead_inside_the_noise_is_a_tie_the_smaller_wins():
    from slimray.sweep.select import choose

    rows = [{"key": "big", "q": 1.0, "s": 103.0, "size_bytes": 100}, {"key": "small", "q": 1.0, "s": 100.0, "size_bytes": 50}]
    rounds = {"big": [103, 101, 104, 102], "small": [100, 102, 101, 100]}
    w, ok, tied = choose(rows, quality_key="q", higher_is_better=True, floor=0.5, speed_key="s", rounds=rounds, margin=0.03)
    assert w["key"] == "small" and ok and [t["key"] for t in tied] == ["big"]

