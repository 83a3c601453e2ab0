"""A classifier teacher from a local Hugging Face folder (``teacher.source: huggingface``): the folder checks
name ``teacher.path``; the teacher answers like the HF model; a student derived from it by pruning is rebuilt
from its JSON record (config.json inside, no folder, no pickle) with the same outputs."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from slimray.config import PipelineConfig
from slimray.schema import ConfigError

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    cfg = transformers.ResNetConfig(num_channels=1, embedding_size=16, hidden_sizes=[16, 32], depths=[2, 2], layer_type="basic",
                                    num_labels=10, downsample_in_first_stage=False)
    torch.manual_seed(0)
    model = transformers.ResNetForImageClassification(cfg).eval()
    folder = tmp_path_factory.mktemp("hf") / "resnet"
    model.save_pretrained(folder)
    return folder, model


def _cfg(path) -> PipelineConfig:
    return PipelineConfig.model_validate({
        "name": "hf", "data": {"name": "digits"}, "teacher": {"source": "huggingface", "path": str(path)},
        "distill": {"derive": {"keep": 0.5}},
    })


def test_the_folder_teacher_answers_like_the_hf_model(hf_folder):
    from slimray.families.classifier.teachers import load_user_teacher

    folder, hf = hf_folder
    teacher = load_user_teacher(_cfg(folder))
    x = torch.randn(4, 1, 8, 8)
    with torch.inference_mode():
        assert torch.allclose(teacher(x), hf(pixel_values=x).logits, atol=1e-6)


def test_a_derived_student_is_rebuilt_from_its_json_record(hf_folder):
    from slimray.compress.prune import prune_to_fraction
    from slimray.families.classifier.spec import ModuleSpec, build_model, count_params, spec_from_model
    from slimray.families.classifier.teachers import load_user_teacher

    folder, _ = hf_folder
    cfg = _cfg(folder)
    teacher = load_user_teacher(cfg)
    x = torch.randn(8, 1, 8, 8)
    student, width = prune_to_fraction(copy.deepcopy(teacher).train(), keep=0.5, by="params", importance="l1", round_to=None,
                                       example_inputs=x[:1], gradient_batches=None)
    assert count_params(student) < 0.6 * count_params(teacher) and abs(width["kept_fraction"] - 0.5) < 0.05
    spec = ModuleSpec.model_validate_json(spec_from_model(student.eval(), cfg.teacher.module_spec()).model_dump_json())
    assert spec.kwargs["config"]["model_type"] == "resnet" and spec.resized_modules
    rebuilt = build_model(spec)
    rebuilt.load_state_dict(student.state_dict())
    with torch.inference_mode():
        assert torch.allclose(rebuilt.eval()(x), student(x), atol=1e-6)


@pytest.mark.parametrize("case, match", [
    ("hub_id", "teacher.path 'microsoft/resnet-50' is not a folder; slimray loads no model from a hub"),
    ("no_config", "teacher.path .* has no config.json"),
    ("remote_code", "teacher.path .* asks for remote code"),
    ("not_image", "teacher.path .* model_type 'bert'; the classifier family"),
    ("pickle_only", "teacher.path .* lacks model.safetensors \\(pytorch_model.bin is a pickle"),
])
def test_bad_folders_fail_before_ray_naming_teacher_path(hf_folder, tmp_path, case, match):
    from slimray.families.classifier.recipe import ClassifierRecipe

    folder, _ = hf_folder
    bad = tmp_path / "bad"
    bad.mkdir()
    conf = json.loads((folder / "config.json").read_text())
    if case == "hub_id":
        bad = "microsoft/resnet-50"
    elif case == "remote_code":
        (bad / "config.json").write_text(json.dumps({**conf, "auto_map": {"AutoModel": "x.Y"}}))
    elif case == "not_image":
        (bad / "config.json").write_text(json.dumps({"model_type": "bert"}))
    elif case == "pickle_only":
        (bad / "config.json").write_text(json.dumps(conf))
        (bad / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match=match):
        ClassifierRecipe().check(_cfg(bad))


def test_source_fields_are_checked_at_load():
    with pytest.raises(ConfigError, match="teacher.source 'huggingface' needs teacher.path"):
        PipelineConfig.from_dict({"name": "x", "data": {"name": "digits"}, "teacher": {"source": "huggingface"}, "distill": {}})
    with pytest.raises(ConfigError, match="teacher.path is only for source: huggingface"):
        PipelineConfig.from_dict({"name": "x", "data": {"name": "digits"}, "teacher": {"source": "ccexam_mnist", "path": "x"}, "distill": {}})
