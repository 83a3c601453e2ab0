"""The sentence-encoder family's Ray Train task (pure torch): embedding + hidden-state KD from cached teacher
outputs, run by the shared Train loop (``slimray.training.distill``).

Data (numpy, shared through Ray's object store): the tokenised sentences and the teacher's outputs
(``kd.KDData``: ids, lengths, embeddings, per-layer hidden states, offsets) and a validation set (``val_ids``,
``val_lengths``, ``val_embeddings``). Each worker takes an equal share of a seeded permutation per epoch, cut
into length-bucketed batches; the lr warms up per step, then follows the schedule over all steps. The
word-embedding table can stay frozen (half the model: no AdamW update and no all-reduce for it). bf16 autocast
on CPUs that have it natively. Validation: mean cosine of the student's embeddings to the teacher's.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from slimray.families.base import TrainTask
from slimray.families.sentence_encoder.kd import KDData, autocast, epoch_batches, kd_loss, lr_factor, make_batch, student_cosine
from slimray.families.sentence_encoder.models import TextArtifactSpec, build_float


class EncoderTask(TrainTask):
    """``config['task']``: ``warmup_steps``, ``embed_loss``, ``hidden_weight``, ``freeze_word_embeddings``,
    ``bucket_by_length``, ``bf16_autocast``."""

    headline = "val_cosine"

    def __init__(self, config: dict[str, Any], data: dict[str, Any], **kwargs: Any):
        super().__init__(config, data, **kwargs)
        self.opts = config["task"]
        self.kd = KDData(ids=data["ids"], lengths=data["lengths"], embeddings=data["embeddings"], hidden=list(data["hidden"]),
                         offsets=data["offsets"])
        n, world = len(self.kd), self.world
        self.per_rank = math.ceil(n / world)
        self.num_steps = math.ceil(self.per_rank / config["batch_size"])

    def build(self) -> nn.Module:
        model = build_float(TextArtifactSpec.model_validate(self.config["spec"]))
        if self.opts["freeze_word_embeddings"]:  # before DDP wraps the model: it then leaves the table out
            model.embeddings.word_embeddings.weight.requires_grad_(False)
        return model

    @classmethod
    def rebuild(cls, config: dict[str, Any], state: dict[str, torch.Tensor]) -> nn.Module:
        model = build_float(TextArtifactSpec.model_validate(config["spec"]))
        model.load_state_dict(state)
        return model.eval()

    def parameters(self, net: nn.Module):
        return [p for p in net.parameters() if p.requires_grad]

    def optimizer(self, params) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=self.config["lr"], weight_decay=self.config["weight_decay"])

    def lr_factor(self, *, epoch: int, step: int) -> float:
        total = self.num_steps * self.config["epochs"]
        return lr_factor(epoch * self.num_steps + step, total, warmup=self.opts["warmup_steps"], schedule=self.config["lr_schedule"])

    def batches(self, epoch: int) -> Iterator[Any]:
        seed, n = self.config["seed"], len(self.kd)
        order = np.random.default_rng(seed + epoch).permutation(n)
        order = np.resize(order, self.per_rank * self.world)[self.rank :: self.world]  # equal shards (a few repeats pad the last)
        batches = epoch_batches(order, self.kd.lengths, batch_size=self.config["batch_size"],
                                rng=np.random.default_rng([seed, epoch, self.rank]), bucket=self.opts["bucket_by_length"])
        assert len(batches) == self.num_steps, (len(batches), self.num_steps)
        for idx in batches:
            yield idx

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, int, dict[str, float]]:
        with autocast(self.opts["bf16_autocast"]):
            loss, parts = kd_loss(model, make_batch(self.kd, batch), embed_loss=self.opts["embed_loss"],
                                  hidden_weight=self.opts["hidden_weight"])
        return loss, len(batch), parts

    def steps_per_epoch(self) -> int:
        return self.num_steps

    def validate(self, student: nn.Module) -> dict[str, float]:
        d = self.data
        return {"val_cosine": student_cosine(student, d["val_ids"], d["val_lengths"], d["val_embeddings"])}
