"""The classifier's own report sections (``ClassifierRecipe.report_extras``; the shared renderer, ``slimray.report``,
writes the rest): where the winner's speed comes from, the real speedup of pruning, the distillation sweep's trials
(rows, each table a list of ``Column``s; its per-epoch curves plotted). Pure: no Ray.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimray.families.recipe import Column
from slimray.report import rows_table, write_curves_png
from slimray.storage import write_json_atomic, write_text_atomic


def _lat_columns(b: int) -> list[Column]:
    return [Column("ms_b1", "ms @ batch 1", "{:.3f}"), Column("ms_b", f"ms @ batch {b}", "{:.3f}")]


def gain_breakdown_md(steps: list[dict[str, Any]], *, batch_size: int) -> list[str]:
    """Where the winner's speed comes from: teacher, starting student, its prune ratio in fp32, the winner (side by side)."""
    rows = [{"key": s["step"], "ms_b": s["latency_ms"], "speedup": s["speedup_vs_teacher"]} for s in steps]
    return [f"Where the gain comes from (batch {batch_size}, side-by-side timing):", "",
            rows_table(rows, [Column("ms_b", "ms", "{:.3f}"), Column("speedup", "cumulative speedup", "x")]), ""]


def pruning_md(trials: list[dict[str, Any]], *, batch_size: int) -> list[str]:
    """The fp32 torch trials per prune ratio and starting model: parameter ratio beside the measured latency ratio."""
    lines: list[str] = []
    for base in dict.fromkeys(t.get("student") for t in trials):
        fp32 = sorted((t for t in trials if t.get("student") == base and t.get("status") == "ok" and t.get("quantization") == "none"
                       and t.get("runtime", "torch") == "torch"), key=lambda t: t["prune_ratio"])
        ref = next((t for t in fp32 if t["prune_ratio"] == 0), None)
        if ref is None or len(fp32) < 2:
            continue
        rows = [{"key": f"prune {t['prune_ratio']}", "params": t["params"], "param_ratio": ref["params"] / t["params"],
                 "ms_b": t["latency_ms_serving"], "speedup": ref["latency_ms_serving"] / t["latency_ms_serving"]} for t in fp32]
        lines += [f"Real speedup of pruning {base} (fp32, torch eager, trial timing):", "",
                  rows_table(rows, [Column("params", "params", "{:,}"), Column("param_ratio", "param ratio", "x"),
                                    Column("ms_b", f"ms @ {batch_size}", "{:.3f}"), Column("speedup", "latency speedup", "x")]), ""]
    return lines


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
