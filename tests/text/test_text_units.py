"""The text pipeline's pure parts: config validation, the by-article split, pruning that really removes heads
and FFN neurons, artifacts that reload to the same embeddings (float and int8), the quality metrics, and
the boundary that keeps ray out of the pure-torch text modules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from slimray.schema import ConfigError
from slimray.text.config import TextPipelineConfig, load_text_config
from slimray.text.evaluate import cosine_to_teacher, neighbour_recall, probe_accuracy

PURE = ("data", "models", "compress", "evaluate", "kd", "config")
TEXT_PKG = Path(__file__).resolve().parents[2] / "src" / "slimray" / "text"


def test_recipes_load():
    cfg = load_text_config(recipe="minilm")
    assert cfg.kind == "text" and cfg.name == "minilm"
    assert max(cfg.search.seq_lens) <= cfg.model.max_seq_len
    assert load_text_config(recipe="minilm-tiny").kind == "text"


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"kind": "image"}, "kind"),
        ({"distill": {"epochs": 0}}, "distill.epochs"),
        ({"search": {"quantizations": ["int4"]}}, "search.quantizations.0"),
        ({"model": {"student_layers": [3, 1]}}, "model.student_layers"),
        ({"modle": {}}, "modle"),
    ],
)
def test_bad_config_names_the_field(patch, field):
    data = {"kind": "text", **patch}
    with pytest.raises(ConfigError) as err:
        TextPipelineConfig.from_dict(data, source="t.yaml")
    assert field in str(err.value)


def test_seq_lens_cannot_exceed_max_seq_len():
    with pytest.raises(ConfigError, match="seq_lens"):
        TextPipelineConfig.from_dict({"kind": "text", "model": {"max_seq_len": 32}, "search": {"seq_lens": [64]}})


def test_split_is_by_article():
    from slimray.text.data import split_by_article, topic_names

    train, held = split_by_article(heldout_fraction=0.2, seed=0, max_train=None, max_heldout=None)
    assert not set(train.articles) & set(held.articles)
    assert set(held.labels) == set(range(len(topic_names()))) == set(train.labels)
    assert all(len(t.split()) >= 5 for t in held.texts[:200])


def test_metrics_on_known_embeddings():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(50, 8)).astype(np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    assert cosine_to_teacher(e, e) == pytest.approx(1.0, abs=1e-6)
    assert neighbour_recall(e, e, k=5) == pytest.approx(1.0)
    shuffled = e[rng.permutation(len(e))]
    assert neighbour_recall(shuffled, e, k=5) < 0.5
    labels = (e[:, 0] > 0).astype(int)
    assert probe_accuracy(e, labels, e, labels, c=10.0) > 90.0


def test_pure_text_modules_do_not_import_ray():
    offenders = []
    for name in PURE:
        for node in ast.walk(ast.parse((TEXT_PKG / f"{name}.py").read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            offenders += [f"{name}: {n}" for n in names if n == "ray" or n.startswith("ray.")]
    assert offenders == []
    code = "import sys, " + ", ".join(f"slimray.text.{n}" for n in PURE) + "; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.fixture(scope="module")
def small_student():
    from slimray.text.models import load_teacher, load_tokenizer, teacher_dir, truncated

    teacher = load_teacher()
    return truncated(teacher, [0, 5]), load_tokenizer(teacher_dir(), max_seq_len=32)


SENTENCES = ["Shares in the firm rose sharply after the results.", "The striker scored twice in the second half.",
             "Ministers will publish the bill next week.", "The new phone has a faster chip and a bigger screen."]


def test_pruning_really_removes_heads_and_neurons(small_student):
    import copy

    from slimray.text.compress import count_params, prune_heads_ffn
    from slimray.text.models import encode_batch, layer_widths, tokenize

    model, tok = small_student
    heads, ffn = layer_widths(model)
    ids, mask = tokenize(tok, SENTENCES, max_seq_len=32)
    pruned = prune_heads_ffn(copy.deepcopy(model), ratio=0.5, example_inputs={"input_ids": ids, "attention_mask": mask})
    p_heads, p_ffn = layer_widths(pruned)
    assert all(p == h // 2 for p, h in zip(p_heads, heads)) and all(p == f // 2 for p, f in zip(p_ffn, ffn))
    assert count_params(pruned) < count_params(model)
    att = pruned.encoder.layer[0].attention.self
    assert att.num_attention_heads == p_heads[0] and att.all_head_size == p_heads[0] * att.attention_head_size
    emb = encode_batch(pruned, ids, mask)
    assert emb.shape == (len(SENTENCES), model.config.hidden_size) and torch.isfinite(emb).all()


@pytest.mark.parametrize("quant", ["none", "dynamic_int8"])
def test_artifact_round_trip(small_student, tmp_path, quant):
    import copy
    import json

    from slimray.text.compress import prune_heads_ffn
    from slimray.text.models import (encode_batch, load_text_artifact, quantize_text, save_text_artifact, spec_for,
                                     teacher_config, teacher_dir, tokenize)

    model, tok = small_student
    ids, mask = tokenize(tok, SENTENCES, max_seq_len=32)
    pruned = prune_heads_ffn(copy.deepcopy(model), ratio=0.25, example_inputs={"input_ids": ids, "attention_mask": mask})
    with torch.no_grad():  # the artifact stores the word embeddings as float16: round them first to compare exactly
        w = pruned.embeddings.word_embeddings.weight
        w.copy_(w.half().float())
    q = quantize_text(pruned, quant)
    spec = spec_for(pruned, name="t", base_config=teacher_config(), quantization=quant, max_seq_len=32, embedding_storage="float16")
    save_text_artifact(tmp_path / "m", q, spec, tokenizer_dir=teacher_dir())
    assert {"model.safetensors", "spec.json", "tokenizer.json"} <= {p.name for p in (tmp_path / "m").iterdir()}
    assert json.loads((tmp_path / "m" / "spec.json").read_text())["heads_per_layer"] == spec.heads_per_layer
    loaded, lspec = load_text_artifact(tmp_path / "m")
    assert lspec.quantization == quant
    a, b = encode_batch(q, ids, mask), encode_batch(loaded, ids, mask)
    assert torch.allclose(a, b, atol=1e-5)


def test_cli_entry_recognises_text_documents(tmp_path):
    from slimray.text.entry import maybe_text_config

    cfg = maybe_text_config(recipe="minilm", name="other", port=8123)
    assert cfg is not None and cfg.name == "other" and cfg.serve.port == 8123
    assert maybe_text_config(recipe="digits") is None
    other = tmp_path / "x.yaml"
    other.write_text("name: x\ndata: {name: digits}\n")
    assert maybe_text_config(config=other) is None
