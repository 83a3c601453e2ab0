"""The shared pipeline's family contract (``slimray.families.recipe``): the quality constraint and report columns."""

from __future__ import annotations

import pytest


def test_the_quality_constraint_reads_a_drop_or_a_ratio():
    from slimray.families.recipe import Quality

    r2 = Quality("r2", "R²")
    assert r2.floor(0.9, 0.05) == pytest.approx(0.85) and r2.feasible(0.86, teacher_value=0.9, budget=0.05)
    ppl = Quality("perplexity", "ppl", higher_is_better=False, budget="ratio")
    assert ppl.floor(20.0, 1.15) == pytest.approx(23.0)
    assert ppl.feasible(22.9, teacher_value=20.0, budget=1.15) and not ppl.feasible(23.1, teacher_value=20.0, budget=1.15)


def test_a_column_renders_its_format_and_a_missing_value():
    from slimray.families.recipe import Column

    assert Column("size_bytes", "MB", "mb").render({"size_bytes": 2_500_000}) == "2.500"
    assert Column("speedup", "x", "x").render({"speedup": 1.456}) == "1.46x"
    assert Column("r2", "R²", "{:.3f}").render({}) == "-"
