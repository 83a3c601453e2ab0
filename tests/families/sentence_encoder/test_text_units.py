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
from slimray.families.sentence_encoder.config import TextPipelineConfig, load_text_config
from slimray.families.sentence_encoder.evaluate import cosine_to_teacher, neighbour_recall, probe_accuracy

PURE = ("data", "models", "compress", "evaluate", "kd", "config")
TEXT_PKG = Path(__file__).resolve().parents[3] / "src" / "slimray" / "families" / "sentence_encoder"


def test_recipes_load():
    cfg = load_text_config(recipe="minilm")
    assert cfg.family == "sentence_encoder" and cfg.name == "minilm"
    assert max(cfg.search.seq_lens) <= cfg.model.max_seq_len
    assert load_text_config(recipe="minilm-tiny").family == "sentence_encoder"


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"family": "image"}, "family"),
        ({"distill": {"epochs": 0}}, "distill.epochs"),
        ({"search": {"quantizations": ["int4"]}}, "search.quantizations.0"),
        ({"model": {"student_layers": [3, 1]}}, "model.student_layers"),
        ({"modle": {}}, "modle"),
    ],
)
def test_bad_config_names_the_field(patch, field):
    data = {"family": "sentence_encoder", **patch}
    with pytest.raises(ConfigError) as err:
        TextPipelineConfig.from_dict(data, source="t.yaml")
    assert field in str(err.value)


def test_seq_lens_cannot_exceed_max_seq_len():
    with pytest.raises(ConfigError, match="seq_lens"):
        TextPipelineConfig.from_dict({"family": "sentence_encoder", "model": {"max_seq_len": 32}, "search": {"seq_lens": [64]}})


def test_split_is_by_article():
    from slimray.families.sentence_encoder.data import split_by_article, topic_names

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
    code = "import sys, " + ", ".join(f"slimray.families.sentence_encoder.{n}" for n in PURE) + "; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.fixture(scope="module")
def small_student():
    from slimray.families.sentence_encoder.models import load_teacher, load_tokenizer, teacher_dir, truncated

    teacher = load_teacher()
    return truncated(teacher, [0, 5]), load_tokenizer(teacher_dir(), max_seq_len=32)


SENTENCES = ["Shares in the firm rose sharply after the results.", "The striker scored twice in the second half.",
             "Ministers will publish the bill next week.", "The new phone has a faster chip and a bigger screen."]


def test_pruning_really_removes_heads_and_neurons(small_student):
    import copy

    from slimray.families.sentence_encoder.compress import count_params, prune_heads_ffn
    from slimray.families.sentence_encoder.models import encode_batch, layer_widths, tokenize

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


@pytest.mark.parametrize("quant, storage", [("none", "float16"), ("dynamic_int8", "float16"), ("none", "int8"), ("bf16", "int8")])
def test_artifact_round_trip(small_student, tmp_path, quant, storage):
    import copy
    import json

    from slimray.families.sentence_encoder.compress import prune_heads_ffn
    from slimray.families.sentence_encoder.models import (artifact_bytes, encode_batch, load_text_artifact, quantize_text, save_text_artifact,
                                     spec_for, teacher_config, teacher_dir, tokenize)

    model, tok = small_student
    ids, mask = tokenize(tok, SENTENCES, max_seq_len=32)
    pruned = prune_heads_ffn(copy.deepcopy(model), ratio=0.25, example_inputs={"input_ids": ids, "attention_mask": mask})
    with torch.no_grad():  # round the word embeddings as the artifact stores them, to compare exactly
        w = pruned.embeddings.word_embeddings.weight
        if storage == "float16":
            w.copy_(w.half().float())
        else:
            scale = (w.abs().amax(1, keepdim=True) / 127).clamp(min=1e-12)
            w.copy_((w / scale).round().clamp(-128, 127) * scale)
    q = quantize_text(pruned, quant)
    spec = spec_for(pruned, name="t", base_config=teacher_config(), quantization=quant, max_seq_len=32, embedding_storage=storage)
    saved = save_text_artifact(tmp_path / "m", q, spec, tokenizer_dir=teacher_dir())
    assert {"model.safetensors", "spec.json", "tokenizer.json"} <= {p.name for p in (tmp_path / "m").iterdir()}
    on_disk = json.loads((tmp_path / "m" / "spec.json").read_text())
    assert on_disk["heads_per_layer"] == spec.heads_per_layer
    assert (on_disk["int8_storage"] != []) == (storage == "int8") and on_disk["int8_storage"] == saved.int8_storage
    loaded, lspec = load_text_artifact(tmp_path / "m")
    assert lspec.quantization == quant
    a, b = encode_batch(q, ids, mask), encode_batch(loaded, ids, mask)
    assert torch.allclose(a, b, atol=1e-5 if quant != "bf16" else 1e-2)
    if storage == "int8":  # the table takes a quarter of its fp32 bytes (+ one scale per row)
        table = pruned.embeddings.word_embeddings.weight
        fp16_dir = tmp_path / "fp16"
        save_text_artifact(fp16_dir, q, spec.model_copy(update={"embedding_storage": "float16"}), tokenizer_dir=teacher_dir())
        saved_bytes = artifact_bytes(fp16_dir) - artifact_bytes(tmp_path / "m")
        assert saved_bytes >= 0.95 * table.numel() * (2 - 1) - 8 * table.shape[0]


def test_torchao_artifact_stores_int8_weights_and_reloads_deterministically(small_student, tmp_path):
    """torchao int8 is applied at load (its tensor subclasses cannot go into safetensors): the artifact holds int8
    Linear weights + per-channel scales, so it is smaller than the fp32 one, and two loads give the same outputs,
    close to the float model's."""
    from slimray.families.sentence_encoder.models import (artifact_bytes, encode_batch, load_text_artifact, save_text_artifact, spec_for,
                                     teacher_config, teacher_dir, tokenize)

    model, tok = small_student
    ids, mask = tokenize(tok, SENTENCES, max_seq_len=32)
    base = spec_for(model, name="t", base_config=teacher_config(), max_seq_len=32, embedding_storage="int8")
    save_text_artifact(tmp_path / "fp32", model, base, tokenizer_dir=teacher_dir())
    spec = save_text_artifact(tmp_path / "ao", model, base.model_copy(update={"quantization": "torchao_int8_dynamic"}),
                              tokenizer_dir=teacher_dir())
    linear = [k for k in spec.int8_storage if k.startswith("encoder.")]
    assert len(linear) == 6 * len(model.encoder.layer)  # q, k, v, attention output, FFN in, FFN out
    n_linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert artifact_bytes(tmp_path / "fp32") - artifact_bytes(tmp_path / "ao") >= 0.95 * 3 * n_linear
    first, lspec = load_text_artifact(tmp_path / "ao", compile=False)
    second, _ = load_text_artifact(tmp_path / "ao", compile=False)
    assert lspec.quantization == "torchao_int8_dynamic"
    a, b = encode_batch(first, ids, mask), encode_batch(second, ids, mask)
    assert torch.equal(a, b)
    ref = encode_batch(model, ids, mask)
    assert float((a * ref).sum(-1).min()) > 0.99
    with pytest.raises(TypeError, match="float model"):
        save_text_artifact(tmp_path / "bad", first, lspec, tokenizer_dir=teacher_dir())


@pytest.mark.slow
@pytest.mark.long  # 45 s of torch.compile
def test_compiled_torchao_model_answers_like_the_eager_one(small_student, tmp_path):
    """The path the winner runs in: torchao int8 under torch.compile (dynamic shapes: batch sizes and lengths vary)."""
    from slimray.families.sentence_encoder.models import encode_batch, load_text_artifact, save_text_artifact, spec_for, teacher_config, teacher_dir, tokenize

    model, tok = small_student
    spec = spec_for(model, name="t", base_config=teacher_config(), max_seq_len=32, quantization="torchao_int8_dynamic")
    save_text_artifact(tmp_path / "ao", model, spec, tokenizer_dir=teacher_dir())
    eager, _ = load_text_artifact(tmp_path / "ao", compile=False)
    compiled, _ = load_text_artifact(tmp_path / "ao")
    for texts in (SENTENCES, SENTENCES[:1], SENTENCES[1:3]):
        ids, mask = tokenize(tok, texts, max_seq_len=32)
        a, b = encode_batch(eager, ids, mask), encode_batch(compiled, ids, mask)
        assert a.shape == b.shape and float((a * b).sum(-1).min()) > 0.999


def test_copy_text_artifact_updates_only_the_spec(small_student, tmp_path):
    from slimray.families.sentence_encoder.models import copy_text_artifact, load_text_spec, save_text_artifact, spec_for, teacher_config, teacher_dir

    model, _ = small_student
    save_text_artifact(tmp_path / "a", model, spec_for(model, name="a", base_config=teacher_config(), max_seq_len=32),
                       tokenizer_dir=teacher_dir())
    copy_text_artifact(tmp_path / "a", tmp_path / "w", name="winner", max_seq_len=24)
    assert (tmp_path / "w" / "model.safetensors").read_bytes() == (tmp_path / "a" / "model.safetensors").read_bytes()
    spec = load_text_spec(tmp_path / "w")
    assert spec.name == "winner" and spec.max_seq_len == 24 and load_text_spec(tmp_path / "a").name == "a"
    with pytest.raises(Exception):
        copy_text_artifact(tmp_path / "a", tmp_path / "x", max_seq_len=4)  # below the spec's minimum


def test_epoch_batches_cover_every_sentence_once_with_little_padding():
    from slimray.families.sentence_encoder.kd import epoch_batches

    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 65, size=1000)
    idx = rng.permutation(1000)
    plain = epoch_batches(idx, lengths, batch_size=32, rng=np.random.default_rng(1), bucket=False)
    bucketed = epoch_batches(idx, lengths, batch_size=32, rng=np.random.default_rng(1), bucket=True)
    for batches in (plain, bucketed):
        assert len(batches) == 32 and sorted(np.concatenate(batches).tolist()) == list(range(1000))

    def padded(batches):
        return sum(len(b) * int(lengths[b].max()) for b in batches)

    assert padded(bucketed) < 0.75 * padded(plain)
    again = epoch_batches(idx, lengths, batch_size=32, rng=np.random.default_rng(1), bucket=True)
    assert all(np.array_equal(x, y) for x, y in zip(bucketed, again))  # seeded: the same on every rank and rerun


def test_frozen_word_embeddings_are_not_trained(small_student):
    import copy

    from slimray.families.sentence_encoder.kd import KDData, finetune_kd

    model, tok = small_student
    student = copy.deepcopy(model)
    table = student.embeddings.word_embeddings.weight.detach().clone()
    layer = student.encoder.layer[0].intermediate.dense.weight.detach().clone()
    enc = tok.encode_batch(SENTENCES)
    lengths = np.array([len(e.ids) for e in enc], dtype=np.int32)
    ids = np.zeros((len(enc), 32), dtype=np.int32)
    for i, e in enumerate(enc):
        ids[i, : lengths[i]] = e.ids
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(len(enc), 384)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    data = KDData(ids=ids, lengths=lengths, embeddings=emb, hidden=[], offsets=np.concatenate([[0], np.cumsum(lengths)]))
    finetune_kd(student, data, epochs=2, batch_size=2, lr=1e-3, embed_loss="cosine", hidden_weight=0.0, seed=0)
    assert torch.equal(student.embeddings.word_embeddings.weight, table)
    assert not torch.equal(student.encoder.layer[0].intermediate.dense.weight, layer)
    assert student.embeddings.word_embeddings.weight.requires_grad  # restored for whoever trains it next


def test_bf16_is_left_out_on_cpus_without_native_bf16():
    from slimray.compress.cpu import bf16_slow_reason, cpu_has_native_bf16

    avx2 = "processor: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
    amx = "processor: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16\n"
    assert "AVX512-BF16" in bf16_slow_reason(avx2) and not cpu_has_native_bf16(avx2)
    assert bf16_slow_reason(amx) is None and cpu_has_native_bf16(amx)


def test_torchao_without_a_compiler_fails_at_load(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-slimray")
    with pytest.raises(ConfigError, match="search.quantizations.*C\\+\\+ compiler"):
        TextPipelineConfig.from_dict({"family": "sentence_encoder", "search": {"quantizations": ["none", "torchao_int8_dynamic"]}})


def test_run_config_picks_the_family_of_the_document(tmp_path):
    from slimray.runconfig import load_run_config, with_overrides

    family, cfg = load_run_config(recipe="minilm")
    assert family.name == "sentence_encoder" and isinstance(cfg, TextPipelineConfig)
    cfg = with_overrides(family, cfg, name="other", port=8123, num_workers=1)
    assert cfg.name == "other" and cfg.serve.port == 8123 and cfg.distill.num_workers == 1
    with pytest.raises(ConfigError, match="--use-gpu: the sentence_encoder family's distill section has no use_gpu"):
        with_overrides(family, cfg, use_gpu=True)  # `slimray distill --use-gpu` on a family without the field
    assert load_run_config(recipe="digits")[0].name == "classifier"
    other = tmp_path / "x.yaml"
    other.write_text("family: sentence_encoder\nname: x\nmodel: {max_seq_len: 64}\nsearch: {seq_lens: [64]}\n")
    assert load_run_config(config=other)[0].name == "sentence_encoder"
    other.write_text("family: speech\nname: x\n")
    with pytest.raises(ConfigError, match="family.*speech.*known: .*classifier.*sentence_encoder"):
        load_run_config(config=other)
