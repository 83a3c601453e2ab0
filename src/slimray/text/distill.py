"""Sentence-encoder distillation on Ray Train: ``num_workers`` DDP workers (gloo on CPU), 1 torch thread each.

The driver caches the teacher's outputs once (``slimray.text.kd.teacher_targets``) and puts them in Ray's
object store; every worker reads its shard of each epoch through a ``DistributedSampler``-style split of a
seeded permutation and runs the student only. Rank 0 reports a checkpoint every epoch (student
safetensors + optimizer state); a rerun with the same run name resumes from the latest one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer
from safetensors.torch import load_file, save_file

from slimray.text.kd import KDData, autocast, epoch_batches, kd_loss, lr_factor, make_batch, student_cosine, trainable_parameters
from slimray.text.models import TextArtifactSpec, build_float

MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
LOG_EVERY_S = 30.0  # rank 0 prints a progress line this often within an epoch


def _worker(cfg: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg["seed"])
    spec = TextArtifactSpec.model_validate(cfg["spec"])
    model = build_float(spec)
    model.load_state_dict(ray.get(cfg["init_state"]))
    opt_state, start_epoch = None, 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            model.load_state_dict(load_file(os.path.join(d, MODEL_FILE)))
            state = torch.load(os.path.join(d, STATE_FILE), weights_only=True)
        opt_state, start_epoch = state["optimizer"], state["epoch"] + 1
        if rank == 0:
            print(f"[distill] resumed from checkpoint after epoch {start_epoch}", flush=True)
    model.train()
    params = trainable_parameters(model, freeze_word_embeddings=cfg["freeze_word_embeddings"])
    model = ray.train.torch.prepare_model(model, parallel_strategy="ddp")
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    if opt_state is not None:
        opt.load_state_dict(opt_state)

    data = KDData(**{k: ray.get(v) if k != "hidden" else [ray.get(h) for h in v] for k, v in cfg["data"].items()})
    val = {k: ray.get(v) for k, v in cfg["val"].items()}
    n, bs, epochs = len(data), cfg["batch_size"], cfg["epochs"]
    per_rank = math.ceil(n / world)
    steps_per_epoch = math.ceil(per_rank / bs)
    total = steps_per_epoch * epochs
    net = model.module if hasattr(model, "module") else model
    start = time.perf_counter()
    for epoch in range(start_epoch, epochs):
        order = np.random.default_rng(cfg["seed"] + epoch).permutation(n)
        order = np.resize(order, per_rank * world)[rank::world]  # equal shards (a few repeats pad the last)
        batches = epoch_batches(order, data.lengths, batch_size=bs, rng=np.random.default_rng([cfg["seed"], epoch, rank]),
                                bucket=cfg["bucket_by_length"])
        assert len(batches) == steps_per_epoch, (len(batches), steps_per_epoch)
        t0, seen, loss_sum, parts_sum = time.perf_counter(), 0, 0.0, {}
        model.train()
        last_log = t0
        for s, idx in enumerate(batches):
            step = epoch * steps_per_epoch + s
            if rank == 0 and time.perf_counter() - last_log > LOG_EVERY_S:
                last_log = time.perf_counter()
                print(f"[distill] epoch {epoch + 1}/{epochs}  step {s}/{steps_per_epoch}  loss {loss_sum / max(1, s):.4f}  "
                      f"{seen * world / (last_log - t0):.0f} sentences/s", flush=True)
            for g in opt.param_groups:
                g["lr"] = cfg["lr"] * lr_factor(step, total, warmup=cfg["warmup_steps"], schedule=cfg["lr_schedule"])
            with autocast(cfg["bf16_autocast"]):
                loss, parts = kd_loss(model, make_batch(data, idx), embed_loss=cfg["embed_loss"], hidden_weight=cfg["hidden_weight"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(idx)
            loss_sum += float(loss.detach())
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v
        secs = time.perf_counter() - t0
        metrics: dict[str, Any] = {
            "epoch": epoch + 1, "loss": loss_sum / steps_per_epoch, "epoch_s": secs,
            "sentences_per_s": seen * world / secs, **{f"loss_{k}": v / steps_per_epoch for k, v in parts_sum.items()},
        }
        if rank == 0:
            metrics["val_cosine"] = student_cosine(net, val["ids"], val["lengths"], val["embeddings"])
            eta = (time.perf_counter() - start) / (epoch + 1 - start_epoch) * (epochs - epoch - 1)
            print(
                f"[distill] epoch {epoch + 1}/{epochs}  loss {metrics['loss']:.4f}  val cosine {metrics['val_cosine']:.4f}  "
                f"{metrics['sentences_per_s']:.0f} sentences/s  ETA {eta:.0f}s", flush=True,
            )
            if cfg.get("metrics_path"):
                with open(cfg["metrics_path"], "a") as f:
                    f.write(json.dumps(metrics) + "\n")
            with tempfile.TemporaryDirectory() as d:
                save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, os.path.join(d, MODEL_FILE))
                torch.save({"optimizer": opt.state_dict(), "epoch": epoch}, os.path.join(d, STATE_FILE))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)


def distill_student(
    *, spec: TextArtifactSpec, init_state: dict[str, torch.Tensor], data: KDData, val: dict[str, np.ndarray],
    epochs: int, batch_size: int, lr: float, lr_schedule: str, warmup_steps: int, weight_decay: float,
    embed_loss: str, hidden_weight: float, num_workers: int, max_failures: int, seed: int,
    run_name: str, storage_path: str, metrics_path: str | None = None,
    freeze_word_embeddings: bool = True, bucket_by_length: bool = True, bf16_autocast: bool = False,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Fit the student on Ray Train; returns it (float, eval mode) and the last epoch's metrics."""
    cpus = ray.cluster_resources().get("CPU", 0.0)
    if num_workers > cpus:
        raise RuntimeError(f"distillation needs {num_workers} workers x 1 CPU but the cluster has {cpus:g} CPUs")
    cfg = {
        "spec": spec.model_dump(), "init_state": ray.put(init_state), "seed": seed,
        "data": {"ids": ray.put(data.ids), "lengths": ray.put(data.lengths), "embeddings": ray.put(data.embeddings),
                 "hidden": [ray.put(h) for h in data.hidden], "offsets": ray.put(data.offsets)},
        "val": {k: ray.put(v) for k, v in val.items()},
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "lr_schedule": lr_schedule, "warmup_steps": warmup_steps,
        "weight_decay": weight_decay, "embed_loss": embed_loss, "hidden_weight": hidden_weight, "metrics_path": metrics_path,
        "freeze_word_embeddings": freeze_word_embeddings, "bucket_by_length": bucket_by_length, "bf16_autocast": bf16_autocast,
    }
    trainer = TorchTrainer(
        _worker,
        train_loop_config=cfg,
        torch_config=ray.train.torch.TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("distillation produced no checkpoint")
    model = build_float(spec)
    with result.checkpoint.as_directory() as d:
        model.load_state_dict(load_file(str(Path(d) / MODEL_FILE)))
    return model.eval(), dict(result.metrics or {})
