"""Deriving the classifier's student from its teacher, pure torch: drop the repeated blocks whose removal moves the
output least, then prune structurally to ``distill.derive.keep`` of the teacher's size (torch-pruning)."""

from __future__ import annotations

import copy
from typing import Any

import torch

from slimray.compress.prune import prune_to_fraction
from slimray.families.classifier.usermodule import block_importance, drop_modules, repeated_blocks
from slimray.schema import ConfigError


def choose_blocks(model: torch.nn.Module, x: torch.Tensor, *, num_drop: int) -> tuple[list[str], list[str], dict[str, float]]:
    """(dropped, kept, importance) of the model's repeated blocks: the ``num_drop`` whose removal alone moves
    the output least (KL on ``x``) are dropped. Fails when the model has too few droppable blocks."""
    names = repeated_blocks(model, x[:2])
    if len(names) <= num_drop:
        raise ConfigError(
            f"distill.derive.drop_blocks {num_drop}: the teacher has {len(names)} repeated shape-preserving blocks "
            f"({names or 'none'}); at least one must stay"
        )
    importance = block_importance(model, names, x)
    dropped = sorted(names, key=importance.get)[:num_drop]
    return sorted(dropped), [n for n in names if n not in dropped], importance


def derive(teacher: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, dv: Any) -> tuple[torch.nn.Module, dict[str, Any], str]:
    """(the derived student in eval mode, what was done as metadata, a one-line note) from ``teacher`` on examples
    ``x``/``y`` (block importance, taylor gradients) and the ``distill.derive`` section ``dv``; ``teacher`` is untouched."""
    grads = [(x[i * 64 : (i + 1) * 64], y[i * 64 : (i + 1) * 64]) for i in range(min(8, max(1, len(x) // 64)))]
    student = copy.deepcopy(teacher)
    info: dict[str, Any] = {}
    notes = []
    if dv.drop_blocks:
        dropped, kept, importance = choose_blocks(student, x[:256], num_drop=dv.drop_blocks)
        drop_modules(student, dropped)
        info.update(dropped_blocks=dropped, kept_blocks=kept, block_importance=importance)
        notes.append(f"dropped blocks {dropped} (kept {kept})")
    if dv.keep < 1.0:
        student, width = prune_to_fraction(
            student.train(), keep=dv.keep, by=dv.by, importance=dv.importance, round_to=dv.round_to,
            example_inputs=x[:1], gradient_batches=grads if dv.importance == "taylor" else None,
        )
        info.update(width)
        notes.append(f"pruned to {100 * width['kept_fraction']:.1f}% of its {dv.by} (channel ratio {width['channel_ratio']:.3f}, {dv.importance})")
    return student.eval(), info, "teacher " + "; ".join(notes)
