"""The causal_lm family's student plans on a tiny local teacher (no Ray): depth x width students, each depth cut
by measured layer importance, each width cut shrinking the tensors and the config, the teacher left untouched."""

from __future__ import annotations

import torch

from tests.families.causal_lm.conftest import make_model, make_tokenizer


def test_derive_students_depth_times_width(tmp_path):
    from slimray.families.causal_lm.config import LMPipelineConfig
    from slimray.families.causal_lm.recipe import CausalLMRecipe, LMData

    tok = make_tokenizer()
    teacher = make_model(tok)
    folder = tmp_path / "teacher"
    teacher.save_pretrained(folder)
    tok.save_pretrained(folder)
    cfg = LMPipelineConfig.from_dict({"family": "causal_lm", "teacher": {"source": "huggingface", "path": str(folder)},
                                      "student": {"depths": [4, 2], "num_importance_windows": 2,
                                                  "widths": [{}, {"num_kv_heads": 1, "intermediate_size": 0.375}]}})
    recipe = CausalLMRecipe()
    (tmp_path / "run").mkdir()
    recipe._run_dir = tmp_path / "run"
    val = torch.randint(3, len(tok), (2, 16), generator=torch.Generator().manual_seed(0))
    recipe._data = LMData(teacher_dir=str(folder), run_dir=str(tmp_path / "run"), eval_windows=val, val_windows=val, train_windows=None,
                          teacher_argmax=val, info={}, search={})
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    plans = {p.name: p for p in recipe.plan_students(cfg, teacher)}

    assert list(plans) == ["student4-kv1-ff48", "student2", "student2-kv1-ff48"]
    full_width, narrow = plans["student2"], plans["student2-kv1-ff48"]
    kept = full_width.spec["kept_layers"]
    assert narrow.spec["kept_layers"] == kept and len(kept) == 2  # one depth cut, by importance, for both widths
    assert kept == sorted(sorted(range(4), key=lambda i: -recipe.importance[i])[:2])
    assert plans["student4-kv1-ff48"].spec["kept_layers"] == [0, 1, 2, 3]
    models = {name: recipe._cut[name] for name in plans}  # the pruned, untrained students (init_state's weights)
    for name in ("student4-kv1-ff48", "student2-kv1-ff48"):
        m, spec = models[name], plans[name].spec
        c = m.config
        assert (c.num_key_value_heads, c.num_attention_heads, c.intermediate_size) == (1, 2, 48)
        assert spec["hf_config"]["intermediate_size"] == 48 and spec["hf_config"]["num_key_value_heads"] == 1
        layer = m.model.layers[0]
        assert layer.mlp.up_proj.weight.shape == (48, 64) and layer.self_attn.k_proj.weight.shape == (16, 64)
        assert spec["width"]["num_kv_heads_after"] == 1 and spec["width"]["intermediate_size_after"] == 48
        with torch.inference_mode():
            assert m(val).logits.shape == (2, 16, len(tok))
    assert full_width.spec["width"] is None and models["student2"].config.num_hidden_layers == 2
    assert models["student2"].model.layers[0].mlp.up_proj.weight.shape == (128, 64)
    state = recipe.init_state(cfg, full_width, teacher)
    assert "student2" not in recipe._cut and state["model.layers.0.mlp.up_proj.weight"].shape == (128, 64)
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())  # the teacher is never cut in place
    assert teacher.config.num_hidden_layers == 4 and teacher.config.intermediate_size == 128

    # a rerun where one student of a depth is distilled already: the other is still cut from that depth, not the teacher
    from slimray.families.causal_lm.artifacts import META_FILE, LMArtifactMeta

    done = tmp_path / "run" / "students" / "student2"
    done.mkdir(parents=True)
    (done / META_FILE).write_text(LMArtifactMeta(reports={"distill": {"kept_layers": kept, "width": None}}).model_dump_json())
    again = CausalLMRecipe()
    again._run_dir, again._data = recipe._run_dir, recipe._data
    plans = {p.name: p for p in again.plan_students(cfg, teacher)}
    assert "student2" not in again._cut and plans["student2"].spec["kept_layers"] == kept
    assert again._cut["student2-kv1-ff48"].config.num_hidden_layers == 2
