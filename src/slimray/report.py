"""Run reports: ``report.json`` (the contract), ``report.md`` (a table for people) and ``pareto.png``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slimray.storage import write_json_atomic


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
        ("student (distilled, recipe settings)", report.get("student_default")),
        ("student (distilled)" if "student_default" not in report else "student (distilled, sweep best)", report["student"]),
        (f"winner ({report['winner'].get('runtime', 'torch')})", report["winner"]),
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
    head = (
        f"| prune ratio | quantization | runtime | status | epochs | val acc % | params | size KB | peak MB | "
        f"ms @ 1 | ms @ {b} | trial s |"
    )
    lines = [head, "|" + "---|" * 12]
    for t in report["trials"]:
        rt = t.get("runtime", "torch")
        if t["status"] != "ok":
            why = (t.get("error") or "")[:80] + (f" at {t['stage']}" if t.get("stage") else "")
            lines.append(f"| {t['prune_ratio']} | {t['quantization']} | {rt} | {t['status']}: {why} (see Failed trials) | | | | | | | | |")
            continue
        peak = t.get("peak_memory_bytes")
        epochs = f"{t.get('finetune_epochs', '-')}{' (stopped early)' if t.get('stopped_early') else ''}"
        lines.append(
            f"| {t['prune_ratio']} | {t['quantization']} | {rt} | ok | {epochs} | {_fmt(t['val_accuracy'])} | {t['params']} | "
            f"{t['size_bytes'] / 1024:.0f} | {_fmt(peak / 2**20 if peak is not None else None, 1)} | "
            f"{_fmt(t['latency_ms']['batch_1'], 3)} | {_fmt(t['latency_ms'][f'batch_{b}'], 3)} | {_fmt(t.get('trial_seconds'), 1)} |"
        )
    return "\n".join(lines)


def speedup_table(report: dict[str, Any]) -> str:
    """Real speedup per prune ratio: measured latency ratio next to the parameter ratio (fp32 torch trials)."""
    b = report["serving_batch_size"]
    base = next((t for t in report["trials"] if t["status"] == "ok" and t["prune_ratio"] == 0 and t["quantization"] == "none"
                 and t.get("runtime", "torch") == "torch"), None)
    if base is None:
        return ""
    lines = [f"| prune ratio | params | param ratio | ms @ {b} | latency speedup |", "|---|---|---|---|---|"]
    for t in sorted(report["trials"], key=lambda t: t["prune_ratio"]):
        if t["status"] == "ok" and t["quantization"] == "none" and t.get("runtime", "torch") == "torch":
            ms = t["latency_ms"][f"batch_{b}"]
            lines.append(
                f"| {t['prune_ratio']} | {t['params']} | {base['params'] / t['params']:.2f}x | {ms:.3f} | "
                f"{base['latency_ms'][f'batch_{b}'] / ms:.2f}x |"
            )
    return "\n".join(lines)


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


def write_pareto_png(report: dict[str, Any], path: Path) -> None:
    plt = _plt()
    b = report["serving_batch_size"]
    key = f"batch_{b}"
    ok = [t for t in report["trials"] if t["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    front = {t["key"] for t in report.get("pareto_front", [])}
    for q in sorted({(t["quantization"], t.get("runtime", "torch")) for t in ok}):
        pts = [t for t in ok if (t["quantization"], t.get("runtime", "torch")) == q]
        ax.scatter([t["latency_ms"][key] for t in pts], [t["val_accuracy"] for t in pts], label=f"{q[0]} @ {q[1]}", s=36)
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
    m = report.get("metric") or {}
    name = m.get("name", "accuracy")
    ax.set_ylabel("validation accuracy (%)" if name == "accuracy" else f"validation {name}" + ("" if m.get("higher_is_better", True) else " (negated)"))
    ax.set_title(f"slimray sweep: {report['recipe']} ({len(ok)} trials)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    _save_png(fig, path)


def write_report(report: dict[str, Any], run_dir: Path) -> None:
    write_json_atomic(run_dir / "report.json", report)
    w = report["winner"]
    b = report["serving_batch_size"]
    lines = [
        f"# slimray run `{report['name']}` (recipe `{report['recipe']}`)",
        "",
        results_table(report),
        "",
        f"Winner: prune ratio {w.get('prune_ratio')}, quantization `{w.get('quantization')}`, runtime `{w.get('runtime', 'torch')}`; "
        f"{'within' if report['constraint_met'] else 'NOT within'} {report['max_accuracy_drop']:.4g} "
        f"{'points' if (report.get('metric') or {}).get('name', 'accuracy') == 'accuracy' else (report['metric']['name'] + ' units')} "
        f"of the teacher (selection on validation {(report.get('metric') or {}).get('name', 'accuracy')}). Speedup at batch {b} vs the teacher: "
        f"{report['speedup_vs_teacher'][f'batch_{b}']:.2f}x (latencies re-timed side by side in one process, "
        f"{report['timing']['num_threads']} thread(s)).",
        "",
    ]
    base = report.get("search_base") or {}
    if "kd_gain_points" in base:
        gain = base["kd_gain_points"]
        lines += [
            f"Distillation {'gained' if gain >= 0 else 'lost'} {abs(gain):.2f} points of validation accuracy against the same "
            f"student trained on labels only ({base['val_accuracy_distilled']:.2f}% vs {base['val_accuracy_labels_only']:.2f}%); "
            f"the search started from the {'labels-only' if base['student'] == 'student_labels_only' else 'distilled'} student.",
            "",
        ]
    same = report.get("speedup_vs_teacher_same_runtime")
    if same:
        lines += [
            f"Two speedups at batch {b}: {report['speedup_vs_teacher'][f'batch_{b}']:.2f}x against the teacher as given "
            f"(torch eager), {same[f'batch_{b}']:.2f}x against the teacher in the winner's runtime ({same['runtime']}, fp32): "
            "the second is what compression bought apart from the runtime.",
            "",
        ]
    lines += [
        "Where the gain comes from (batch %d, side-by-side timing):" % b,
        "",
        "| step | ms | cumulative speedup |",
        "|---|---|---|",
    ]
    for step in report["gain_breakdown"]:
        lines.append(f"| {step['step']} | {step['latency_ms']:.3f} | {step['speedup_vs_teacher']:.2f}x |")
    lines += ["", "## All trials (sweep timing; the table above is re-timed)", "", trials_table(report), ""]
    search = report.get("search")
    if search:
        lines += [
            f"Search: {search['algorithm']}, scheduler {search['scheduler']}; {search['num_trials']} trials, "
            f"{search['trial_seconds']:.0f} trial-seconds, {search['wall_s']:.0f} s wall.",
            "",
        ]
        for d in search.get("left_out", []):
            lines.append(f"- left out of the space: {d['quantization']} in {d['runtime']}: {d['why']}")
        lines.append("")
        if search.get("most_failed"):
            lines += [f"**{search['most_failed']}**", ""]
    failed = [t for t in report["trials"] if t["status"] != "ok"]
    if failed:
        lines += ["## Failed trials", ""]
        lines += [f"- {t.get('explanation') or t.get('error', 'unknown error')}" for t in failed]
        lines.append("")
    sp = speedup_table(report)
    if sp:
        lines += ["## Real speedup of pruning (fp32, torch eager, sweep timing)", "", sp, ""]
    lines += ["![pareto](pareto.png)", ""]
    if report.get("distill_sweep"):
        lines += distill_sweep_md(report["distill_sweep"])
    tmp = run_dir / ".report.md.tmp"
    tmp.write_text("\n".join(lines))
    tmp.replace(run_dir / "report.md")
    write_pareto_png(report, run_dir / "pareto.png")


def _setting(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else _fmt(v)


def distill_sweep_table(summary: dict[str, Any]) -> str:
    """One row per distillation trial: its settings, student, epochs run, why it stopped, accuracy, size, speed."""
    b = summary["serving_batch_size"]
    keys = summary["varying"]
    head = "| trial | " + " | ".join(keys) + f" | student | epochs run | why it ended | val acc % | params | ms @ {b} | trial s |"
    lines = [head, "|" + "---|" * (len(keys) + 8)]
    measured = {c["key"]: c for c in summary["candidates"]}
    for t in summary["trials"]:
        c = measured.get(t["trial_id"], {})
        st = t["student"]
        widths = st.get("conv_channels", []) + st.get("fc_hidden", []) if st.get("kind") == "cnn" else st.get("hidden", [])
        best = " **best**" if t["trial_id"] == summary["best"]["key"] else ""
        vals = " | ".join(_setting(t["settings"].get(k)) for k in keys)
        lines.append(
            f"| {t['trial_id']}{best} | {vals} | {widths} | {t['epochs_run']}/{t['epochs']} | {t['stop_reason']} | "
            f"{_fmt(t.get('val_accuracy'))} | {_fmt(c.get('params'))} | {_fmt((c.get('latency_ms') or {}).get(f'batch_{b}'), 3)} | "
            f"{_fmt(t.get('trial_seconds'), 0)} |"
        )
    return "\n".join(lines)


def best_vs_default_table(summary: dict[str, Any]) -> str:
    """The sweep's best student beside the recipe-settings one (held-out accuracy, size, side-by-side latency)."""
    b = summary["serving_batch_size"]
    lines = [f"| student | settings | val acc % | test acc % | params | ms @ 1 | ms @ {b} |", "|---|---|---|---|---|---|---|"]
    best, default = summary["best"], summary.get("default")
    rows = []
    if default is not None and best["key"] == default["key"]:
        rows.append(("best = default (recipe settings: no trial beat it)", default))
    else:
        rows.append((f"best (trial {best['key']})", best))
        if default is not None:
            rows.append(("default (recipe settings)", default))
    for name, c in rows:
        lat = c["latency_ms"]
        settings = ", ".join(f"{k}={_setting(v)}" for k, v in c.get("settings", {}).items())
        lines.append(
            f"| {name} | {settings} | {_fmt(c['val_accuracy'])} | {_fmt(c['test_accuracy'])} | "
            f"{c['params']} | {_fmt(lat['batch_1'], 3)} | {_fmt(lat[f'batch_{b}'], 3)} |"
        )
    return "\n".join(lines)


def distill_sweep_md(summary: dict[str, Any]) -> list[str]:
    s = summary["search"]
    return [
        "## Distillation sweep",
        "",
        f"{s['algorithm']}{', ASHA over epochs' if s['scheduler'] == 'asha' else ''}: {len(summary['trials'])} trials x "
        f"{s['num_workers']} Ray Train worker(s), {summary['max_concurrent_trials']} at a time; {summary['trial_seconds']:.0f} "
        f"trial-seconds, {summary['wall_s']:.0f} s wall. Best = highest validation accuracy (ties within {s['tie_tolerance']} "
        "points: fewer parameters, then faster; latencies timed side by side after the sweep).",
        "",
        best_vs_default_table(summary),
        "",
        distill_sweep_table(summary),
        "",
        "![distillation sweep](distill_sweep.png)",
        "",
    ]


def write_distill_sweep_png(summary: dict[str, Any], path: Path) -> None:
    """Validation accuracy per epoch of every trial (ASHA's stops show as short curves)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for t in summary["trials"]:
        h = [p for p in t.get("history", []) if p.get("val_accuracy") is not None]
        if not h:
            continue
        best = t["trial_id"] == summary["best"]["key"]
        ax.plot([p["epoch"] for p in h], [p["val_accuracy"] for p in h], marker="o", ms=3, lw=2.2 if best else 1.0,
                ls="-" if t["status"] == "completed" else "--", label=f"{t['trial_id']}{' (best)' if best else ''}")
    if summary.get("default"):
        ax.axhline(summary["default"]["val_accuracy"], color="grey", lw=0.8, ls=":", label="default student")
    ax.set_xlabel("epoch")
    m = summary.get("metric") or {}
    name = m.get("name", "accuracy")
    ax.set_ylabel("validation accuracy (%)" if name == "accuracy" else f"validation {name}" + ("" if m.get("higher_is_better", True) else " (negated)"))
    ax.set_title(f"distillation sweep ({len(summary['trials'])} trials; dashed: stopped early)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="lower right", ncol=2)
    _save_png(fig, path)


def write_distill_sweep(summary: dict[str, Any], run_dir: Path) -> None:
    write_json_atomic(run_dir / "distill_sweep.json", summary)
    tmp = run_dir / ".distill_sweep.md.tmp"
    tmp.write_text("\n".join(distill_sweep_md(summary)))
    tmp.replace(run_dir / "distill_sweep.md")
    write_distill_sweep_png(summary, run_dir / "distill_sweep.png")


# --------------------------------------------------------------------------------------- one renderer for any family


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
