"""The one report renderer of every family: markdown tables of rows (``rows_table``, a family's ``Column`` list), the
quality-against-speed plot with its front (``write_front_png``) and per-epoch curves (``write_curves_png``), each plot
written atomically (the markdown through ``slimray.storage.write_text_atomic``). A family's own sections are rows and
columns too (``slimray.families.<family>.report``). Pure python.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_png(fig, path: Path) -> None:
    """Write the figure atomically and close it."""
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    _plt().close(fig)
    tmp.replace(path)


def write_curves_png(curves: dict[str, tuple[list[float], list[float], bool, bool]], path: Path, *, xlabel: str, ylabel: str,
                     title: str, reference: tuple[float, str] | None = None) -> None:
    """One line per curve: label -> (xs, ys, highlighted, dashed); ``reference``: a horizontal line and its label."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for label, (xs, ys, bold, dashed) in curves.items():
        ax.plot(xs, ys, marker="o", ms=3, lw=2.2 if bold else 1.0, ls="--" if dashed else "-", label=label)
    if reference is not None:
        ax.axhline(reference[0], color="grey", lw=0.8, ls=":", label=reference[1])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="lower right", ncol=2)
    _save_png(fig, path)


def rows_table(rows: list[dict[str, Any]], columns: list[Any], *, name_key: str = "key") -> str:
    """A markdown table of ``rows``, one column per ``columns`` entry (objects with ``key``, ``header`` and
    ``render(row)``: ``slimray.families.recipe.Column``). A failed row shows its error and advice instead."""
    head = "| " + " | ".join(["model", *(c.header for c in columns)]) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 1)]
    for r in rows:
        if r.get("status", "ok") != "ok":
            why = str(r.get("error") or "")[:100] + (f"; {r['advice']}" if r.get("advice") else "")
            lines.append(f"| {r.get(name_key)} | failed: {why} |" + " |" * (len(columns) - 1))
            continue
        lines.append("| " + " | ".join([str(r.get(name_key)), *(c.render(r) for c in columns)]) + " |")
    return "\n".join(lines)


def write_front_png(rows: list[dict[str, Any]], front: list[dict[str, Any]], path: Path, *, quality_key: str,
                    quality_label: str, speed_key: str, speed_label: str, winner: str | None, floor: float | None) -> None:
    """Quality against speed for every finished row, the non-dominated front joined, the winner ringed and the
    quality constraint drawn."""
    plt = _plt()
    ok = [r for r in rows if r.get("status", "ok") == "ok"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.scatter([r[speed_key] for r in ok], [r[quality_key] for r in ok], s=18, color="tab:gray", label="candidates")
    pts = sorted(front, key=lambda r: r[speed_key])
    ax.plot([r[speed_key] for r in pts], [r[quality_key] for r in pts], "-o", color="tab:blue", ms=4, label="Pareto front")
    for r in ok:
        if r.get("key") == winner:
            ax.scatter([r[speed_key]], [r[quality_key]], s=120, facecolors="none", edgecolors="tab:red", label="winner")
    if floor is not None:
        ax.axhline(floor, ls="--", color="tab:red", lw=0.8, label="quality constraint")
    ax.set_xlabel(speed_label)
    ax.set_ylabel(quality_label)
    ax.legend(fontsize=8)
    _save_png(fig, path)
