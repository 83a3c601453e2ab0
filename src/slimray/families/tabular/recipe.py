"""The tabular family's hooks for the shared pipeline (``slimray.families.recipe.Recipe``): read the CSV, train the
teacher MLP first (labels only, on Ray Train), plan the students by width, distil with MSE KD, and build and measure
each candidate (structured pruning of hidden neurons x quantization) into a row: R² on the validation split, R² on
the test split, parameters, bytes of the stored weights, rows per second at the timing batch."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from slimray.compress.measure import latency_ms
from slimray.compress.prune import PruneSpec, prune
from slimray.compress.quantize import QuantSpec, quantize
from slimray.families.recipe import Column, Quality, Recipe, StudentPlan
from slimray.families.tabular.model import FORMAT, Scaling, TabularSpec, load_artifact, save_artifact
from slimray.families.tabular.train import r2_score
from slimray.schema import ConfigError
from slimray.storage import encode_state


def read_header(path: str, target: str) -> list[str]:
    """The CSV's column names; the target must be one of them."""
    with open(path) as f:
        header = [h.strip() for h in f.readline().strip().split(",")]
    if target not in header:
        raise ConfigError(f"data.target: no column {target!r} in {path} (columns: {', '.join(header)})")
    return header


def read_csv(path: str, target: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(feature names, features float32 (N, F), target float32 (N,)); a missing column or a non-number names itself."""
    header = read_header(path, target)
    try:
        table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64, ndmin=2)
    except ValueError as err:
        raise ConfigError(f"data.path: {path} must hold numbers only below its header ({err})") from None
    if table.shape[1] != len(header):
        raise ConfigError(f"data.path: {path} has {len(header)} header names but {table.shape[1]} columns")
    if not np.isfinite(table).all():
        raise ConfigError(f"data.path: {path} holds NaN or infinite values")
    j = header.index(target)
    features = [h for i, h in enumerate(header) if i != j]
    return features, np.delete(table, j, axis=1).astype(np.float32), table[:, j].astype(np.float32)


def param_count(model: nn.Module) -> int:
    """Weights and biases of every linear layer, float or quantized (a quantized layer has no ``parameters()``)."""
    return sum(m.in_features * m.out_features + m.out_features for m in model.modules()
               if hasattr(m, "out_features") and hasattr(m, "in_features"))


def stored_bytes(model: nn.Module) -> int:
    """Bytes of the weights file this model becomes (safetensors, as stored: int8 stays int8)."""
    tensors, _ = encode_state(model.state_dict())
    return len(safetensors_bytes(tensors))


def hidden_widths(model: nn.Module) -> list[int]:
    """Hidden widths of the MLP, float or quantized (every linear layer has ``out_features``)."""
    outs = [m.out_features for m in model.modules() if hasattr(m, "out_features") and hasattr(m, "in_features")]
    return outs[:-1]


class TabularRecipe(Recipe):
    quality = Quality(key="r2", label="R² (validation)", higher_is_better=True, budget="drop")
    speed_key = "rows_per_s"
    speed_label = "rows/s (1 thread)"
    columns = (
        Column("r2", "val R²", "{:.4f}"), Column("test_r2", "test R²", "{:.4f}"), Column("params", "params", "{:d}"),
        Column("size_bytes", "size MB", "mb"), Column("rows_per_s", "rows/s", "{:.0f}"), Column("speedup", "speedup", "x"),
    )

    # data and teacher
    def check(self, cfg: Any) -> None:
        read_header(cfg.data.path, cfg.data.target)

    def prepare(self, cfg: Any, run_dir: Path) -> dict[str, Any]:
        d = cfg.data
        features, x, y = read_csv(d.path, d.target)
        n = len(x)
        num_val, num_test = int(n * d.val_fraction), int(n * d.test_fraction)
        if n - num_val - num_test < 16 or num_val < 8 or num_test < 8:
            raise ConfigError(f"data.path: {d.path} has {n} rows; the splits need at least 16 to train, 8 to validate, 8 to test")
        order = np.random.default_rng(d.seed).permutation(n)
        test, val, train = order[:num_test], order[num_test:num_test + num_val], order[num_test + num_val:]
        x_mean, x_std = x[train].mean(0), x[train].std(0) + 1e-6
        y_mean, y_std = float(y[train].mean()), float(y[train].std() + 1e-6)
        sx = lambda idx: ((x[idx] - x_mean) / x_std).astype(np.float32)  # noqa: E731
        sy = lambda idx: ((y[idx] - y_mean) / y_std).astype(np.float32)  # noqa: E731
        return {
            "features": features, "target": d.target,
            "scaling": {"x_mean": x_mean.tolist(), "x_std": x_std.tolist(), "y_mean": y_mean, "y_std": y_std},
            "x_train": sx(train), "y_train": sy(train), "x_val": sx(val), "y_val": sy(val),
            "x_test": sx(test), "y_test": sy(test), "raw_test": x[test][:8],
        }

    def teacher_job(self, cfg: Any) -> tuple[StudentPlan, dict[str, Any]]:
        t = cfg.teacher
        plan = StudentPlan("teacher", {"in_dim": None, "hidden": list(t.hidden)})
        return plan, {"epochs": t.epochs, "lr": t.lr, "task": {"alpha": 0.0}}

    def evaluate(self, cfg: Any, model: nn.Module, data: dict[str, Any]) -> dict[str, Any]:
        with torch.inference_mode():
            val = model(torch.from_numpy(data["x_val"])).float()
            test = model(torch.from_numpy(data["x_test"])).float()
        return {"r2": r2_score(val, torch.from_numpy(data["y_val"])), "test_r2": r2_score(test, torch.from_numpy(data["y_test"])),
                "params": param_count(model), "size_bytes": stored_bytes(model), "hidden": hidden_widths(model)}

    # students
    def plan_students(self, cfg: Any, teacher: nn.Module, *, data: Any = None) -> list[StudentPlan]:
        return [StudentPlan("student-" + "x".join(map(str, h)), {"hidden": list(h)}) for h in cfg.distill.students]

    def train_job(self, cfg: Any, plan: StudentPlan, *, distilled: bool) -> dict[str, Any]:
        d = cfg.distill
        return {"epochs": d.epochs, "lr": d.lr, "task": {"alpha": d.alpha if distilled else 0.0}}

    def job_spec(self, plan: StudentPlan, data: dict[str, Any]) -> dict[str, Any]:
        return {**plan.spec, "in_dim": int(data["x_train"].shape[1])}

    def train_data(self, cfg: Any, data: dict[str, Any], teacher: nn.Module | None) -> dict[str, Any]:
        out = {k: data[k] for k in ("x_train", "y_train", "x_val", "y_val")}
        if teacher is not None:
            with torch.inference_mode():
                out["t_train"] = teacher(torch.from_numpy(data["x_train"])).float().numpy()
        return out

    # compression search
    def candidates(self, cfg: Any) -> dict[str, dict[str, Any]]:
        s = cfg.search
        return {f"prune{r:.2f}-{q}": {"prune_ratio": r, "quantization": q} for r in s.prune_ratios for q in s.quant_methods}

    def build(self, candidate: dict[str, Any], student: nn.Module, data: dict[str, Any]) -> nn.Module:
        model = copy.deepcopy(student).eval()
        example = torch.from_numpy(data["x_train"][:2])
        prune(model, PruneSpec(ratio=candidate["prune_ratio"]), example_inputs=example)
        return quantize(model, QuantSpec(method=candidate["quantization"]), calibration=[example]).eval()

    def measure(self, cfg: Any, candidate: dict[str, Any], student: nn.Module, data: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
        t0 = time.perf_counter()
        model = self.build(candidate, student, data)
        row = {**candidate, **self.evaluate(cfg, model, data)}
        row["rows_per_s"] = self.time({"m": model}, data, cfg=cfg)["m"]
        row["trial_seconds"] = time.perf_counter() - t0
        return model, row

    def advice(self, error: str, candidate: dict[str, Any]) -> str:
        return f"leave {candidate['quantization']} out of search.quant_methods (or {candidate['prune_ratio']} out of search.prune_ratios)"

    def time(self, models: dict[str, nn.Module], data: dict[str, Any], *, cfg: Any,
             settings: dict[str, dict[str, Any]] | None = None) -> dict[str, float]:
        b = cfg.search.timing_batch_size
        x = torch.from_numpy(data["x_val"])
        with torch.inference_mode():
            return {name: b / (latency_ms(m, x, batch_size=b, num_repeats=20) / 1e3) for name, m in models.items()}

    # artifacts
    def save(self, path: Path, model: nn.Module, *, candidate: dict[str, Any], cfg: Any, data: dict[str, Any]) -> None:
        spec = TabularSpec(format=FORMAT, in_dim=int(data["x_train"].shape[1]), hidden=hidden_widths(model),
                           features=data["features"], target=data["target"], scaling=Scaling(**data["scaling"]),
                           quantization=candidate.get("quantization", "none"))
        save_artifact(path, model, spec)

    def load(self, path: Path) -> nn.Module:
        return load_artifact(path)[0]

    def sample_request(self, data: dict[str, Any]) -> dict[str, Any]:
        return {"inputs": data["raw_test"].tolist()}
