"""KD losses (KL, top-k KL, hidden states), the top-k cache round trip, and a few distillation steps."""

from __future__ import annotations

import pytest
import torch

from slimray.families.causal_lm import kd
from slimray.families.causal_lm.evaluate import perplexity


def test_kl_losses():
    torch.manual_seed(0)
    t = torch.randn(2, 5, 50)
    assert kd.kl_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(2, 5, 50)
    full = kd.kl_loss(s, t, temperature=2.0)
    assert full.item() > 0
    # with k = V the top-k loss is the full KL
    v, i = t.topk(50, dim=-1)
    assert kd.topk_kl_loss(s, v, i, temperature=2.0).item() == pytest.approx(full.item(), rel=1e-5)
    v8, i8 = t.topk(8, dim=-1)
    assert kd.topk_kl_loss(t, v8, i8).item() > 0  # truncation: not exactly zero even for the teacher itself
    h = [torch.randn(2, 5, 4) for _ in range(4)]
    assert kd.hidden_loss(h[:3], h, layer_map=[0, 1]).item() == pytest.approx(0.0)


def test_topk_cache_roundtrip(tiny_model, tiny_windows, tmp_path):
    v, i = kd.cache_teacher_topk(tiny_model, tiny_windows[:3], k=4)
    assert v.shape == (3, 32, 4) and v.dtype == torch.float16 and i.dtype == torch.int32
    kd.save_topk(tmp_path / "topk.safetensors", tiny_windows[:3], v, i)
    w2, v2, i2 = kd.load_topk(tmp_path / "topk.safetensors")
    assert torch.equal(w2, tiny_windows[:3]) and torch.equal(v2, v) and torch.equal(i2, i)


@pytest.mark.parametrize("mode", ["teacher", "topk", "hidden"])
def test_distill_brings_student_towards_teacher(tiny_model, tiny_windows, tiny_tokenizer, mode):
    from tests.families.causal_lm.conftest import make_model

    teacher = tiny_model
    student = make_model(tiny_tokenizer, num_layers=2, seed=1)  # a different random init: far from the teacher
    windows = tiny_windows[:8]
    tv, ti = kd.cache_teacher_topk(teacher, windows, k=64)

    def gap():
        with torch.no_grad():
            s, t = student(windows).logits, teacher(windows).logits
        return kd.topk_kl_loss(s, tv, ti).item() if mode == "topk" else kd.kl_loss(s, t).item()

    before = gap()
    cfg = kd.KDConfig(num_steps=30, batch_size=2, lr=3e-3, warmup_steps=2, hidden_weight=1.0 if mode == "hidden" else 0.0)
    seen = []
    if mode == "topk":
        hist = kd.distill(student, windows, config=cfg, topk=(tv, ti), on_step=seen.append)
    else:
        hist = kd.distill(student, windows, config=cfg, teacher=teacher, layer_map=[1, 3], on_step=seen.append)
    assert len(hist) == 30 and seen == hist and not student.training
    assert gap() < 0.85 * before
    assert perplexity(student, windows) > 1.0


def test_distill_needs_one_target(tiny_model, tiny_windows):
    with pytest.raises(ValueError, match="exactly one"):
        kd.distill(tiny_model, tiny_windows, config=kd.KDConfig(num_steps=1))
