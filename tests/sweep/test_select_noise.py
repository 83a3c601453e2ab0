"""The shared noise-aware winner rule: side-by-side rounds summarised with their spread, a finalist that is not
faster beyond noise ties, the smallest of the tied wins, and rounds continue until the leader holds."""

from __future__ import annotations

from slimray.sweep.select import beats, pick_beyond_noise, ranking_stable, rounds_summary


def test_rounds_summary_gives_the_best_round_and_the_spread():
    s = rounds_summary([40.0, 50.0, 45.0])
    assert (s["best"], s["median"], s["min"], s["num_rounds"]) == (50.0, 45.0, 40.0, 3)
    assert abs(s["spread"] - 0.2) < 1e-9


def test_beats_needs_a_margin_and_three_rounds_in_four():
    assert beats([50, 51, 52, 50], [40, 41, 40, 42], margin=0.03)
    assert not beats([50, 51, 52, 50], [49.5, 50.5, 51, 49.8], margin=0.03)  # ~1% faster: noise
    assert not beats([60, 40, 60, 40], [50, 50, 50, 50], margin=0.03)  # wins half the rounds only
    assert beats([50.0], [40.0], margin=0.03) and not beats([50.0], [49.0], margin=0.03)


def test_a_win_inside_the_noise_is_a_tie_and_the_smaller_model_is_chosen():
    fast = {"key": "teacher-int4", "size_bytes": 300}
    small = {"key": "student-int4", "size_bytes": 200}
    slow = {"key": "teacher-int8", "size_bytes": 250}
    rounds = {"teacher-int4": [40.0, 42.0, 41.0], "student-int4": [40.5, 41.0, 40.0], "teacher-int8": [30.0, 31.0, 29.0]}
    winner, tied = pick_beyond_noise([fast, small, slow], rounds, margin=0.03)
    assert winner is small and tied == [small]
    rounds["teacher-int4"] = [50.0, 52.0, 51.0]  # now clearly faster: it wins although it is larger
    winner, tied = pick_beyond_noise([fast, small, slow], rounds, margin=0.03)
    assert winner is fast and tied == []


def test_ranking_stable_when_the_leader_holds_for_the_last_rounds():
    assert not ranking_stable({"a": [10.0], "b": [9.0]})
    assert ranking_stable({"a": [10.0, 11.0], "b": [9.0, 9.5]})
    assert not ranking_stable({"a": [10.0, 10.0], "b": [9.0, 12.0]})
