"""Distillation on Ray Train, one loop for every model family: ``num_workers`` data-parallel workers (gloo on
CPU, nccl on GPU) each run the family's ``TrainTask`` (``slimray.families.base``; the job's ``family`` picks
it): the task builds the module, yields this worker's batches, computes the loss and validates; this loop owns
the rest (DDP or FSDP2, the optimizer's state, the lr at every step, checkpoints, resume, fault recovery,
metrics, console lines). It knows no family: what a family's task needs (KD weights, where its teacher comes from,
feature KD, its input spec) travels in ``TrainJob.task`` and in the data the family shares (a dict of arrays, or an
object whose ``for_workers`` prepares them, as the classifier's ``slimray.training.classifier_data.TrainData``).

``strategy``: ``ddp`` wraps the model in DistributedDataParallel (``ray.train.torch.prepare_model``); ``fsdp``
shards it with torch's FSDP2 ``fully_shard`` (each parameterised block, then the root). Ray's own
``prepare_model(parallel_strategy="fsdp")`` wraps FSDP1 and refuses CPU; FSDP2 runs on CPU with gloo in
torch 2.13 (tested here) as well as on GPU with nccl. Checkpoints hold full state dicts either way: under FSDP
every rank joins ``get_model_state_dict / get_optimizer_state_dict(full_state_dict=True)`` and rank 0 writes.

Each epoch rank 0 reports a checkpoint (every part the task names: the student's safetensors, a feature projection,
optimizer, epoch and RNG state). A rerun with the same run name resumes from the latest one, and ``max_failures`` lets
Ray restart a lost worker group from it; since the sampler's order is a function of (seed, epoch) and the lr of the
epoch, a resumed run repeats the uninterrupted one. ``placement_strategy`` goes to Ray Train's ``ScalingConfig``;
strict placements that the nodes cannot satisfy fail fast. Each metrics line records the node of every worker, how
often each training sample was drawn that epoch (across workers), and with ``profile`` a per-epoch time breakdown
(see ``bench/distill_throughput.py``). With ``final_dir`` rank 0 also writes the task's artifact after the last epoch.
"""

from __future__ import annotations

import json
import logging
import warnings
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer
from safetensors.torch import load_file, save_file

from slimray.families.base import EpochStats, TrainTask, describe_val, run_epoch
from slimray.raycompat import train_report_loggers
from slimray.schema import ClusterTooSmallError, StrictModel

MODEL_FILE = "model.safetensors"  # a checkpoint holds one safetensors file per TrainTask part (model, projection, ...)
STATE_FILE = "train_state.pt"
LOG_EVERY_S = 30.0  # rank 0 prints a progress line this often within a long epoch (to its worker log)


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


def _rng_state() -> dict[str, Any]:
    # torch's generator drives dropout/init; the sampler's order is a function of (seed, epoch) alone and a
    # run always resumes at an epoch boundary, so (weights, optimizer, epoch, this) restore the run exactly
    return {"torch": torch.get_rng_state()}


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _shard(net: torch.nn.Module, task: TrainTask) -> torch.nn.Module:
    """FSDP2: each parameterised block of the student its own shard group, the rest (projection) with the root."""
    from torch.distributed.fsdp import fully_shard

    student = task.student(net)
    for child in student.children():
        if any(True for _ in child.parameters()):
            fully_shard(child)
    fully_shard(net)
    return net


def _full_state(model: torch.nn.Module, opt: torch.optim.Optimizer, strategy: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Full (unsharded) model and optimizer state on rank 0; a collective under FSDP (every rank calls it)."""
    if strategy == "fsdp" and _distributed():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, opt, options=opts)
    net = model.module if hasattr(model, "module") else model
    return net.state_dict(), opt.state_dict()


def _placement_group_id() -> str | None:
    pg = ray.util.get_current_placement_group()
    return pg.id.hex() if pg is not None else None


def _comm_costs(model: torch.nn.Module, task: TrainTask, *, steps: int = 20) -> dict[str, float]:
    """Per-step cost of DDP's gradient all-reduce, measured two ways before training (weights untouched):
    the bare collective on a gradient-sized buffer, and a synchronised backward minus a ``no_sync`` one."""
    if not (_distributed() and hasattr(model, "no_sync")):
        return {"allreduce_s_per_step": 0.0, "sync_overhead_s_per_step": 0.0}
    import contextlib

    numel = sum(p.numel() for p in model.parameters())
    buf = torch.zeros(numel, device=next(model.parameters()).device)
    for _ in range(3):
        torch.distributed.all_reduce(buf)
    t0 = time.perf_counter()
    for _ in range(steps):
        torch.distributed.all_reduce(buf)
    bare = (time.perf_counter() - t0) / steps
    task.set_epoch(0)
    batch = next(iter(task.batches(0)))

    def timed(sync: bool) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            with contextlib.nullcontext() if sync else model.no_sync():
                task.loss(model, batch)[0].backward()
        return (time.perf_counter() - t0) / steps

    timed(True), timed(False)  # warm-up (DDP rebuilds its buckets on the first synchronised step)
    overhead = timed(True) - timed(False)
    model.zero_grad(set_to_none=True)
    return {"allreduce_s_per_step": bare, "sync_overhead_s_per_step": max(overhead, 0.0)}


def _fetch(value: Any) -> Any:
    """Shared data as the worker sees it: object references fetched (also inside lists), the rest as given."""
    if isinstance(value, ray.ObjectRef):
        return ray.get(value)
    if isinstance(value, list):
        return [_fetch(v) for v in value]
    return value


def _run_epoch(model: torch.nn.Module, task: TrainTask, opt: torch.optim.Optimizer, *, epoch: int, base_lr: float, profile: bool,
               label: str, rank: int) -> EpochStats:
    """One epoch of the task's batches (``run_epoch``), the lr a function of (epoch, step) alone so a resumed
    run gets the same; rank 0 prints a progress line now and then within a long epoch (its worker log)."""
    num_steps = task.steps_per_epoch()
    last = [time.perf_counter()]

    def progress(step: int, loss: float, n: int) -> None:
        if rank == 0 and time.perf_counter() - last[0] > LOG_EVERY_S:
            last[0] = time.perf_counter()
            of = f"/{num_steps}" if num_steps else ""
            print(f"[{label}] epoch {epoch + 1}  step {step + 1}{of}  loss {loss:.4f}", flush=True)

    return run_epoch(model, task.batches(epoch), task.loss, opt, lr_at=lambda step: base_lr * task.lr_factor(epoch=epoch, step=step),
                     profile=profile, on_step=progress)


def _worker_loop(cfg: dict[str, Any]) -> None:
    """Runs on every Ray Train worker, for any model family: the family's TrainTask says what trains and how."""
    from slimray import families

    torch.set_num_threads(1)
    for name in train_report_loggers():  # Ray Train logs every report at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    strategy = cfg["strategy"]
    _seed_all(cfg["seed"])

    data = {k: _fetch(v) for k, v in cfg["data"].items()}
    shard = ray.train.get_dataset_shard("train") if cfg["stream"] else None
    task_cls = families.get(cfg["family"]).load("train_task")
    task: TrainTask = task_cls(cfg, data, shard=shard, rank=rank, world=world, device=device)
    net = task.build()
    if data.get("init_state") is not None:
        task.student(net).load_state_dict(data["init_state"])

    optimizer_state, start_epoch = None, 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            parts = {f[: -len(".safetensors")]: load_file(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors")}
            task.load_parts(net, parts)
            state = torch.load(os.path.join(d, STATE_FILE), weights_only=True)
        if state.get("strategy", "ddp") != strategy:
            raise RuntimeError(f"checkpoint was written with strategy {state.get('strategy', 'ddp')!r}, this run uses {strategy!r}")
        optimizer_state, start_epoch = state["optimizer"], state["epoch"] + 1
        torch.set_rng_state(state["rng"]["torch"])
        if rank == 0:
            print(f"[{cfg['label']}] resumed from checkpoint after epoch {state['epoch'] + 1}", flush=True)

    if strategy == "fsdp":
        model = ray.train.torch.prepare_model(net, parallel_strategy=None)  # moves it to the device
        if world > 1:
            model = _shard(model, task)
    else:
        model = ray.train.torch.prepare_model(net, parallel_strategy="ddp")
    opt = task.optimizer(task.parameters(model))
    if optimizer_state is not None:
        if strategy == "fsdp" and _distributed():
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(model, opt, optimizer_state, options=StateDictOptions(full_state_dict=True))
        else:
            opt.load_state_dict(optimizer_state)

    node = ray.get_runtime_context().get_node_id()
    nodes = [node]
    if _distributed() and world > 1:
        nodes = [None] * world
        torch.distributed.all_gather_object(nodes, node)
    steps_per_epoch = task.steps_per_epoch()
    comm = _comm_costs(model, task) if cfg["profile"] and strategy == "ddp" and steps_per_epoch else {}

    epochs = cfg["epochs"]
    run_start = time.perf_counter()
    for epoch in range(start_epoch, epochs):
        task.set_epoch(epoch)
        stats = _run_epoch(model, task, opt, epoch=epoch, base_lr=cfg["lr"], profile=cfg["profile"], label=cfg["label"], rank=rank)
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": stats.loss,
            **stats.parts,
            "samples_per_s": stats.samples_per_s * world,
            "epoch_s": stats.seconds,
            **task.epoch_counts(stats.num_samples),
            "worker_nodes": nodes,
            "resumed_after_epoch": start_epoch,  # 0: this worker group started fresh
            "placement_group": _placement_group_id(),
        }
        if cfg["profile"]:
            metrics.update(stats.breakdown)
            if comm:
                metrics["allreduce_est_s"] = comm["allreduce_s_per_step"] * steps_per_epoch
                metrics["sync_overhead_est_s"] = comm["sync_overhead_s_per_step"] * steps_per_epoch
        model_state, opt_state = _full_state(model, opt, strategy)  # every rank: a collective under FSDP
        if rank == 0:
            parts = task.split_state({k: v.detach().cpu().contiguous() for k, v in model_state.items()})
            evaluator = task_cls.rebuild(cfg, parts["model"])
            metrics.update(task.validate(evaluator))
            done = epoch + 1 - start_epoch
            eta = (time.perf_counter() - run_start) / done * (epochs - epoch - 1)
            print(
                f"[{cfg['label']}] epoch {epoch + 1}/{epochs}  loss {stats.loss:.4f}  {describe_val(metrics)}  "
                f"{metrics['samples_per_s']:.0f} samples/s  ETA {eta:.0f}s",
                flush=True,
            )
            if cfg.get("metrics_path"):
                Path(cfg["metrics_path"]).parent.mkdir(parents=True, exist_ok=True)
                with open(cfg["metrics_path"], "a") as f:
                    f.write(json.dumps(metrics) + "\n")
            if cfg.get("final_dir") and epoch + 1 == epochs:  # before reporting: a scheduler may end the run at this report
                task.save_artifact(cfg["final_dir"], evaluator.cpu(), metrics)
            with tempfile.TemporaryDirectory() as d:
                for stem, tensors in parts.items():
                    save_file(tensors, os.path.join(d, f"{stem}.safetensors"))
                torch.save(
                    {"optimizer": opt_state, "epoch": epoch, "rng": _rng_state(), "strategy": strategy}, os.path.join(d, STATE_FILE)
                )
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)


PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]


class TrainJob(StrictModel):
    """One Ray Train run: what to train, how, and where it keeps its checkpoints."""

    label: str
    run_name: str
    storage_path: str
    family: str  # whose TrainTask runs on the workers (slimray.families)
    task: dict[str, Any] = {}  # the family's own training options (its TrainTask reads config["task"]: KD weights, teacher, ...)
    spec: dict[str, Any]
    epochs: int
    batch_size: int
    lr: float
    lr_schedule: str = "constant"
    weight_decay: float = 0.0
    num_workers: int = 2
    use_gpu: bool = False
    seed: int = 0
    max_failures: int = 2
    placement_strategy: PlacementStrategy = "PACK"
    strategy: Literal["ddp", "fsdp"] = "ddp"
    profile: bool = False
    metrics_path: str | None = None
    cpus_per_worker: float = 1.0
    final_dir: str | None = None  # rank 0 writes the trained student artifact here after the last epoch


def check_placement(*, num_workers: int, strategy: str, use_gpu: bool, what: str) -> None:
    """Fail fast when a strict placement cannot be met by the nodes (rather than waiting for resources)."""
    if strategy not in ("STRICT_PACK", "STRICT_SPREAD"):
        return
    key = "GPU" if use_gpu else "CPU"
    per_node = [n["Resources"].get(key, 0.0) for n in ray.nodes() if n.get("Alive")]
    if strategy == "STRICT_SPREAD" and sum(1 for r in per_node if r >= 1) < num_workers:
        raise ClusterTooSmallError(
            f"{what}: STRICT_SPREAD puts each of {num_workers} workers on its own node, but only "
            f"{sum(1 for r in per_node if r >= 1)} nodes have a {key}"
        )
    if strategy == "STRICT_PACK" and max(per_node, default=0.0) < num_workers:
        raise ClusterTooSmallError(
            f"{what}: STRICT_PACK puts all {num_workers} workers on one node, but no node has {num_workers} {key}s "
            f"(largest: {max(per_node, default=0.0):g})"
        )


class EpochLines:
    """One console line per finished epoch while a Train run fits, read from the metrics file rank 0 appends to:
    the workers' own prints stay out of a quiet console (``log_to_driver=False``), so without this a long
    distillation would show nothing between its stage lines. Off with ``--verbose`` (the workers' lines show)."""

    def __init__(self, job: TrainJob, *, poll_s: float = 1.0):
        import threading

        from slimray import console

        self.job, self.poll_s = job, poll_s
        self.path = Path(job.metrics_path) if job.metrics_path and not console.verbose() else None
        self.offset = self.path.stat().st_size if self.path is not None and self.path.exists() else 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"epoch-lines-{job.label}")

    def __enter__(self) -> EpochLines:
        if self.path is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.path is not None:
            self.done.set()
            self.thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            stop = self.done.wait(self.poll_s)
            self._flush()
            if stop:
                return

    def _flush(self) -> None:
        from slimray.runs import log

        try:
            with open(self.path) as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return
        complete = chunk[: chunk.rfind("\n") + 1]
        self.offset += len(complete.encode())
        for line in complete.splitlines():
            try:
                m = json.loads(line)
            except json.JSONDecodeError:
                continue
            resumed = f", resumed after epoch {m['resumed_after_epoch']}" if m.get("resumed_after_epoch") else ""
            log(f"{self.job.label}: epoch {m['epoch']}/{self.job.epochs}  loss {m['loss']:.4f}  {describe_val(m)}  "
                f"{m.get('samples_per_s', 0):.0f} samples/s{resumed}")


def stream_cpus_per_worker(job: TrainJob) -> float:
    """CPUs each worker reserves when it reads a Ray Data stream. Ray Data's read tasks need a CPU that the
    workers do not hold, or they never run (seen on 2 CPUs with 2 workers: the dataset waited forever); on a
    cluster without a spare CPU the workers reserve less, so one CPU stays free for reading."""
    total = ray.cluster_resources().get("CPU", 0.0)
    spare = total - job.num_workers * job.cpus_per_worker
    if spare >= 1.0:
        return job.cpus_per_worker
    return max(0.1, (total - 1.0) / job.num_workers)


def _shared(value: Any) -> Any:
    """Large values go to the object store once (workers fetch them); references and small values stay as they are."""
    if value is None or isinstance(value, (ray.ObjectRef, str, int, float, bool)):
        return value
    if isinstance(value, list):
        return [_shared(v) for v in value]
    return ray.put(value)


def run_training(
    job: TrainJob, data: Any, *, init_state: dict[str, torch.Tensor] | None = None,
    callbacks: list[Any] | None = None, stream: Any = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Fit ``job`` on Ray Train with its family's TrainTask; returns the trained student (eval mode, CPU) and
    the last metrics. ``data``: a family's dict of shared objects (arrays or object references), or an object
    whose ``for_workers(job, init_state=...)`` returns that dict and its stream after checking them on the driver
    (the classifier's ``TrainData``); ``stream``: a Ray Dataset the workers read in shards. ``callbacks`` go to the Train run (a Tune trial passes ``TuneReportCallback``)."""
    from slimray import families

    task_cls = families.get(job.family).load("train_task")
    check_fits(num_workers=job.num_workers, cpus_per_worker=job.cpus_per_worker, use_gpu=job.use_gpu, what=job.label)
    check_placement(num_workers=job.num_workers, strategy=job.placement_strategy, use_gpu=job.use_gpu, what=job.label)
    if isinstance(data, dict):
        shared = {**data, "init_state": init_state}
    else:  # a family's data object prepares itself on the driver (the classifier's TrainData)
        shared, stream = data.for_workers(job, init_state=init_state)
    cfg = job.model_dump()
    cfg.update(data={k: _shared(v) for k, v in shared.items()}, stream=stream is not None)
    cpus_per_worker = stream_cpus_per_worker(job) if stream is not None else job.cpus_per_worker
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config=cfg,
        datasets={"train": stream} if stream is not None else None,
        scaling_config=ray.train.ScalingConfig(
            num_workers=job.num_workers, use_gpu=job.use_gpu, resources_per_worker={"CPU": cpus_per_worker},
            placement_strategy=job.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=job.run_name,
            storage_path=job.storage_path,
            callbacks=callbacks,
            failure_config=ray.train.FailureConfig(max_failures=job.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    with EpochLines(job):
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{job.label}: training produced no checkpoint")
    with result.checkpoint.as_directory() as d:
        model = task_cls.rebuild(cfg, load_file(str(Path(d) / MODEL_FILE)))
    return model.eval(), dict(result.metrics or {})
