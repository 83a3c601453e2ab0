"""A sentence encoder of the user's own: a local Hugging Face folder by path (no hub, no remote code, no pickle)
and sentences from a JSON Lines file; bad input fails at config load naming the field and the file."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from slimray.schema import ConfigError
from slimray.families.sentence_encoder.config import load_text_config
from slimray.families.sentence_encoder.data import split_jsonl
from slimray.families.sentence_encoder.models import teacher_dir


def _write(tmp_path, model: dict, data: dict | None = None):
    doc = {"family": "sentence_encoder", "name": "enc", "model": model}
    if data is not None:
        doc["data"] = data
    path = tmp_path / "enc.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _folder(tmp_path, *, config_update: dict | None = None, drop: tuple[str, ...] = ()):
    src = teacher_dir()
    dst = tmp_path / "encoder"
    dst.mkdir()
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        if name not in drop:
            shutil.copyfile(src / name, dst / name)
    if config_update:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config_update)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_the_wheel_folder_by_relative_path_loads(tmp_path):
    folder = _folder(tmp_path)
    cfg = load_text_config(config=_write(tmp_path, {"source": "huggingface", "path": "encoder", "student_layers": [0, 5]}))
    assert cfg.model.path == str(folder.resolve())


@pytest.mark.parametrize(
    ("setup", "needle"),
    [
        ("hub_name", "not a folder; slimray loads no model from a hub"),
        ("no_config", "has no config.json"),
        ("remote_code", "asks for remote code"),
        ("not_bert", "model_type 'gpt2'"),
        ("pickle_only", "pytorch_model.bin is a pickle"),
        ("too_few_layers", "the teacher has 6 layers"),
    ],
)
def test_bad_hf_folders_fail_at_load_naming_the_field(tmp_path, setup, needle):
    model = {"source": "huggingface", "path": "encoder"}
    if setup == "hub_name":
        model["path"] = "sentence-transformers/all-MiniLM-L6-v2"
    elif setup == "no_config":
        _folder(tmp_path, drop=("config.json",))
    elif setup == "remote_code":
        _folder(tmp_path, config_update={"auto_map": {"AutoModel": "modeling.MyModel"}})
    elif setup == "not_bert":
        _folder(tmp_path, config_update={"model_type": "gpt2"})
    elif setup == "pickle_only":
        _folder(tmp_path, drop=("model.safetensors",))
    else:
        _folder(tmp_path)
        model["student_layers"] = [0, 6]
    with pytest.raises(ConfigError) as err:
        load_text_config(config=_write(tmp_path, model))
    assert "model" in str(err.value) and needle in str(err.value)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_splits_by_group_and_keeps_groups_whole(tmp_path):
    rows = [{"text": f"sentence number {i} of doc {i // 5}", "label": "ab"[i % 2], "doc": i // 5} for i in range(400)]
    train, held, names = split_jsonl(_jsonl(tmp_path / "s.jsonl", rows), text_field="text", label_field="label", group_field="doc",
                                     heldout_fraction=0.25, seed=0, max_train=None, max_heldout=None)
    assert names == ["a", "b"] and len(train.texts) + len(held.texts) == 400
    assert not set(train.articles) & set(held.articles)
    assert 0.1 < len(held.texts) / 400 < 0.4


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("{not json", "line 2: not JSON"),
        ('{"text": "a b c", "lab": 1}', "data.label_field: no field 'label'"),
        ('{"text": 5, "label": 1}', "data.text_field: 'text' is not a string"),
    ],
)
def test_bad_jsonl_lines_name_the_file_and_line(tmp_path, line, needle):
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"text": "fine sentence here", "label": 0}) + "\n" + line + "\n")
    with pytest.raises(ValueError) as err:
        split_jsonl(path, text_field="text", label_field="label", group_field=None, heldout_fraction=0.2, seed=0, max_train=None, max_heldout=None)
    assert needle in str(err.value) and str(path) in str(err.value)


def test_jsonl_source_needs_a_path(tmp_path):
    with pytest.raises(ConfigError, match="needs data.path"):
        load_text_config(config=_write(tmp_path, {"source": "builtin"}, {"source": "jsonl"}))
