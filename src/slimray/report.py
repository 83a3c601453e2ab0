"""Run reports: ``report.json`` (the contract), ``report.md`` (a table for people) and ``pareto.png``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimray.artifacts import write_json_atomic


def _fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def results_table(report: dict[str, Any]) -> str:
    """The headline table: teacher, labels-only student, distilled student, winner."""
    b = report["serving_batch_size"]
    t_lat = report["teacher"]["latency_ms"][f"batch_{b}"]
    rows = [
        ("teacher", report["teacher"]),
        ("student (labels only)", report["student"].get("labels_only")),
        ("student (distilled)", report["student"]),
        ("winner", report["winner"]),
    ]
    head = f"| model | test acc % | params | size KB | ms @ batch 1 | ms @ batch {b} | speedup @ {b} |"
    lines = [head, "|" + "---|" * 7]
    for name, r in rows:
        if not r:
            continue
        lat = r.get("latency_ms") or {}
        lb = lat.get(f"batch_{b}")
        speed = f"{t_lat / lb:.1f}x" if lb else "-"
        size = r.get("size_bytes")
        lines.append(
            f"| {name} | {_fmt(r.get('accuracy'))} | {_fmt(r.get('params'))} | {_fmt(size / 1024 if size else None, 0)} | "
            f"{_fmt(lat.get('batch_1'), 3)} | {_fmt(lb, 3)} | {speed} |"
        )
    return "\n".join(lines)


def trials_table(report: dict[str, Any]) -> str:
    b = report["serving_batch_size"]
    lines = [f"| prune ratio | quantization | status | val acc % | params | size KB | ms @ 1 | ms @ {b} |", "|" + "---|" * 8]
    for t in report["trials"]:
        if t["status"] != "ok":
            lines.append(f"| {t['prune_ratio']} | {t['quantization']} | {t['status']}: {t.get('error', '')[:60]} | | | | | |")
            continue
        lines.append(
            f"| {t['prune_ratio']} | {t['quantization']} | ok | {_fmt(t['val_accuracy'])} | {t['params']} | "
            f"{t['size_bytes'] / 1024:.0f} | {_fmt(t['latency_ms']['batch_1'], 3)} | {_fmt(t['latency_ms'][f'batch_{b}'], 3)} |"
        )
    return "\n".join(lines)


def write_pareto_png(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = report["serving_batch_size"]
    key = f"batch_{b}"
    ok = [t for t in report["trials"] if t["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    front = {t["key"] for t in report.get("pareto_front", [])}
    for q in sorted({t["quantization"] for t in ok}):
        pts = [t for t in ok if t["quantization"] == q]
        ax.scatter([t["latency_ms"][key] for t in pts], [t["val_accuracy"] for t in pts], label=q, s=36)
    fr = sorted((t for t in ok if t["key"] in front), key=lambda t: t["latency_ms"][key])
    if fr:
        ax.plot([t["latency_ms"][key] for t in fr], [t["val_accuracy"] for t in fr], "k--", lw=0.8, label="Pareto front")
    w = report["winner"]
    if w.get("key"):
        wt = next((t for t in ok if t["key"] == w["key"]), None)
        if wt:
            ax.scatter([wt["latency_ms"][key]], [wt["val_accuracy"]], marker="*", s=260, c="gold", edgecolors="k", zorder=5, label="winner")
    floor = report["accuracy_floor"]
    ax.axhline(floor + report["max_accuracy_drop"], color="grey", lw=0.8, label=f"teacher ({report['teacher_reference_split']})")
    ax.axhline(floor, color="red", lw=0.8, ls=":", label="accuracy floor")
    ax.set_xscale("log")
    ax.set_xlabel(f"latency at batch {b} (ms, sweep timing, log scale)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"slimray sweep: {report['recipe']} ({len(ok)} trials)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def write_report(report: dict[str, Any], run_dir: Path) -> None:
    write_json_atomic(run_dir / "report.json", report)
    w = report["winner"]
    b = report["serving_batch_size"]
    lines = [
        f"# slimray run `{report['name']}` (recipe `{report['recipe']}`)",
        "",
        results_table(report),
        "",
        f"Winner: prune ratio {w.get('prune_ratio')}, quantization `{w.get('quantization')}`; "
        f"{'within' if report['constraint_met'] else 'NOT within'} {report['max_accuracy_drop']} points of the teacher "
        f"(selection on validation accuracy). Speedup at batch {b} vs the teacher: "
        f"{report['speedup_vs_teacher'][f'batch_{b}']:.2f}x (latencies re-timed side by side in one process, "
        f"{report['timing']['num_threads']} thread(s)).",
        "",
        "Where the gain comes from (batch %d, side-by-side timing):" % b,
        "",
        "| step | ms | cumulative speedup |",
        "|---|---|---|",
    ]
    for step in report["gain_breakdown"]:
        lines.append(f"| {step['step']} | {step['latency_ms']:.3f} | {step['speedup_vs_teacher']:.2f}x |")
    lines += ["", "## All trials (sweep timing; the table above is re-timed)", "", trials_table(report), "", "![pareto](pareto.png)", ""]
    tmp = run_dir / ".report.md.tmp"
    tmp.write_text("\n".join(lines))
    tmp.replace(run_dir / "report.md")
    write_pareto_png(report, run_dir / "pareto.png")
