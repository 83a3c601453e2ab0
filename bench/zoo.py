"""Which (prune ratio x quantization x runtime) trials run on each zoo architecture, and how fast the best one is.

    .venv/bin/python bench/zoo.py [--archs ID ...] [--repeats 15] [--out bench/zoo_results.jsonl]

Each architecture of ``tests/zoo/zoo_models.py`` (random init: the figures are speed, not accuracy) is pruned
at each ratio with slimray's rules, quantized and saved per setting exactly as a sweep trial saves it
(``slimray.families.classifier.search.save_trial``), loaded as a replica loads it, checked against the fp32 torch model it came
from (class agreement) and timed at batch 1 and 64 on one thread, one model at a time. A failed trial is
recorded with its one-line explanation. The machine is shared and noisy, so the per-trial timing only picks
candidates: the teacher and the four fastest trials are then re-timed side by side in interleaved rounds
(``compare_latency``), and the best one's speedups come from that pass. Prints a markdown table per architecture
and writes JSON lines.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "zoo")]

from slimray.families.classifier.artifacts import ArtifactSpec, load_runnable  # noqa: E402
from slimray.compress.export import check_outputs  # noqa: E402
from slimray.compress.measure import compare_latency, latency_ms  # noqa: E402
from slimray.compress.prune import PruneSpec, prune  # noqa: E402
from slimray.compress.quantize import QuantSpec, quantize  # noqa: E402
from slimray.config import SearchConfig  # noqa: E402
from slimray.families.classifier.spec import InputSpec, ModuleSpec, build_model, count_params, spec_from_model  # noqa: E402
from slimray.families.classifier.explain import explain  # noqa: E402
from slimray.families.classifier.search import save_trial  # noqa: E402
from zoo_models import ZOO  # noqa: E402

RATIOS = (0.0, 0.25, 0.5)
SETTINGS = (("none", "torch"), ("dynamic_int8", "torch"), ("static_int8", "torch"), ("none", "onnxruntime"), ("static_int8", "onnxruntime"))
BATCHES = (1, 64)


def run_arch(arch: str, *, repeats: int, tmp: Path) -> list[dict]:
    factory, kwargs, code_dir, shape = ZOO[arch]
    mspec = ModuleSpec(factory=factory, kwargs=kwargs, code_dir=str(code_dir))
    torch.manual_seed(0)
    teacher = build_model(mspec).eval()
    x = torch.rand(64, *shape)
    calib = [torch.rand(32, *shape) for _ in range(2)]
    base = ArtifactSpec(name=arch, model=mspec, input=InputSpec(shape=shape, min_value=0.0, max_value=1.0))
    rows, runnables = [], {}
    for ratio in RATIOS:
        stage = "prune"
        try:
            model = teacher if ratio == 0 else prune(copy.deepcopy(teacher).train(), PruneSpec(ratio=ratio), example_inputs=x[:1]).eval()
            spec = base.model_copy(update={"model": spec_from_model(model, mspec), "prune": PruneSpec(ratio=ratio)})
        except Exception as err:
            why = explain(err, stage=stage, ratio=ratio, method="none", runtime="torch")
            rows += [{"arch": arch, "prune_ratio": ratio, "quantization": q, "runtime": r, "status": "error", "explanation": why["line"]}
                     for q, r in SETTINGS]
            continue
        for method, runtime in SETTINGS:
            row = {"arch": arch, "prune_ratio": ratio, "quantization": method, "runtime": runtime, "params": count_params(model)}
            out = tmp / f"{arch}-{ratio}-{method}-{runtime}"
            t0 = time.perf_counter()
            try:
                stage = "quantize"
                qmodel = quantize(model, QuantSpec(method=method), calibration=calib) if runtime != "onnxruntime" else model
                stage = "export" if runtime == "onnxruntime" else "quantize"
                save_trial(out, model, qmodel, spec, SearchConfig(), method=method, runtime=runtime, example=x, calib=calib)
                stage = "timing"
                runnable, _ = load_runnable(out)
                runnables[out.name] = runnable
                row["key"] = out.name
                with torch.inference_mode():
                    row["latency_ms"] = {f"batch_{b}": latency_ms(runnable, x, batch_size=b, num_repeats=repeats) for b in BATCHES}
                    row["class_agreement_vs_fp32"] = check_outputs(model, runnable, x)["class_agreement"]
                row["status"] = "ok"
            except Exception as err:
                row.update(status="error", explanation=explain(err, stage=stage, ratio=ratio, method=method, runtime=runtime)["line"])
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
    ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: r["latency_ms"]["batch_64"])[:4]
    timed = compare_latency({"teacher": teacher, **{r["key"]: runnables[r["key"]] for r in ok}}, x, batch_sizes=list(BATCHES),
                            num_rounds=5, runs_per_round=max(2, repeats // 3))
    for r in rows:
        r["teacher_latency_ms"] = {f"batch_{b}": v for b, v in timed["teacher"].items()}
        r["teacher_params"] = count_params(teacher)
        if r.get("key") in timed:
            r["latency_ms_side_by_side"] = {f"batch_{b}": v for b, v in timed[r["key"]].items()}
    return rows


def table(arch: str, rows: list[dict]) -> str:
    ok = [r for r in rows if r["status"] == "ok"]
    t = rows[0]["teacher_latency_ms"]
    lines = [f"### {arch} ({rows[0]['teacher_params']:,} params; teacher fp32 torch: {t['batch_1']:.2f} ms @1, {t['batch_64']:.1f} ms @64)", "",
             "| prune | " + " | ".join(f"{q}@{r}" for q, r in SETTINGS) + " |", "|---|" + "---|" * len(SETTINGS)]
    for ratio in RATIOS:
        cells = []
        for q, rt in SETTINGS:
            r = next(r for r in rows if r["prune_ratio"] == ratio and r["quantization"] == q and r["runtime"] == rt)
            cells.append("runs" if r["status"] == "ok" else "fails")
        lines.append(f"| {ratio} | " + " | ".join(cells) + " |")
    retimed = [r for r in ok if "latency_ms_side_by_side" in r]
    if retimed:
        best = min(retimed, key=lambda r: r["latency_ms_side_by_side"]["batch_64"])
        lat = best["latency_ms_side_by_side"]
        lines += ["", f"Best at batch 64 (side by side with the teacher): prune {best['prune_ratio']} {best['quantization']}@{best['runtime']}: "
                  f"{lat['batch_1']:.2f} ms / {lat['batch_64']:.1f} ms, {t['batch_1'] / lat['batch_1']:.2f}x at batch 1 and "
                  f"{t['batch_64'] / lat['batch_64']:.2f}x at batch 64 ({best['params']:,} params; class agreement with its fp32 model "
                  f"{best['class_agreement_vs_fp32']:.0f}%)."]
    failed = [r for r in rows if r["status"] != "ok"]
    lines += [f"- {r['explanation']}" for r in failed]
    return "\n".join(lines) + "\n"


def summary(rows: list[dict]) -> str:
    """One line per architecture: trials that ran out of those tried, what failed, the best one side by side."""
    lines = ["| architecture | params | trials run | failing | best at batch 64 (side by side) | speedup @1 | speedup @64 |",
             "|---|---|---|---|---|---|---|"]
    for arch in dict.fromkeys(r["arch"] for r in rows):
        mine = [r for r in rows if r["arch"] == arch]
        ok = [r for r in mine if r["status"] == "ok"]
        failing = sorted({f"{r['quantization']}@{r['runtime']} (prune {', '.join(str(x['prune_ratio']) for x in mine if x['status'] != 'ok' and x['quantization'] == r['quantization'] and x['runtime'] == r['runtime'])})"
                          for r in mine if r["status"] != "ok"})
        t = mine[0]["teacher_latency_ms"]
        retimed = [r for r in ok if "latency_ms_side_by_side" in r]
        best = min(retimed, key=lambda r: r["latency_ms_side_by_side"]["batch_64"]) if retimed else None
        cells = ("-", "-", "-") if best is None else (
            f"prune {best['prune_ratio']} {best['quantization']}@{best['runtime']}",
            f"{t['batch_1'] / best['latency_ms_side_by_side']['batch_1']:.2f}x",
            f"{t['batch_64'] / best['latency_ms_side_by_side']['batch_64']:.2f}x")
        lines.append(f"| {arch} | {mine[0]['teacher_params']:,} | {len(ok)}/{len(mine)} | {'; '.join(failing) or 'none'} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", nargs="*", default=list(ZOO))
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "zoo_results.jsonl")
    p.add_argument("--summary", action="store_true", help="print the one-line-per-architecture table of --out and exit")
    args = p.parse_args()
    if args.summary:
        print(summary([json.loads(line) for line in args.out.read_text().splitlines()]))
        return 0
    warnings.filterwarnings("ignore")
    logging.getLogger().setLevel(logging.ERROR)  # ONNX Runtime's quantizer warns per LayerNorm weight
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="slimray-zoo-") as tmp, open(args.out, "a") as f:
        for arch in args.archs:
            rows = run_arch(arch, repeats=args.repeats, tmp=Path(tmp))
            for r in rows:
                f.write(json.dumps(r) + "\n")
            f.flush()
            print(table(arch, rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
