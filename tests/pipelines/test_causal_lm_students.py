"""The causal_lm pipeline's student stage on a tiny local teacher (no Ray): depth x width students, each depth cut
by measured layer importance, each width cut shrinking the tensors and the config, the teacher left untouched."""

from __future__ import annotations

import torch

from tests.families.causal_lm.conftest import make_model, make_tokenizer


def test_derive_students_depth_times_width(tmp_path):
    from slimray.families.causal_lm.config import LMPipelineConfig
    from slimray.pipelines.causal_lm import CausalLMStages

    tok = make_tokenizer()
    teacher = make_model(tok)
    folder = tmp_path / "teacher"
    teacher.save_pretrained(folder)
    tok.save_pretrained(folder)
    cfg = LMPipelineConfig.from_dict({"family": "causal_lm", "teacher": {"source": "huggingface", "path": str(folder)},
                                      "student": {"depths": [4, 2], "num_importance_windows": 2,
                                                  "widths": [{}, {"num_kv_heads": 1, "intermediate_size": 0.375}]}})
    stages = CausalLMStages(cfg)
    stages.open(tmp_path / "run", 0.0)
    (tmp_path / "run").mkdir()
    stages.teacher, stages.tokenizer = teacher, tok
    stages.val_windows = torch.randint(3, len(tok), (2, 16), generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    stages.derive_students()

    plans = {s.name: s for s in stages.students}
    assert list(plans) == ["student4-kv1-ff48", "student2", "student2-kv1-ff48"]
    full_width, narrow = plans["student2"], plans["student2-kv1-ff48"]
    assert full_width.kept == narrow.kept and len(full_width.kept) == 2  # one depth cut, by importance, for both widths
    assert full_width.kept == sorted(sorted(range(4), key=lambda i: -stages.importance[i])[:2])
    assert plans["student4-kv1-ff48"].kept == [0, 1, 2, 3]
    for s in (plans["student4-kv1-ff48"], narrow):
        c = s.model.config
        assert (c.num_key_value_heads, c.num_attention_heads, c.intermediate_size) == (1, 2, 48)
        layer = s.model.model.layers[0]
        assert layer.mlp.up_proj.weight.shape == (48, 64) and layer.self_attn.k_proj.weight.shape == (16, 64)
        assert s.width["num_kv_heads_after"] == 1 and s.width["intermediate_size_after"] == 48
        with torch.inference_mode():
            assert s.model(stages.val_windows).logits.shape == (2, 16, len(tok))
    assert full_width.width is None and full_width.model.config.num_hidden_layers == 2
    assert full_width.model.model.layers[0].mlp.up_proj.weight.shape == (128, 64)
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())  # the teacher is never cut in place
    assert teacher.config.num_hidden_layers == 4 and teacher.config.intermediate_size == 128
