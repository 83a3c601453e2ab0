"""Knowledge distillation for causal LMs (pure torch, no ray): token-level KL to the teacher (full logits with
the teacher in the loop, or its top-k logits cached per token), optional next-token cross-entropy and
hidden-state losses, and a plain training loop the Ray Train worker can call.

- ``kl_loss``: KL(teacher_T || student_T) per token, mean over tokens, times T^2 (Hinton's scaling).
- ``topk_kl_loss``: the teacher's distribution restricted to its top-k tokens and renormalised; the student's
  full-vocabulary log-probabilities at those k ids. k=32 holds most of the teacher's mass on SmolLM2.
- ``hidden_loss``: MSE between student and teacher hidden states at mapped layers (student layer i <- teacher
  layer ``layer_map[i]``; after depth pruning, the kept teacher layers' own outputs). The states come from
  ``layer_outputs`` (each decoder layer's output, before the final norm): transformers' ``output_hidden_states``
  puts the final norm's output in the last place, which would compare a normed student state with an un-normed
  teacher one whenever the student's last layer maps to a teacher layer other than the last.

Teacher in the loop vs cached top-k logits (measured, ``bench/llm_prune_kd.py``: SmolLM2 30-layer teacher,
20-layer student, batch 2x128, 1 thread, on a 2-core machine shared with other jobs, so absolute times are slow):
teacher in the loop 3.9 s/step; cached top-32 3.3 s/step plus 0.56 s per 128-token window to build the cache
once (1.1 s per step's worth of data); the cache holds 192 bytes/token (fp16 values + int32 ids; ~190 MB per
million tokens). The student's backward dominates the step, so the teacher forward is only ~15% of it.
Choice (``CHOICE``): teacher in the loop for one distillation run over fresh data (no cache to build or store,
exact full-vocabulary KL); cached top-k when the same windows are used again (several epochs, or several Tune
trials distilling students from one teacher on the same data): it pays back from the second use.

The same on Ray Train (the pipeline's ``distill.targets``; ``bench/lm_distill_targets.py``: both modes side by side
in one process and one local Ray, 2 gloo workers with 1 torch thread each, on a 2-core machine shared with other
jobs (load ~2-3), so figures vary by up to 1.7x between rounds; s/step of the second epoch, the first carries the
workers' warm-up):

- smollm recipe sizes (30-layer SmolLM2 teacher, 27-layer student, 2x128 tokens per worker, 3 steps x 2 epochs):
  cached top-32 6.1 s/step + 0.37 s per window to build the cache on the driver (2 threads); teacher in the loop
  7.5 s/step (1.23x). Each worker's teacher forward costs ~0.35 s of wall time per window per pass, the cache
  0.37 s per window once: even after one pass, ahead from the second (whole runs: 108 s vs 111 s for 2 epochs).
- smollm-tiny sizes (2-layer student, 1x32 tokens per worker, 6 steps x 2 epochs, 2 rounds): cached top-8
  0.82 / 1.37 s/step + 0.33 / 0.64 s per window for the cache; teacher in the loop 1.03 / 1.72 s/step (1.25x);
  with the hidden-state loss (weight 0.5) 1.48 / 2.49 s/step. With a 2-layer student the step is mostly the
  DDP all-reduce and the 49k-token output layer, so whole runs are on par (about 50-90 s, mostly Ray Train's
  start).

So the pipeline's default stays ``topk_cache`` (its recipes run 2 epochs over the same windows); pick
``teacher_in_loop`` for one pass over fresh windows, for the exact full-vocabulary KL, or for the hidden-state
loss, which needs the teacher's hidden states.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from slimray.schema import StrictModel

CHOICE = "teacher_in_loop"  # for a single pass; "topk_cache" when several runs/epochs reuse the same windows (the pipeline's default)


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """Mean per-token KL(teacher || student) at ``temperature`` (times T^2); logits ``[..., V]``."""
    t = temperature
    s = F.log_softmax(student_logits.float() / t, -1).reshape(-1, student_logits.shape[-1])
    p = F.log_softmax(teacher_logits.float() / t, -1).reshape(-1, teacher_logits.shape[-1])
    return F.kl_div(s, p, log_target=True, reduction="batchmean") * t * t


def topk_kl_loss(student_logits: torch.Tensor, topk_values: torch.Tensor, topk_indices: torch.Tensor, *,
                 temperature: float = 1.0) -> torch.Tensor:
    """KL from the teacher's renormalised top-k distribution (values/indices ``[..., k]``) to the student."""
    t = temperature
    s = F.log_softmax(student_logits.float() / t, -1).gather(-1, topk_indices.long())
    p_log = F.log_softmax(topk_values.float() / t, -1)
    return (p_log.exp() * (p_log - s)).sum(-1).mean() * t * t


def hidden_loss(student_hidden: Sequence[torch.Tensor | None], teacher_hidden: Sequence[torch.Tensor | None], *,
                layer_map: Sequence[int]) -> torch.Tensor:
    """Mean MSE between student hidden state i+1 and teacher hidden state ``layer_map[i]``+1 (index 0 = embeddings,
    unused; ``layer_outputs`` gives such lists)."""
    losses = [F.mse_loss(student_hidden[i + 1].float(), teacher_hidden[j + 1].float()) for i, j in enumerate(layer_map)]
    return torch.stack(losses).mean()


@contextlib.contextmanager
def layer_outputs(model: torch.nn.Module, *, enabled: bool = True) -> Iterator[list[torch.Tensor | None]]:
    """Within the block, each forward of ``model`` (a Llama-class causal LM, or a DDP wrapper of one) appends each
    decoder layer's output, before the final norm, to the list it yields; index 0 stays None (the embeddings) so
    index i+1 is layer i, as ``hidden_loss`` reads it. Use one block per forward; ``enabled=False`` captures nothing."""
    states: list[torch.Tensor | None] = [None]
    if not enabled:
        yield states
        return
    core = getattr(model, "module", model)

    def keep(module, args, output):
        states.append(output[0] if isinstance(output, tuple) else output)

    handles = [layer.register_forward_hook(keep) for layer in core.model.layers]
    try:
        yield states
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def cache_teacher_topk(teacher: torch.nn.Module, windows: torch.Tensor, *, k: int = 32,
                       batch_size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k logits per token: values float16 ``[N, L, k]``, indices int32 ``[N, L, k]``."""
    teacher.eval()
    vals, idx = [], []
    for i in range(0, len(windows), batch_size):
        v, j = teacher(windows[i:i + batch_size], use_cache=False).logits.float().topk(k, dim=-1)
        vals.append(v.half())
        idx.append(j.int())
    return torch.cat(vals), torch.cat(idx)


def save_topk(path: str | Path, windows: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> None:
    save_file({"windows": windows.contiguous(), "values": values.contiguous(), "indices": indices.contiguous()}, str(path))


def load_topk(path: str | Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t = load_file(str(path))
    return t["windows"], t["values"], t["indices"]


class KDConfig(StrictModel):
    """One distillation run's settings."""

    num_steps: int = 100
    batch_size: int = 2
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    temperature: float = 1.0
    ce_weight: float = 0.0  # next-token cross-entropy on the data, added to the KL
    hidden_weight: float = 0.0  # hidden-state MSE (needs a layer map and the teacher in the loop)
    bf16_autocast: bool = False
    seed: int = 0
    max_grad_norm: float = 1.0


class KDStep(StrictModel):
    step: int
    loss: float
    seconds: float


def distill(student: torch.nn.Module, windows: torch.Tensor, *, config: KDConfig, teacher: torch.nn.Module | None = None,
            topk: tuple[torch.Tensor, torch.Tensor] | None = None, layer_map: Sequence[int] | None = None,
            on_step=None) -> list[KDStep]:
    """Train ``student`` in place for ``config.num_steps`` steps on seeded random batches of ``windows``.

    Exactly one of ``teacher`` (in the loop: full-vocabulary KL) or ``topk`` (values, indices aligned with
    ``windows``) supplies the targets. ``on_step(KDStep)`` is called after each step (for reporting and
    checkpoints). AdamW, linear warm-up then cosine decay.
    """
    if (teacher is None) == (topk is None):
        raise ValueError("give exactly one of teacher= (in the loop) or topk= (cached top-k logits)")
    if config.hidden_weight > 0 and (teacher is None or layer_map is None):
        raise ValueError("hidden_weight > 0 needs teacher= and layer_map=")
    g = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=config.lr,
                            weight_decay=config.weight_decay)

    def lr_at(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        frac = (step - config.warmup_steps) / max(1, config.num_steps - config.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    student.train()
    if teacher is not None:
        teacher.eval()
    history = []
    want_hidden = config.hidden_weight > 0
    for step in range(config.num_steps):
        t0 = time.perf_counter()
        rows = torch.randint(0, len(windows), (config.batch_size,), generator=g)
        ids = windows[rows]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16_autocast):
            with layer_outputs(student, enabled=want_hidden) as s_hidden:
                out = student(ids, use_cache=False)
            if teacher is not None:
                with torch.no_grad(), layer_outputs(teacher, enabled=want_hidden) as t_hidden:
                    tout = teacher(ids, use_cache=False)
                loss = kl_loss(out.logits, tout.logits, temperature=config.temperature)
                if want_hidden:
                    loss = loss + config.hidden_weight * hidden_loss(s_hidden, t_hidden, layer_map=layer_map)
            else:
                loss = topk_kl_loss(out.logits, topk[0][rows], topk[1][rows], temperature=config.temperature)
            if config.ce_weight > 0:
                logits = out.logits[:, :-1].float()
                loss = loss + config.ce_weight * F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), config.max_grad_norm)
        opt.step()
        sched.step()
        rec = KDStep(step=step, loss=loss.item(), seconds=time.perf_counter() - t0)
        history.append(rec)
        if on_step is not None:
            on_step(rec)
    student.eval()
    return history
