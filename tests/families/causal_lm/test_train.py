"""The causal-LM TrainTask fits the shared Train loop's contract: built from the student's config.json dict,
trained on cached top-k teacher logits through the shared epoch loop (loss and held-out perplexity fall),
checkpoint parts without the tied output embedding (safetensors refuses shared tensors) rebuild the same model;
with the teacher in the loop, its loss on a batch is kd.kl_loss (+ hidden_weight x kd.hidden_loss) computed
directly, and what the losses cannot compare is refused. The Ray Train runs are in test_train_ray.py."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load, save as st_save

from slimray.families.base import run_epoch
from slimray.families.causal_lm.kd import cache_teacher_topk, hidden_loss, kl_loss, layer_outputs
from slimray.families.causal_lm.prune import drop_layers
from slimray.families.causal_lm.teacher import load_causal_lm
from slimray.families.causal_lm.train import CausalLMTask, check_teacher_targets
from slimray.schema import ConfigError


def test_topk_kd_of_a_depth_pruned_student_through_the_shared_epoch_loop(tiny_tokenizer, tiny_model, tiny_windows):
    teacher = tiny_model
    student = drop_layers(copy.deepcopy(teacher), keep=[0, 3])
    values, indices = cache_teacher_topk(teacher, tiny_windows, k=8)
    n_val = 2
    data = {"windows": tiny_windows[n_val:].numpy(), "topk_values": values[n_val:].numpy(), "topk_indices": indices[n_val:].numpy(),
            "val_windows": tiny_windows[:n_val].numpy()}
    cfg = {"spec": {}, "lr": 3e-3, "epochs": 4, "batch_size": 2, "seed": 0, "weight_decay": 0.0,
           "task": {"hf_config": student.config.to_dict(), "temperature": 1.0, "ce_weight": 0.0, "warmup_steps": 2, "bf16_autocast": False}}
    task = CausalLMTask(cfg, data)
    net = task.build()
    task.load_parts(net, {"model": {k: v for k, v in student.state_dict().items() if k != "lm_head.weight"}})
    before = task.validate(CausalLMTask.rebuild(cfg, task.split_state(net.state_dict())["model"]))["val_perplexity"]
    opt = task.optimizer(task.parameters(net))
    losses = []
    for epoch in range(cfg["epochs"]):
        stats = run_epoch(net, task.batches(epoch), task.loss, opt, lr_at=lambda s: cfg["lr"] * task.lr_factor(epoch=epoch, step=s))
        losses.append(stats.loss)
        assert stats.num_samples == len(data["windows"]) * tiny_windows.shape[1]  # tokens: every window once an epoch
    assert losses[-1] < losses[0]
    parts = task.split_state({k: v.detach().contiguous() for k, v in net.state_dict().items()})
    assert "lm_head.weight" not in parts["model"]
    rebuilt = CausalLMTask.rebuild(cfg, st_load(st_save(parts["model"])))  # through safetensors bytes, as a checkpoint
    after = task.validate(rebuilt)["val_perplexity"]
    assert np.isfinite(after) and after < before
    with torch.inference_mode():
        assert torch.allclose(rebuilt(tiny_windows[:1]).logits, net.eval()(tiny_windows[:1]).logits, atol=1e-5)


def _in_loop_task(tiny_folder, student, windows, *, hidden_weight: float, layer_map, n_val: int = 2) -> CausalLMTask:
    data = {"windows": windows[n_val:].numpy(), "val_windows": windows[:n_val].numpy()}
    cfg = {"spec": {}, "lr": 3e-3, "epochs": 3, "batch_size": 2, "seed": 0, "weight_decay": 0.0,
           "task": {"hf_config": student.config.to_dict(), "temperature": 2.0, "ce_weight": 0.0, "warmup_steps": 1,
                    "bf16_autocast": False, "targets": "teacher_in_loop", "teacher_path": str(tiny_folder),
                    "hidden_weight": hidden_weight, "layer_map": layer_map}}
    return CausalLMTask(cfg, data)


def test_teacher_in_loop_loss_is_kd_kl_loss_plus_hidden_mse_of_the_same_batch(tiny_folder, tiny_windows):
    """The worker loads the teacher from its folder, frozen; its loss on a batch is ``kd.kl_loss`` against the
    teacher's full logits plus hidden_weight x ``kd.hidden_loss`` at the kept layers, computed here directly."""
    teacher, _ = load_causal_lm(tiny_folder, with_tokenizer=False)
    keep = [0, 2]
    student = drop_layers(copy.deepcopy(teacher), keep=keep)
    task = _in_loop_task(tiny_folder, student, tiny_windows, hidden_weight=0.5, layer_map=keep)
    assert not task.teacher.training and not any(p.requires_grad for p in task.teacher.parameters())
    net = task.build()
    task.load_parts(net, {"model": {k: v for k, v in student.state_dict().items() if k != "lm_head.weight"}})
    assert not any("teacher" in k for k in net.state_dict()) and len(net.model.layers) == 2  # the teacher is not trained
    batch = next(iter(task.batches(0)))
    loss, n, parts = task.loss(net, batch)
    ids = task.windows[batch]
    with layer_outputs(net) as s_hidden:
        s_logits = net(ids).logits
    with torch.no_grad(), layer_outputs(teacher) as t_hidden:
        t_logits = teacher(ids).logits
    kl = kl_loss(s_logits, t_logits, temperature=2.0).detach()
    hid = hidden_loss(s_hidden, t_hidden, layer_map=keep).detach()
    assert n == ids.numel() and parts["kl"] == pytest.approx(float(kl), rel=1e-5)
    assert parts["hidden"] == pytest.approx(float(hid), rel=1e-5) and float(hid) > 0
    assert float(loss) == pytest.approx(float(kl + 0.5 * hid), rel=1e-5) and loss.requires_grad
    assert parts["teacher_s"] >= 0  # the shared loop's profile reports the teacher's share


def test_hidden_states_compared_before_the_final_norm(tiny_folder, tiny_windows):
    """A student that keeps the teacher's first two layers has the same layer outputs as the teacher: hidden loss
    0 (transformers' output_hidden_states would compare its final-norm output with the teacher's layer 1)."""
    teacher, _ = load_causal_lm(tiny_folder, with_tokenizer=False)
    student = drop_layers(copy.deepcopy(teacher), keep=[0, 1])
    task = _in_loop_task(tiny_folder, student, tiny_windows, hidden_weight=1.0, layer_map=[0, 1])
    _, _, parts = task.loss(student, next(iter(task.batches(0))))
    assert parts["hidden"] == pytest.approx(0.0, abs=1e-10) and parts["kl"] > 0


def test_teacher_in_loop_refuses_what_the_losses_cannot_compare(tiny_folder, tiny_windows):
    teacher, _ = load_causal_lm(tiny_folder, with_tokenizer=False)
    t = teacher.config.to_dict()
    narrow = {**t, "hidden_size": 32, "num_hidden_layers": 2}
    with pytest.raises(ConfigError, match=r"hidden size \(32\) is not the teacher's \(64\)"):
        check_teacher_targets(narrow, t, hidden_weight=0.5, layer_map=[0, 3])
    check_teacher_targets(narrow, t, hidden_weight=0.0, layer_map=None)  # the KL alone compares logits
    with pytest.raises(ConfigError, match="vocabulary"):
        check_teacher_targets({**t, "vocab_size": 7}, t, hidden_weight=0.0, layer_map=None)
    with pytest.raises(ConfigError, match="layer map"):
        check_teacher_targets({**t, "num_hidden_layers": 2}, t, hidden_weight=0.5, layer_map=[0, 4])
    student = drop_layers(copy.deepcopy(teacher), keep=[0, 3])
    with pytest.raises(ConfigError, match="layer map"):  # at task build, on the worker, too
        _in_loop_task(tiny_folder, student, tiny_windows, hidden_weight=0.5, layer_map=[0])
