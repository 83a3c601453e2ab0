"""The causal-LM family's Ray Train task (pure torch/transformers): token-level KD of a derived student (a
Llama-class config, e.g. after depth/width pruning) from the teacher's top-k logits cached per token, run by
the shared Train loop (``slimray.training.distill``: DDP/FSDP2, checkpoints, resume, fault recovery).

Why cached top-k here (``kd.py`` has the measurement): with several data-parallel workers, a teacher in the
loop would be loaded and run on every worker at every step; the cache is built once on the driver and shared
through Ray's object store (192 bytes per token at k=32).

Data: ``windows`` (int64 ``[N, L]`` packed token windows), ``topk_values`` (float16 ``[N, L, k]``),
``topk_indices`` (int32 ``[N, L, k]``), ``val_windows`` (held-out windows for perplexity). ``config['task']``:
``hf_config`` (the student's ``config.json`` dict), ``temperature``, ``ce_weight``, ``warmup_steps``,
``bf16_autocast``. Each worker takes an equal share of a seeded permutation per epoch; the lr warms up per
step, then follows a cosine to 10% over all steps. Tied input/output embeddings are stored once in
checkpoints (safetensors holds no shared tensors).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slimray.families.base import TrainTask
from slimray.families.causal_lm.evaluate import perplexity
from slimray.families.causal_lm.kd import topk_kl_loss


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


class CausalLMTask(TrainTask):
    headline = "val_perplexity"

    def __init__(self, config: dict[str, Any], data: dict[str, Any], **kwargs: Any):
        super().__init__(config, data, **kwargs)
        self.opts = config["task"]
        self.windows = torch.from_numpy(np.asarray(data["windows"], dtype=np.int64))
        self.values = torch.from_numpy(np.asarray(data["topk_values"]))
        self.indices = torch.from_numpy(np.asarray(data["topk_indices"]))
        self.val = torch.from_numpy(np.asarray(data["val_windows"], dtype=np.int64))
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
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bool(self.opts.get("bf16_autocast"))):
            logits = model(input_ids=ids, use_cache=False).logits
        kl = topk_kl_loss(logits, self.values[batch].to(self.device), self.indices[batch].to(self.device),
                          temperature=self.opts["temperature"])
        parts = {"kl": float(kl.detach())}
        loss = kl
        if self.opts.get("ce_weight", 0.0) > 0:
            shifted = logits[:, :-1].float()
            ce = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), ids[:, 1:].reshape(-1))
            loss = loss + self.opts["ce_weight"] * ce
            parts["ce"] = float(ce.detach())
        return loss, int(ids.numel()), parts  # examples = tokens: samples_per_s reads as tokens/s

    def validate(self, student: nn.Module) -> dict[str, float]:
        with torch.inference_mode():
            return {"val_perplexity": perplexity(student.to(self.device), self.val.to(self.device))}
