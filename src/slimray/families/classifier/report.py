"""The classifier's report.md and plots, from its report.json, through the shared renderer (``slimray.report``): its
models, trials, pruning speedups and distillation-sweep trials are rows, each table a list of ``Column``s, each plot
the shared quality-against-speed front or per-epoch curves. Pure: no Ray.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimray.families.recipe import Column
from slimray.report import rows_table, write_curves_png, write_front_png
from slimray.storage import write_json_atomic, write_text_atomic


def _b(report: dict[str, Any]) -> int:
    return report["serving_batch_size"]


def _lat_columns(b: int) -> list[Column]:
    return [Column("ms_b1", "ms @ batch 1", "{:.3f}"), Column("ms_b", f"ms @ batch {b}", "{:.3f}")]


def headline_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Teacher, labels-only student, recipe-settings student (after a distillation sweep), the student searched, winner."""
    b = _b(report)
    t_lat = report["teacher"]["latency_ms"][f"batch_{b}"]
    named = [
        ("teacher", report["teacher"]),
        ("student (labels only)", report["student"].get("labels_only")),
        ("student (distilled, recipe settings)", report.get("student_default")),
        ("student (distilled)" if "student_default" not in report else "student (distilled, sweep best)", report["student"]),
        (f"winner ({report['winner'].get('runtime', 'torch')})", report["winner"]),
    ]
    rows = []
    for name, r in named:
        if not r:
            continue
        lat = r.get("latency_ms") or {}
        lb = lat.get(f"batch_{b}")
        rows.append({"key": name, "accuracy": r.get("accuracy"), "params": r.get("params"), "size_bytes": r.get("size_bytes"),
                     "ms_b1": lat.get("batch_1"), "ms_b": lb, "speedup": t_lat / lb if lb else None})
    return rows


def headline_table(report: dict[str, Any]) -> str:
    b = _b(report)
    cols = [Column("accuracy", "test acc %", "{:.2f}"), Column("params", "params", "{:,}"), Column("size_bytes", "size MB", "mb"),
            *_lat_columns(b), Column("speedup", f"speedup @ {b}", "x")]
    return rows_table(headline_rows(report), cols)


def trial_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every trial flattened: its sweep latencies as ``ms_b1``/``ms_b``, epochs with a stop mark, peak memory."""
    b = _b(report)
    rows = []
    for t in report["trials"]:
        lat = t.get("latency_ms") or {}
        rows.append({
            **t, "runtime": t.get("runtime", "torch"), "ms_b1": lat.get("batch_1"), "ms_b": lat.get(f"batch_{b}"),
            "epochs": f"{t.get('finetune_epochs', '-')}{' (stopped early)' if t.get('stopped_early') else ''}",
            "error": (t.get("error") or "") + (f" at {t['stage']}" if t.get("stage") else ""),
        })
    return rows


def trials_table(report: dict[str, Any]) -> str:
    cols = [Column("prune_ratio", "prune ratio"), Column("quantization", "quantization"), Column("runtime", "runtime"),
            Column("epochs", "epochs"), Column("val_accuracy", "val acc %", "{:.2f}"), Column("params", "params", "{:,}"),
            Column("size_bytes", "size MB", "mb"), Column("peak_memory_bytes", "peak MB", "mb"), *_lat_columns(_b(report)),
            Column("trial_seconds", "trial s", "{:.1f}")]
    return rows_table(trial_rows(report), cols)


def pruning_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The fp32 torch trials per prune ratio: parameter ratio beside the measured latency ratio (sweep timing)."""
    b = _b(report)
    fp32 = sorted((t for t in report["trials"] if t["status"] == "ok" and t["quantization"] == "none"
                   and t.get("runtime", "torch") == "torch"), key=lambda t: t["prune_ratio"])
    base = next((t for t in fp32 if t["prune_ratio"] == 0), None)
    if base is None:
        return []
    return [{"key": f"prune {t['prune_ratio']}", "params": t["params"], "param_ratio": base["params"] / t["params"],
             "ms_b": t["latency_ms"][f"batch_{b}"], "speedup": base["latency_ms"][f"batch_{b}"] / t["latency_ms"][f"batch_{b}"]}
            for t in fp32]


def report_md(report: dict[str, Any]) -> list[str]:
    w, b = report["winner"], _b(report)
    metric = report.get("metric") or {}
    name = metric.get("name", "accuracy")
    lines = [
        f"# slimray run `{report['name']}` (recipe `{report['recipe']}`)", "", headline_table(report), "",
        f"Winner: prune ratio {w.get('prune_ratio')}, quantization `{w.get('quantization')}`, runtime `{w.get('runtime', 'torch')}`; "
        f"{'within' if report['constraint_met'] else 'NOT within'} {report['max_accuracy_drop']:.4g} "
        f"{'points' if name == 'accuracy' else name + ' units'} of the teacher (selection on validation {name}). Speedup at "
        f"batch {b} vs the teacher: {report['speedup_vs_teacher'][f'batch_{b}']:.2f}x (latencies re-timed side by side in one "
        f"process, {report['timing']['num_threads']} thread(s)).", "",
    ]
    base = report.get("search_base") or {}
    if "kd_gain_points" in base:
        gain = base["kd_gain_points"]
        lines += [
            f"Distillation {'gained' if gain >= 0 else 'lost'} {abs(gain):.2f} points of validation accuracy against the same "
            f"student trained on labels only ({base['val_accuracy_distilled']:.2f}% vs {base['val_accuracy_labels_only']:.2f}%); "
            f"the search started from the {'labels-only' if base['student'] == 'student_labels_only' else 'distilled'} student.", "",
        ]
    same = report.get("speedup_vs_teacher_same_runtime")
    if same:
        lines += [
            f"Two speedups at batch {b}: {report['speedup_vs_teacher'][f'batch_{b}']:.2f}x against the teacher as given "
            f"(torch eager), {same[f'batch_{b}']:.2f}x against the teacher in the winner's runtime ({same['runtime']}, fp32): "
            "the second is what compression bought apart from the runtime.", "",
        ]
    steps = [{"key": s["step"], "ms_b": s["latency_ms"], "speedup": s["speedup_vs_teacher"]} for s in report["gain_breakdown"]]
    lines += [f"Where the gain comes from (batch {b}, side-by-side timing):", "",
              rows_table(steps, [Column("ms_b", "ms", "{:.3f}"), Column("speedup", "cumulative speedup", "x")]),
              "", "## All trials (sweep timing; the table above is re-timed)", "", trials_table(report), ""]
    search = report.get("search")
    if search:
        lines += [f"Search: {search['algorithm']}, scheduler {search['scheduler']}; {search['num_trials']} trials, "
                  f"{search['trial_seconds']:.0f} trial-seconds, {search['wall_s']:.0f} s wall.", ""]
        lines += [f"- left out of the space: {d['quantization']} in {d['runtime']}: {d['why']}" for d in search.get("left_out", [])]
        lines.append("")
        if search.get("most_failed"):
            lines += [f"**{search['most_failed']}**", ""]
    failed = [t for t in report["trials"] if t["status"] != "ok"]
    if failed:
        lines += ["## Failed trials", "", *[f"- {t.get('explanation') or t.get('error', 'unknown error')}" for t in failed], ""]
    pruning = pruning_rows(report)
    if pruning:
        lines += ["## Real speedup of pruning (fp32, torch eager, sweep timing)", "",
                  rows_table(pruning, [Column("params", "params", "{:,}"), Column("param_ratio", "param ratio", "x"),
                                       Column("ms_b", f"ms @ {b}", "{:.3f}"), Column("speedup", "latency speedup", "x")]), ""]
    lines += ["![pareto](pareto.png)", ""]
    if report.get("distill_sweep"):
        lines += distill_sweep_md(report["distill_sweep"])
    return lines


def write_report_files(report: dict[str, Any], run_dir: Path) -> None:
    """``report.md`` and ``pareto.png`` (validation quality against sweep latency, the front joined, the winner ringed)."""
    write_text_atomic(run_dir / "report.md", "\n".join(report_md(report)))
    b = _b(report)
    ok = [{**r, "latency": r["ms_b"]} for r in trial_rows(report) if r["status"] == "ok"]
    front = {t["key"] for t in report.get("pareto_front", [])}
    name = (report.get("metric") or {}).get("name", "accuracy")
    write_front_png(ok, [r for r in ok if r["key"] in front], run_dir / "pareto.png", quality_key="val_accuracy",
                    quality_label="validation accuracy (%)" if name == "accuracy" else f"validation {name}",
                    speed_key="latency", speed_label=f"latency at batch {b} (ms, sweep timing; lower is faster)",
                    winner=report["winner"].get("key"), floor=report["accuracy_floor"])


# ------------------------------------------------------------------------------------------- the distillation sweep


def _setting(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else ("-" if v is None else str(v))


def distill_sweep_table(summary: dict[str, Any]) -> str:
    """One row per distillation trial: its settings, student, epochs run, why it stopped, accuracy, size, speed."""
    b, keys = summary["serving_batch_size"], summary["varying"]
    measured = {c["key"]: c for c in summary["candidates"]}
    rows = []
    for t in summary["trials"]:
        c, st = measured.get(t["trial_id"], {}), t["student"]
        widths = st.get("conv_channels", []) + st.get("fc_hidden", []) if st.get("kind") == "cnn" else st.get("hidden", [])
        rows.append({"key": t["trial_id"] + (" **best**" if t["trial_id"] == summary["best"]["key"] else ""),
                     **{f"setting.{k}": _setting(t["settings"].get(k)) for k in keys}, "student": str(widths),
                     "epochs": f"{t['epochs_run']}/{t['epochs']}", "stop_reason": t["stop_reason"],
                     "val_accuracy": t.get("val_accuracy"), "params": c.get("params"),
                     "ms_b": (c.get("latency_ms") or {}).get(f"batch_{b}"), "trial_seconds": t.get("trial_seconds")})
    cols = [*(Column(f"setting.{k}", k) for k in keys), Column("student", "student"), Column("epochs", "epochs run"),
            Column("stop_reason", "why it ended"), Column("val_accuracy", "val acc %", "{:.2f}"), Column("params", "params", "{:,}"),
            Column("ms_b", f"ms @ {b}", "{:.3f}"), Column("trial_seconds", "trial s", "{:.0f}")]
    return rows_table(rows, cols)


def best_vs_default_table(summary: dict[str, Any]) -> str:
    """The sweep's best student beside the recipe-settings one (held-out accuracy, size, side-by-side latency)."""
    b = summary["serving_batch_size"]
    best, default = summary["best"], summary.get("default")
    named = []
    if default is not None and best["key"] == default["key"]:
        named.append(("best = default (recipe settings: no trial beat it)", default))
    else:
        named.append((f"best (trial {best['key']})", best))
        if default is not None:
            named.append(("default (recipe settings)", default))
    rows = [{"key": name, "settings": ", ".join(f"{k}={_setting(v)}" for k, v in c.get("settings", {}).items()),
             "val_accuracy": c["val_accuracy"], "test_accuracy": c["test_accuracy"], "params": c["params"],
             "ms_b1": c["latency_ms"]["batch_1"], "ms_b": c["latency_ms"][f"batch_{b}"]} for name, c in named]
    return rows_table(rows, [Column("settings", "settings"), Column("val_accuracy", "val acc %", "{:.2f}"),
                             Column("test_accuracy", "test acc %", "{:.2f}"), Column("params", "params", "{:,}"), *_lat_columns(b)])


def distill_sweep_md(summary: dict[str, Any]) -> list[str]:
    s = summary["search"]
    return [
        "## Distillation sweep", "",
        f"{s['algorithm']}{', ASHA over epochs' if s['scheduler'] == 'asha' else ''}: {len(summary['trials'])} trials x "
        f"{s['num_workers']} Ray Train worker(s), {summary['max_concurrent_trials']} at a time; {summary['trial_seconds']:.0f} "
        f"trial-seconds, {summary['wall_s']:.0f} s wall. Best = highest validation accuracy (ties within {s['tie_tolerance']} "
        "points: fewer parameters, then faster; latencies timed side by side after the sweep).", "",
        best_vs_default_table(summary), "", distill_sweep_table(summary), "", "![distillation sweep](distill_sweep.png)", "",
    ]


def write_distill_sweep(summary: dict[str, Any], run_dir: Path) -> None:
    """``distill_sweep.json``, ``.md`` and ``.png`` (validation accuracy per epoch of every trial; ASHA's stops are short)."""
    write_json_atomic(run_dir / "distill_sweep.json", summary)
    write_text_atomic(run_dir / "distill_sweep.md", "\n".join(distill_sweep_md(summary)))
    best = summary["best"]["key"]
    curves = {}
    for t in summary["trials"]:
        h = [p for p in t.get("history", []) if p.get("val_accuracy") is not None]
        if h:
            curves[t["trial_id"] + (" (best)" if t["trial_id"] == best else "")] = (
                [p["epoch"] for p in h], [p["val_accuracy"] for p in h], t["trial_id"] == best, t["status"] != "completed")
    name = (summary.get("metric") or {}).get("name", "accuracy")
    write_curves_png(curves, run_dir / "distill_sweep.png", xlabel="epoch",
                     ylabel="validation accuracy (%)" if name == "accuracy" else f"validation {name}",
                     title=f"distillation sweep ({len(summary['trials'])} trials; dashed: stopped early)",
                     reference=(summary["default"]["val_accuracy"], "default student") if summary.get("default") else None)
