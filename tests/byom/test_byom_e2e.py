"""Bring your own model and data, end to end, as a new user would: models slimray does not ship (a residual
CNN with BatchNorm, an MLP with LayerNorm), trained briefly and saved as safetensors, data written as an
image folder of PNGs and as Parquet, then `slimray run --config` in a subprocess: a student derived from the
teacher by pruning, distillation on 2 Ray Train workers reading Ray Data shards, a sweep, a report, and the
winner served over HTTP answering like the model in-process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
import yaml

import project

from slimray.families.classifier.artifacts import load_runnable, load_spec
from slimray.families.classifier.datasets import normalize
from slimray.families.classifier.sample import read_test_sample

pytestmark = pytest.mark.slow


def _cli(args: list[str], *, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "slimray.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_run(run_dir: Path, *, factory: str) -> dict:
    report = json.loads((run_dir / "report.json").read_text())
    student = load_spec(run_dir / "students" / "student")
    assert student.model.kind == "module" and student.model.factory == factory
    assert student.model.resized_modules and student.model.note.startswith("teacher ")
    assert {r["key"]: r for r in report["students"]}["student"]["params"] < report["teacher"]["params"]
    # distillation: 2 Ray Train workers, each epoch read the whole training split from Ray Data shards
    lines = [json.loads(line) for line in (run_dir / "logs" / "student_metrics.jsonl").read_text().splitlines()]
    assert lines and all(len(m["worker_nodes"]) == 2 for m in lines)
    n_train = lines[0]["samples_seen"]
    assert all(m["samples_seen"] == n_train for m in lines) and n_train > 1000
    assert list((run_dir / "teacher_outputs").glob("*.parquet")), "the teacher's outputs were written by Ray Data"
    assert report["trials"] and all(t["status"] == "ok" for t in report["trials"])
    assert report["winner"]["accuracy"] >= report["teacher"]["accuracy"] - 6.0
    assert (run_dir / "report.md").exists() and (run_dir / "pareto.png").exists()
    return report


def _served_like_in_process(run_dir: Path, *, cwd: Path) -> None:
    """`slimray serve` in a subprocess answers like the winner in-process; a bad request gets a 422."""
    tmp_path = cwd
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    server = subprocess.Popen([sys.executable, "-m", "slimray.cli", "serve", str(run_dir), "--port", str(port)], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        x, y = read_test_sample(run_dir)
        x = x[:32]
        deadline = time.monotonic() + 180
        while True:
            try:
                r = httpx.post(f"http://127.0.0.1:{port}/v1/predict", json={"inputs": x.tolist()}, timeout=30)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, server.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the served user model never answered"
            time.sleep(1)
        model, spec = load_runnable(run_dir / "winner")
        with torch.inference_mode():
            local = model(normalize(torch.from_numpy(x), spec.input))
        assert r.json()["predictions"] == local.argmax(1).tolist()
        torch.testing.assert_close(torch.tensor(r.json()["probabilities"]), local.softmax(1), atol=1e-4, rtol=1e-3)
        bad = httpx.post(f"http://127.0.0.1:{port}/v1/predict", json={"inputs": [[0.0] * 5]}, timeout=30)
        assert bad.status_code == 422 and "error" in bad.json()
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


@pytest.mark.long  # multi-minute end to end: `make test-long` (CI runs it after `make test`)
def test_residual_cnn_on_an_image_folder_is_derived_distilled_searched_and_served(tmp_path):
    cfg = project.resnet_project(tmp_path)
    out = _cli(["run", "--config", str(cfg), "--no-serve", "--out", str(tmp_path / "runs")], cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run_dir = tmp_path / "runs" / "user-resnet"
    report = _check_run(run_dir, factory="user_models:resnet")
    assert report["dataset"] == "files"
    # depth: one of the two repeated residual blocks of stage1 dropped (the one that mattered least), then width
    student = load_spec(run_dir / "students" / "student")
    assert len(student.model.removed_modules) == 1 and student.model.removed_modules[0] in ("stage1.0", "stage1.1")
    derived = student.metadata["derived"]
    assert derived["dropped_blocks"] == student.model.removed_modules and len(derived["kept_blocks"]) == 1
    # the winner was chosen on the user's metric (macro F1), within its budget of the teacher's value
    m = report["metric"]
    assert m["name"] == "user_metrics:macro_f1" and m["budget"] == 0.03 and 0.5 < m["teacher_reference"] <= 1.0
    assert all("metric_value" in t for t in report["trials"])
    assert 0.0 <= report["winner_test"]["metric"]["val"] <= 1.0
    if report["constraint_met"]:
        assert report["winner_test"]["metric"]["val"] >= m["teacher_reference"] - m["budget"] - 1e-9

    _served_like_in_process(run_dir, cwd=tmp_path)


@pytest.mark.long
def test_mlp_on_parquet_runs_end_to_end_and_serves_after_its_code_folder_moves(tmp_path):
    """`slimray run` on the user's MLP (Parquet data) whose code lives in a folder of its own: every stage's artifact
    carries the code (no absolute path); the folder is then moved away and `slimray serve` still serves the winner
    like in-process; after the folder is deleted the winner still loads."""
    import shutil

    code = project.user_code_folder(tmp_path / "code", module="user_models")
    cfg = project.mlp_project(tmp_path / "proj", code_dir=code)
    out = _cli(["run", "--config", str(cfg), "--no-serve", "--out", str(tmp_path / "runs")], cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run_dir = tmp_path / "runs" / "user-mlp"
    _check_run(run_dir, factory="user_models:mlp")
    for stage in ("teacher", "students/student", "winner"):
        spec = load_spec(run_dir / stage)
        assert list(spec.model.code) == ["user_models.py"] and spec.model.code_dir is None, stage
        assert str(tmp_path) not in (run_dir / stage / "spec.json").read_text(), stage
    x, y = read_test_sample(run_dir)
    model, spec = load_runnable(run_dir / "winner")
    with torch.inference_mode():
        acc = (model(normalize(torch.from_numpy(x), spec.input)).argmax(1).numpy() == y).mean()
    assert acc > 0.85
    code.rename(tmp_path / "code-moved")
    _served_like_in_process(run_dir, cwd=tmp_path)
    shutil.rmtree(tmp_path / "code-moved")
    model, _ = load_runnable(run_dir / "winner")
    assert type(model).__module__.startswith("_slimray_code_")


@pytest.mark.long
def test_hugging_face_image_classifier_folder_runs_end_to_end_and_is_served(tmp_path):
    """teacher.source: huggingface: the user's HF ResNet folder (save_pretrained), a student derived from it by
    pruning, distilled on 2 Ray Train workers, searched, reported and served like in-process."""
    cfg = project.hf_resnet_project(tmp_path)
    out = _cli(["run", "--config", str(cfg), "--no-serve", "--out", str(tmp_path / "runs")], cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run_dir = tmp_path / "runs" / "user-hf-resnet"
    _check_run(run_dir, factory="slimray.families.classifier.hf:from_config")
    assert load_spec(run_dir / "winner").model.kwargs["config"]["model_type"] == "resnet"
    _served_like_in_process(run_dir, cwd=tmp_path)


@pytest.mark.long
def test_user_vit_with_the_starter_config_runs_every_trial_and_is_served(tmp_path):
    """The user's small ViT (``nn.TransformerEncoder``, learned positions, mean pooling) on digits as ``.npz``, trained on
    every example of its training file, with the config `slimray init` writes (``--test``: the held-out file, the
    accuracy budget's reference): the derived student keeps whole attention heads, every trial of the starter search
    (prune 0/0.25/0.5 x none/dynamic_int8 x torch/onnxruntime) runs, the winner is within the 1-point budget of the
    teacher's held-out accuracy, and it is served like in-process."""
    weights, data, held_out, code_dir = project.vit_project(tmp_path)
    init = _cli(["init", "--model", "user_models:vit", "--weights", str(weights), "--data", str(data), "--test", str(held_out),
                 "--code-dir", str(code_dir)], cwd=tmp_path)
    assert init.returncode == 0, init.stderr[-3000:]
    starter = yaml.safe_load((tmp_path / "slimray.yaml").read_text())
    assert starter["search"]["teacher_reference_split"] == "test" and starter["search"]["max_accuracy_drop"] == 1.0
    # 1,437 examples: smaller batches and more fine-tune epochs than the defaults (MNIST-size data keeps 128 and 1)
    assert starter["distill"]["batch_size"] == 32 and starter["search"]["finetune_epochs"] == 6
    out = _cli(["run", "--config", "slimray.yaml", "--no-serve", "--out", str(tmp_path / "runs")], cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run_dir = tmp_path / "runs" / "digits"
    report = _check_run(run_dir, factory="user_models:vit")
    assert report["teacher"]["accuracy"] > 90.0, report["teacher"]  # a trained teacher, or the budget means nothing
    resized = load_spec(run_dir / "students" / "student").model.resized_modules
    attn = {k: v for k, v in resized.items() if k.endswith("self_attn")}
    assert attn and all(v["embed_dim"] % 4 == 0 and v["head_dim"] * 4 == v["embed_dim"] for v in attn.values())
    trials = report["trials"]
    assert len(trials) == 9 and {t["runtime"] for t in trials} == {"torch", "onnxruntime"}
    assert {(t["prune_ratio"], t["quantization"]) for t in trials} >= {(0.5, "dynamic_int8"), (0.25, "dynamic_int8"), (0.0, "dynamic_int8")}
    assert all(t["runtime_check"]["class_agreement"] >= 95.0 for t in trials if t["runtime"] == "onnxruntime" and t["quantization"] == "none")
    assert report["constraint_met"], "no trial within the starter config's accuracy budget"
    _served_like_in_process(run_dir, cwd=tmp_path)
