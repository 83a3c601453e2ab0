"""Choosing from trials (pure python): ``choose``, the one winner rule every family uses (fastest under the family's
quality constraint, a lead inside the noise a tie the smaller wins), the Pareto front, failure summaries."""

from __future__ import annotations

import random
from typing import Any, Callable


def feasible(trials: list[dict[str, Any]], *, teacher_accuracy: float, max_drop: float, accuracy_key: str = "accuracy") -> list[dict[str, Any]]:
    """Trials that finished and lost at most ``max_drop`` points against the teacher."""
    floor = teacher_accuracy - max_drop
    return [t for t in trials if t.get("status") == "ok" and t[accuracy_key] >= floor - 1e-9]


def non_dominated(trials: list[dict[str, Any]], *, goals: dict[str, str]) -> list[dict[str, Any]]:
    """The finished trials no other finished trial beats on every goal (``{key: "max" | "min"}``) and strictly on
    one, in their original order."""
    done = [t for t in trials if t.get("status") == "ok"]
    sign = {k: (1 if g == "max" else -1) for k, g in goals.items()}
    assert set(goals.values()) <= {"max", "min"}, goals

    def beats(o: dict[str, Any], t: dict[str, Any]) -> bool:
        diffs = [sign[k] * (o[k] - t[k]) for k in goals]
        return all(d >= 0 for d in diffs) and any(d > 0 for d in diffs)

    return [t for t in done if not any(o is not t and beats(o, t) for o in done)]


def pareto_front(trials: list[dict[str, Any]], *, latency_key: str) -> list[dict[str, Any]]:
    """Trials no other trial beats on both accuracy (higher) and latency (lower), fastest first."""
    return sorted(non_dominated(trials, goals={"accuracy": "max", latency_key: "min"}), key=lambda t: t[latency_key])


def failure_summary(trials: list[dict[str, Any]]) -> str:
    """The distinct first lines of the failed trials' errors, most frequent first (a full disk named first)."""
    from collections import Counter

    errors = Counter(str(t.get("explanation") or t.get("error") or "unknown error").splitlines()[0][:300] for t in trials if t.get("status") != "ok")
    disk = [e for e in errors if "Errno 28" in e or "no space left" in e.lower()]
    if disk:
        return f"the disk is full: {disk[0]}"
    return "; ".join(f"{e} ({n} trial{'s' if n > 1 else ''})" for e, n in errors.most_common(3)) or "no trial ran"


def sweep_failure(trials: list[dict[str, Any]]) -> Exception:
    """What to raise when no trial finished: an ENOSPC ``OSError`` when the disk filled up (so the CLI prints one
    line and the resume command), else a ``RuntimeError``, both naming the real cause."""
    import errno

    why = failure_summary(trials)
    if why.startswith("the disk is full"):
        return OSError(errno.ENOSPC, f"every sweep trial failed: {why}")
    return RuntimeError(f"every sweep trial failed: {why}")


def rounds_summary(samples: list[float]) -> dict[str, float]:
    """One figure's rounds (higher is better, e.g. tok/s): ``best`` (the figure reported), ``median``, ``min`` and
    ``spread`` = (best - min) / best, how much the rounds disagreed."""
    ordered = sorted(samples)
    n = len(ordered)
    median = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    return {"best": ordered[-1], "median": median, "min": ordered[0], "spread": (ordered[-1] - ordered[0]) / ordered[-1],
            "num_rounds": n}


def beats(a: list[float], b: list[float], *, margin: float) -> bool:
    """Whether ``a`` is faster than ``b`` beyond noise, from rounds timed side by side (``a[i]`` and ``b[i]`` in the
    same round; higher is better): ``a`` won at least three rounds in four and its median round-by-round ratio over
    ``b`` exceeds ``1 + margin``. With one round, the ratio alone decides."""
    assert len(a) == len(b) and a, (len(a), len(b))
    ratios = sorted(x / y for x, y in zip(a, b))
    n = len(ratios)
    median = ratios[n // 2] if n % 2 else (ratios[n // 2 - 1] + ratios[n // 2]) / 2
    return sum(r > 1 for r in ratios) >= 0.75 * n and median > 1 + margin


def pick_beyond_noise(ranked: list[dict[str, Any]], rounds: dict[str, list[float]], *, margin: float,
                      key: str = "key") -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """From ``ranked`` (feasible rows, fastest first by their best round), the row to choose and the rows tied with
    the fastest: those the fastest does not ``beats`` in the side-by-side ``rounds`` (keyed by ``row[key]``). Among
    the fastest and its ties the smallest model wins (``size_bytes``), then the faster."""
    head = ranked[0]
    tied = [r for r in ranked[1:] if not beats(rounds[head[key]], rounds[r[key]], margin=margin)]
    pool = [head, *tied]
    return min(pool, key=lambda r: (r["size_bytes"], pool.index(r))), tied


def ranking_stable(rounds: dict[str, list[float]], *, last: int = 2) -> bool:
    """Whether the leader by best round was the same after each of the ``last`` rounds (more rounds would not
    change who leads)."""
    n = min(len(v) for v in rounds.values())
    if n < last:
        return False
    leaders = {max(rounds, key=lambda k: max(rounds[k][:i])) for i in range(n - last + 1, n + 1)}
    return len(leaders) == 1


def timed_rounds(keys: list[str], time_round: Callable[[list[str]], dict[str, dict[str, float]]], *, num_rounds: int,
                 most_rounds: int, leaders: list[str], speed_key: str, seed: int = 0) -> tuple[dict[str, dict[str, list[float]]], int]:
    """Side-by-side timing in rounds, the same for every family: ``time_round(order)`` times every model once, in
    ``order`` (shuffled each round, so no model is always first or last), and returns key -> figures (``speed_key``
    higher is faster). At least ``num_rounds``; more, up to ``most_rounds``, until the same one of ``leaders`` led the
    last two rounds (``ranking_stable``). Returns (key -> figure -> one value per round, rounds timed)."""
    samples: dict[str, dict[str, list[float]]] = {k: {} for k in keys}
    order, rng = list(keys), random.Random(seed)
    n = 0
    for n in range(1, max(num_rounds, most_rounds) + 1):
        rng.shuffle(order)
        for k, figs in time_round(list(order)).items():
            for fig, x in figs.items():
                samples[k].setdefault(fig, []).append(x)
        if n >= num_rounds and (len(leaders) <= 1 or ranking_stable({k: samples[k][speed_key] for k in leaders})):
            break
    return samples, n


def choose(
    rows: list[dict[str, Any]], *, quality_key: str, higher_is_better: bool, floor: float, speed_key: str,
    faster: str = "max", rounds: dict[str, list[float]] | None = None, margin: float = 0.03, key: str = "key",
) -> tuple[dict[str, Any] | None, bool, list[dict[str, Any]]]:
    """The one winner rule: among finished rows whose quality is no worse than ``floor`` (the family's constraint),
    the fastest by ``speed_key`` (``faster``: ``max`` for a throughput, ``min`` for a latency), ties to the smaller;
    with side-by-side ``rounds`` (keyed by ``row[key]``, higher is faster) a lead inside the noise is a tie and the
    smallest of the tied wins (``pick_beyond_noise``). Returns (winner, whether it meets the constraint, the other rows
    of its tie). No feasible row: the best quality (then the fastest), ``False``."""
    assert faster in ("max", "min"), faster
    done = [r for r in rows if r.get("status", "ok") == "ok"]
    sign = 1 if higher_is_better else -1
    fast = -1 if faster == "max" else 1
    ok = [r for r in done if sign * (r[quality_key] - floor) >= -1e-9]
    if not ok:
        if not done:
            return None, False, []
        return max(done, key=lambda r: (sign * r[quality_key], -fast * r[speed_key])), False, []
    ranked = sorted(ok, key=lambda r: (fast * r[speed_key], r.get("size_bytes", 0)))
    if rounds and all(r[key] in rounds for r in ranked):
        winner, tied = pick_beyond_noise(ranked, rounds, margin=margin, key=key)
        return winner, True, [r for r in [ranked[0], *tied] if r is not winner]
    return ranked[0], True, []
