"""The causal_lm pipeline config: recipes load through the family registry; bad documents name the field."""

from __future__ import annotations

import pytest

from slimray.families.causal_lm.config import LMPipelineConfig, load_lm_config
from slimray.schema import ConfigError


def test_recipes_load_through_the_registry():
    from slimray.runconfig import load_run_config

    for recipe in ("smollm", "smollm-tiny"):
        family, cfg = load_run_config(recipe=recipe)
        assert family.name == "causal_lm" and isinstance(cfg, LMPipelineConfig) and cfg.recipe == recipe
    cfg = load_lm_config(recipe="smollm")
    assert cfg.search.ppl_budget == 1.15 and cfg.student.layer_counts(30) == [27]
    assert cfg.distill.num_train_windows() == 30 * 2 * 2
    assert cfg.distill.targets == "teacher_in_loop" and cfg.distill.hidden_weight == 1.0


@pytest.mark.parametrize(("patch", "field"), [
    ({"teacher": {"source": "huggingface"}}, "teacher"),
    ({"teacher": {"path": "/x"}}, "teacher"),
    ({"teacher": {"source": "huggingface", "path": "/no/such/folder"}}, "teacher.path"),
    ({"data": {"source": "jsonl"}}, "data.path"),
    ({"data": {"windw_len": 64}}, "data.windw_len"),
    ({"data": {"window_len": 4}}, "data.window_len"),
    ({"student": {"depths": [0]}}, "student.depths"),
    ({"student": {"depths": [1.5]}}, "student.depths"),
    ({"student": {"depths": [30]}}, "student.depths"),
    ({"student": {"depths": [31], "widths": [{"num_kv_heads": 1}]}}, "student.depths"),
    ({"student": {"widths": []}}, "student.widths"),
    ({"student": {"widths": [{}, {"num_kv_heads": 4}]}}, "student.widths.1.num_kv_heads"),
    ({"student": {"widths": [{"intermediate_size": 2048}]}}, "student.widths.0.intermediate_size"),
    ({"student": {"widths": [{"intermediate_size": 1.5}]}}, "student.widths.0.intermediate_size"),
    ({"student": {"widths": [{"heads": 1}]}}, "student.widths.0.heads"),
    ({"student": {"num_kv_heads": 1}}, "student.num_kv_heads"),
    ({"distill": {"num_steps": 1, "epochs": 2}}, "distill.num_steps"),
    ({"distill": {"targets": "logits_on_disk"}}, "distill.targets"),
    ({"distill": {"hidden_weight": 0.5}}, "distill.hidden_weight"),
    ({"distill": {"targets": "topk_cache", "hidden_weight": 0.5}}, "distill.hidden_weight"),
    ({"distill": {"targets": "teacher_in_loop", "hidden_weight": -1}}, "distill.hidden_weight"),
    ({"search": {"quant_methods": ["int3"]}}, "search.quant_methods"),
    ({"search": {"runtimes": ["tensorrt"]}}, "search.runtimes"),
    ({"search": {"ppl_budget": 0.9}}, "search.ppl_budget"),
    ({"search": {"num_timing_rounds": 3}}, "search.num_rounds"),  # renamed: the error names the new field
    ({"search": {"tie_margin": 0.05}}, "search.noise_margin"),
    ({"serve": {"port": 0}}, "serve.port"),
])
def test_errors_name_the_field(patch, field):
    doc = {"family": "causal_lm", **patch}
    with pytest.raises(ConfigError) as err:
        LMPipelineConfig.from_dict(doc, source="t.yaml")
    assert field in str(err.value), str(err.value)


def test_family_is_required():
    with pytest.raises(ConfigError, match="family"):
        LMPipelineConfig.from_dict({}, source="t.yaml")


def test_config_file_paths_are_relative_to_it(tmp_path, tiny_folder):
    (tmp_path / "texts.jsonl").write_text('{"text": "hello world"}\n')
    import shutil

    shutil.copytree(tiny_folder, tmp_path / "teacher")
    f = tmp_path / "run.yaml"
    f.write_text("family: causal_lm\nname: mine\nteacher: {source: huggingface, path: teacher}\n"
                 "data: {source: jsonl, path: texts.jsonl}\nstudent: {depths: [2]}\n")
    cfg = load_lm_config(config=f)
    assert cfg.teacher.path == str(tmp_path / "teacher") and cfg.data.path == str(tmp_path / "texts.jsonl")
    assert cfg.teacher.num_layers() == 4
    f.write_text("family: causal_lm\nteacher: {source: huggingface, path: teacher}\nstudent: {depths: [4]}\n")
    with pytest.raises(ConfigError, match="student.depths"):
        load_lm_config(config=f)


def test_students_are_depths_times_widths():
    """Every depth with every width, named by both; all the teacher's layers only with a width cut (else it would be
    the teacher itself); a fraction of the MLP resolves against the teacher's neurons."""
    cfg = LMPipelineConfig.from_dict({"family": "causal_lm", "student": {
        "depths": [30, 0.5], "widths": [{}, {"num_kv_heads": 1, "intermediate_size": 0.5}, {"intermediate_size": 1024}]}})
    plans = cfg.student.plans(num_layers=30, intermediate_size=1536)
    assert [(name, count) for name, count, _ in plans] == [
        ("student30-kv1-ff768", 30), ("student30-ff1024", 30),
        ("student15", 15), ("student15-kv1-ff768", 15), ("student15-ff1024", 15)]
    assert LMPipelineConfig.from_dict({"family": "causal_lm"}).student.plans(num_layers=30, intermediate_size=1536) == [
        ("student27", 27, cfg.student.widths[0])]


def test_teacher_in_loop_with_hidden_loss_round_trips():
    import yaml

    doc = {"family": "causal_lm", "distill": {"targets": "teacher_in_loop", "hidden_weight": 0.5}}
    cfg = LMPipelineConfig.from_dict(doc, source="t.yaml")
    assert cfg.distill.targets == "teacher_in_loop" and cfg.distill.hidden_weight == 0.5
    again = LMPipelineConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json"))), source="again.yaml")
    assert again == cfg
    assert LMPipelineConfig.from_dict({"family": "causal_lm"}, source="t.yaml").distill.targets == "topk_cache"


def test_search_section_is_the_shared_one_with_the_lms_defaults():
    from slimray.configbase import SearchBase

    s = load_lm_config(recipe="smollm").search
    assert isinstance(s, SearchBase) and s.include_teacher and s.use_tune
    assert (s.num_rounds, s.max_rounds, s.noise_margin, s.num_finalists) == (2, 4, 0.03, 2)  # the recipe's rounds
