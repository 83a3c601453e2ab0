"""The causal-LM TrainTask fits the shared Train loop's contract: built from the student's config.json dict,
trained on cached top-k teacher logits through the shared epoch loop (loss and held-out perplexity fall),
checkpoint parts without the tied output embedding (safetensors refuses shared tensors) rebuild the same model."""

from __future__ import annotations

import copy

import numpy as np
import torch
from safetensors.torch import load as st_load, save as st_save

from slimray.families.base import run_epoch
from slimray.families.causal_lm.kd import cache_teacher_topk
from slimray.families.causal_lm.prune import drop_layers
from slimray.families.causal_lm.train import CausalLMTask


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
