"""Distillation on Ray Train: ``num_workers`` DDP workers (gloo on CPU, nccl on GPU).

Teacher logits are computed once by the driver and shared through Ray's object store (each worker reads
its shard through a ``DistributedSampler``): on MNIST that made a distillation epoch 4x cheaper than
running the teacher in every step (0.36 s vs 1.6 s per epoch measured here), and the teacher never has to
fit on a worker. With ``alpha == 0`` and no logits the same loop trains on labels only (teacher
training for the digits recipe, and the labels-only baseline beside every distilled student).

Each epoch rank 0 reports a checkpoint (model safetensors + optimizer, epoch and RNG state). A rerun
with the same run name resumes from the latest one, and ``max_failures`` lets Ray restart a lost
worker group from it.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution import context as _ctx_module
from safetensors.torch import load_file, save_file

from slimray.models.spec import CNNSpec, MLPSpec, build_model
from slimray.schema import StrictModel
from slimray.training.loop import train_epoch

MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"


@dataclass(frozen=True)
class TrainData:
    """Object-store references to normalised arrays: train (x, y[, teacher logits]) and val (x, y)."""

    x_train: ray.ObjectRef
    y_train: ray.ObjectRef
    x_val: ray.ObjectRef
    y_val: ray.ObjectRef
    teacher_logits: ray.ObjectRef | None = None


class ClusterTooSmallError(RuntimeError):
    """The cluster cannot fit what was asked for; raised before anything waits on resources."""


def check_fits(*, num_workers: int, cpus_per_worker: float, use_gpu: bool, what: str) -> None:
    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    need_cpu = num_workers * cpus_per_worker
    if need_cpu > cpus:
        raise ClusterTooSmallError(
            f"{what} needs {num_workers} workers x {cpus_per_worker:g} CPU = {need_cpu:g} CPUs, "
            f"but the cluster has {cpus:g}; lower num_workers or add nodes"
        )
    if use_gpu and num_workers > gpus:
        raise ClusterTooSmallError(
            f"{what} needs {num_workers} GPUs (use_gpu with {num_workers} workers), the cluster has {gpus:g}"
        )


def lr_at(base: float, epoch: int, epochs: int, schedule: str) -> float:
    if schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    return base


def _rng_state() -> dict[str, Any]:
    # torch's generator drives dropout/init; the sampler's order is a function of (seed, epoch) alone
    return {"torch": torch.get_rng_state()}


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _worker_loop(cfg: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    torch.set_num_threads(1)
    for name in ("ray.train", _ctx_module.__file__):  # Ray Train logs every report at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    use_cuda = device.type == "cuda"
    _seed_all(cfg["seed"])

    spec = (CNNSpec if cfg["spec"]["kind"] == "cnn" else MLPSpec).model_validate(cfg["spec"])
    model = build_model(spec)
    if cfg.get("init_state") is not None:
        model.load_state_dict(ray.get(cfg["init_state"]))
    optimizer_state, start_epoch = None, 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            model.load_state_dict(load_file(os.path.join(d, MODEL_FILE)))
            state = torch.load(os.path.join(d, STATE_FILE), weights_only=True)
        optimizer_state, start_epoch = state["optimizer"], state["epoch"] + 1
        torch.set_rng_state(state["rng"]["torch"])
        if rank == 0:
            print(f"[{cfg['label']}] resumed from checkpoint after epoch {state['epoch'] + 1}", flush=True)

    model = ray.train.torch.prepare_model(model, parallel_strategy="ddp")
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    if optimizer_state is not None:
        opt.load_state_dict(optimizer_state)

    x = torch.from_numpy(ray.get(cfg["x_train"]))
    y = torch.from_numpy(ray.get(cfg["y_train"]))
    tensors = [x, y]
    if cfg["teacher_logits"] is not None and cfg["alpha"] > 0:
        tensors.append(torch.from_numpy(ray.get(cfg["teacher_logits"])))
    dataset = torch.utils.data.TensorDataset(*tensors)
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg["seed"])
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg["batch_size"], sampler=sampler)
    loader = ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False)
    x_val = torch.from_numpy(ray.get(cfg["x_val"]))
    y_val = torch.from_numpy(ray.get(cfg["y_val"]))

    epochs = cfg["epochs"]
    run_start = time.perf_counter()
    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch)
        for group in opt.param_groups:  # a function of the epoch alone, so a resumed run gets the same lr
            group["lr"] = lr_at(cfg["lr"], epoch, epochs, cfg["lr_schedule"])
        stats = train_epoch(
            model, loader, opt, temperature=cfg["temperature"], alpha=cfg["alpha"],
            device=device if use_cuda else None, autocast_dtype=torch.bfloat16 if use_cuda else None,
        )
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": stats.loss,
            "samples_per_s": stats.samples_per_s * world,
            "epoch_s": stats.seconds,
        }
        if rank == 0:
            net = model.module if hasattr(model, "module") else model
            net.eval()
            with torch.inference_mode():
                pred = torch.cat([net(x_val[i : i + 2048].to(device)).argmax(1).cpu() for i in range(0, len(x_val), 2048)])
            metrics["val_accuracy"] = 100.0 * (pred == y_val).float().mean().item()
            done = epoch + 1 - start_epoch
            eta = (time.perf_counter() - run_start) / done * (epochs - epoch - 1)
            print(
                f"[{cfg['label']}] epoch {epoch + 1}/{epochs}  loss {stats.loss:.4f}  "
                f"val acc {metrics['val_accuracy']:.2f}%  {metrics['samples_per_s']:.0f} samples/s  ETA {eta:.0f}s",
                flush=True,
            )
            if cfg.get("metrics_path"):
                with open(cfg["metrics_path"], "a") as f:
                    f.write(json.dumps(metrics) + "\n")
            with tempfile.TemporaryDirectory() as d:
                save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, os.path.join(d, MODEL_FILE))
                torch.save({"optimizer": opt.state_dict(), "epoch": epoch, "rng": _rng_state()}, os.path.join(d, STATE_FILE))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)


class TrainJob(StrictModel):
    """One Ray Train run: what to train, how, and where it keeps its checkpoints."""

    label: str
    run_name: str
    storage_path: str
    spec: dict[str, Any]
    epochs: int
    batch_size: int
    lr: float
    lr_schedule: str = "constant"
    weight_decay: float = 0.0
    temperature: float = 4.0
    alpha: float = 0.0
    num_workers: int = 2
    use_gpu: bool = False
    seed: int = 0
    max_failures: int = 2
    placement_strategy: str = "PACK"
    metrics_path: str | None = None


def run_training(job: TrainJob, data: TrainData, *, init_state: dict[str, torch.Tensor] | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Fit ``job`` on Ray Train; returns the trained model (eval mode, CPU) and the last metrics."""
    check_fits(num_workers=job.num_workers, cpus_per_worker=1, use_gpu=job.use_gpu, what=job.label)
    cfg = job.model_dump()
    cfg.update(
        x_train=data.x_train, y_train=data.y_train, x_val=data.x_val, y_val=data.y_val,
        teacher_logits=data.teacher_logits if job.alpha > 0 else None,
        init_state=ray.put(init_state) if init_state is not None else None,
    )
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config=cfg,
        scaling_config=ray.train.ScalingConfig(
            num_workers=job.num_workers, use_gpu=job.use_gpu, resources_per_worker={"CPU": 1},
            placement_strategy=job.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=job.run_name,
            storage_path=job.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=job.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{job.label}: training produced no checkpoint")
    spec = (CNNSpec if job.spec["kind"] == "cnn" else MLPSpec).model_validate(job.spec)
    model = build_model(spec)
    with result.checkpoint.as_directory() as d:
        model.load_state_dict(load_file(str(Path(d) / MODEL_FILE)))
    return model.eval(), dict(result.metrics or {})
