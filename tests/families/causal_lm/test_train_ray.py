"""The causal-LM task on Ray Train (2 workers, gloo, CPU) with the teacher in the loop: each worker loads the tiny
teacher from its folder, the depth-pruned student learns from the full-vocabulary KL plus the hidden-state loss,
and the checkpoint holds the student alone."""

from __future__ import annotations

import copy
import json

import pytest
from safetensors.torch import load_file

from slimray.families.causal_lm.prune import drop_layers
from slimray.families.causal_lm.teacher import load_causal_lm

pytestmark = [pytest.mark.slow, pytest.mark.long]  # one 2-worker Ray Train run: ~40 s on 2 shared cores (`make test-long`)


def test_teacher_in_loop_on_ray_train_learns_and_checkpoints_the_student_alone(ray_session, tmp_path, tiny_folder, tiny_windows):
    from slimray.training.distill import MODEL_FILE, TrainJob, run_training

    teacher, _ = load_causal_lm(tiny_folder, with_tokenizer=False)
    keep = [0, 3]
    student = drop_layers(copy.deepcopy(teacher), keep=keep)
    job = TrainJob(
        label="distil tiny", family="causal_lm", run_name="tiny-in-loop", storage_path=str(tmp_path / "ray"), spec={},
        epochs=3, batch_size=2, lr=3e-3, num_workers=2, max_failures=0, metrics_path=str(tmp_path / "metrics.jsonl"),
        task={"hf_config": student.config.to_dict(), "temperature": 1.0, "ce_weight": 0.0, "warmup_steps": 1,
              "bf16_autocast": False, "targets": "teacher_in_loop", "teacher_path": str(tiny_folder),
              "hidden_weight": 0.5, "layer_map": keep},
    )
    data = {"windows": tiny_windows[2:].numpy(), "val_windows": tiny_windows[:2].numpy()}  # windows only: no top-k arrays
    trained, metrics = run_training(job, data, init_state={k: v.clone() for k, v in student.state_dict().items()})
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3]
    assert lines[-1]["loss"] < lines[0]["loss"] and lines[-1]["loss_kl"] < lines[0]["loss_kl"]
    assert all(m["loss_hidden"] > 0 for m in lines)  # (a random teacher: perplexity stays near the vocabulary size)
    ckpts = sorted(p for p in (tmp_path / "ray" / "tiny-in-loop").glob("checkpoint_*") if p.is_dir())
    saved = load_file(str(ckpts[-1] / MODEL_FILE))
    expected = {k for k in student.state_dict() if k != "lm_head.weight"}  # tied: stored once
    assert set(saved) == expected  # no teacher tensors (its 4 layers never enter the checkpoint)
    assert len(trained.model.layers) == 2 and metrics["epoch"] == 3
