"""The causal-LM family's Ray Train task (pure torch/transformers): token-level KD of a derived student (a
Llama-class config, e.g. after depth/width pruning) run by the shared Train loop (``slimray.training.distill``:
DDP/FSDP2, checkpoints, resume, fault recovery). Two kinds of teacher targets (``config['task']['targets']``):

- ``topk_cache`` (default): the teacher's top-k logits per token, cached once on the driver and shared through
  Ray's object store (192 bytes per token at k=32); the loss is ``kd.topk_kl_loss``.
- ``teacher_in_loop``: each worker loads the teacher itself from its HF folder on disk (``teacher_path``: the
  path travels in the config, not the weights, so every worker's node must read that folder: one machine or a
  shared disk; safetensors, no remote code), frozen (eval, no grads) on the worker's device, and runs it under
  ``torch.no_grad`` (and the student's bf16 autocast) on every batch: the exact full-vocabulary ``kd.kl_loss``, plus with ``hidden_weight > 0`` the hidden-state MSE ``kd.hidden_loss``
  (student layer i against teacher layer ``layer_map[i]``, the teacher layers a depth-pruned student kept). The
  teacher is not part of the trained module, so checkpoints hold the student alone; after a worker restart the
  task is rebuilt and loads the teacher again. ``kd.py`` has the measurement behind choosing between the two.

Data: ``windows`` (int64 ``[N, L]`` packed token windows), ``val_windows`` (held-out windows for perplexity) and,
for ``topk_cache`` only, ``topk_values`` (float16 ``[N, L, k]``) and ``topk_indices`` (int32 ``[N, L, k]``).
``config['task']``: ``hf_config`` (the student's ``config.json`` dict), ``temperature``, ``ce_weight``,
``warmup_steps``, ``bf16_autocast``, ``targets`` and, with the teacher in the loop, ``teacher_path``,
``hidden_weight`` and ``layer_map``. Each worker takes an equal share of a seeded permutation per epoch; the lr
warms up per step, then follows a cosine to 10% over all steps. Tied input/output embeddings are stored once in
checkpoints (safetensors holds no shared tensors).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slimray.families.base import TrainTask
from slimray.families.causal_lm.evaluate import perplexity
from slimray.families.causal_lm.kd import hidden_loss, kl_loss, layer_outputs, topk_kl_loss
from slimray.schema import ConfigError

TARGETS = ("topk_cache", "teacher_in_loop")


def build_student(hf_config: dict[str, Any]) -> nn.Module:
    """The architecture a ``config.json`` dict describes (randomly initialised; weights are loaded after)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(hf_config)
    model_type = cfg.pop("model_type")
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg))


def _tied_keys(model: nn.Module) -> set[str]:
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    return {"lm_head.weight"}


def check_teacher_targets(student_config: dict[str, Any], teacher_config: dict[str, Any], *, hidden_weight: float,
                          layer_map: Sequence[int] | None) -> None:
    """Refuse (``ConfigError``) a teacher-in-the-loop pairing the losses cannot compare: a different vocabulary
    (the KL is per token over the vocabulary) or, with ``hidden_weight > 0``, a different hidden size, or a
    ``layer_map`` that does not give one teacher layer per student layer. Config dicts as in ``config.json``."""
    sv, tv = student_config.get("vocab_size"), teacher_config.get("vocab_size")
    if sv != tv:
        raise ConfigError(f"distill.targets teacher_in_loop: the student's vocabulary ({sv}) is not the teacher's ({tv})")
    if hidden_weight <= 0:
        return
    sh, th = student_config.get("hidden_size"), teacher_config.get("hidden_size")
    if sh != th:
        raise ConfigError(f"distill.hidden_weight > 0 compares hidden states, but the student's hidden size ({sh}) is not "
                          f"the teacher's ({th}); set distill.hidden_weight: 0 (depth and width pruning keep the hidden size)")
    n_s, n_t = student_config.get("num_hidden_layers"), teacher_config.get("num_hidden_layers")
    if layer_map is None or len(layer_map) != n_s or not all(isinstance(j, int) and 0 <= j < n_t for j in layer_map):
        raise ConfigError(f"distill.hidden_weight > 0 needs a layer map with one teacher layer in [0, {n_t}) per student "
                          f"layer ({n_s}), got {None if layer_map is None else list(layer_map)}")


def load_frozen_teacher(path: str, *, device: torch.device) -> nn.Module:
    """The teacher from its HF folder (safetensors, no remote code) on ``device``: eval mode, no gradients."""
    from slimray.families.causal_lm.teacher import load_causal_lm

    teacher, _ = load_causal_lm(path, with_tokenizer=False)
    teacher = teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class CausalLMTask(TrainTask):
    headline = "val_perplexity"

    def __init__(self, config: dict[str, Any], data: dict[str, Any], **kwargs: Any):
        super().__init__(config, data, **kwargs)
        self.opts = config["task"]
        self.targets = self.opts.get("targets", "topk_cache")
        if self.targets not in TARGETS:
            raise ConfigError(f"task.targets {self.targets!r}: one of {list(TARGETS)}")
        self.hidden_weight = float(self.opts.get("hidden_weight", 0.0))
        self.layer_map = self.opts.get("layer_map")
        self.windows = torch.from_numpy(np.asarray(data["windows"], dtype=np.int64))
        self.val = torch.from_numpy(np.asarray(data["val_windows"], dtype=np.int64))
        self.teacher: nn.Module | None = None
        if self.targets == "topk_cache":
            if self.hidden_weight > 0:
                raise ConfigError("distill.hidden_weight > 0 needs targets teacher_in_loop (the cache holds logits only)")
            self.values = torch.from_numpy(np.asarray(data["topk_values"]))
            self.indices = torch.from_numpy(np.asarray(data["topk_indices"]))
        else:
            if not self.opts.get("teacher_path"):
                raise ConfigError("task.targets teacher_in_loop needs task.teacher_path (the teacher's HF folder)")
            self.teacher = load_frozen_teacher(self.opts["teacher_path"], device=self.device)
            check_teacher_targets(self.opts["hf_config"], self.teacher.config.to_dict(), hidden_weight=self.hidden_weight,
                                  layer_map=self.layer_map)
        n = len(self.windows)
        self.per_rank = math.ceil(n / self.world)
        self.num_steps = math.ceil(self.per_rank / config["batch_size"])

    def build(self) -> nn.Module:
        return build_student(self.opts["hf_config"]).train()

    @classmethod
    def rebuild(cls, config: dict[str, Any], state: dict[str, torch.Tensor]) -> nn.Module:
        model = build_student(config["task"]["hf_config"])
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and set(missing) <= _tied_keys(model), (missing, unexpected)
        return model.eval()

    def split_state(self, state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        tied = {"lm_head.weight"} if self.opts["hf_config"].get("tie_word_embeddings") else set()
        return {"model": {k: v for k, v in state.items() if k not in tied}}

    def load_parts(self, net: nn.Module, parts: dict[str, dict[str, torch.Tensor]]) -> None:
        missing, unexpected = net.load_state_dict(parts["model"], strict=False)
        assert not unexpected and set(missing) <= _tied_keys(net), (missing, unexpected)

    def optimizer(self, params) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=self.config["lr"], weight_decay=self.config.get("weight_decay", 0.0))

    def lr_factor(self, *, epoch: int, step: int) -> float:
        total, warmup = self.num_steps * self.config["epochs"], self.opts["warmup_steps"]
        pos = epoch * self.num_steps + step
        if pos < warmup:
            return (pos + 1) / warmup
        frac = (pos - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))

    def steps_per_epoch(self) -> int:
        return self.num_steps

    def batches(self, epoch: int) -> Iterator[Any]:
        order = np.random.default_rng(self.config["seed"] + epoch).permutation(len(self.windows))
        order = np.resize(order, self.per_rank * self.world)[self.rank :: self.world]  # equal shards
        bs = self.config["batch_size"]
        for i in range(0, len(order), bs):
            yield torch.from_numpy(order[i : i + bs])

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, int, dict[str, float]]:
        ids = self.windows[batch].to(self.device)
        want_hidden = self.hidden_weight > 0
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bool(self.opts.get("bf16_autocast")))
        parts: dict[str, float] = {}
        with autocast, layer_outputs(model, enabled=want_hidden) as s_hidden:
            logits = model(input_ids=ids, use_cache=False).logits
        if self.teacher is None:
            kl = topk_kl_loss(logits, self.values[batch].to(self.device), self.indices[batch].to(self.device),
                              temperature=self.opts["temperature"])
            loss = kl
        else:
            t0 = time.perf_counter()
            with torch.no_grad(), autocast, layer_outputs(self.teacher, enabled=want_hidden) as t_hidden:
                t_logits = self.teacher(input_ids=ids, use_cache=False).logits
            parts["teacher_s"] = time.perf_counter() - t0  # the shared loop's profile splits it from the forward
            kl = kl_loss(logits, t_logits, temperature=self.opts["temperature"])
            loss = kl
            if want_hidden:
                hid = hidden_loss(s_hidden, t_hidden, layer_map=self.layer_map)
                loss = loss + self.hidden_weight * hid
                parts["hidden"] = float(hid.detach())
        parts["kl"] = float(kl.detach())
        if self.opts.get("ce_weight", 0.0) > 0:
            shifted = logits[:, :-1].float()
            ce = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), ids[:, 1:].reshape(-1))
            loss = loss + self.opts["ce_weight"] * ce
            parts["ce"] = float(ce.detach())
        return loss, int(ids.numel()), parts  # examples = tokens: samples_per_s reads as tokens/s

    def validate(self, student: nn.Module) -> dict[str, float]:
        with torch.inference_mode():
            return {"val_perplexity": perplexity(student.to(self.device), self.val.to(self.device))}
