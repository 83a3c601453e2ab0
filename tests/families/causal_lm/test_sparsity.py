"""Sparsity for causal LMs (issue #17): 2:4 and unstructured magnitude pruning, packed safetensors storage that
round-trips bit for bit and really shrinks on disk, config validation of the sparsity axis, and the GPU-only paths
refusing on CPU."""

from __future__ import annotations

import pytest
import torch

from slimray.families.causal_lm.artifacts import (
    SPARSE_FILE, SPARSE_INT8_FILE, LMArtifactMeta, compact_storage, load_lm, save_lm)
from slimray.families.causal_lm.sparsity import (
    NeedsGPUError, is_2_4, mask_unstructured, pack_2_4, pack_unstructured, parse_sparsity, sparse_linear_names,
    sparsify_lm, sparsity_report, to_semi_structured_gpu, unpack_2_4, unpack_unstructured)

IDS = torch.randint(3, 250, (2, 16), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.inference_mode():
        return model(IDS).logits


def test_parse_sparsity():
    assert parse_sparsity("none") == ("none", 0.0)
    assert parse_sparsity("2:4") == ("2:4", 0.5)
    assert parse_sparsity("unstructured_70") == ("unstructured", 0.7)
    for bad in ("2:8", "unstructured_0", "unstructured_100", "50%"):
        with pytest.raises(ValueError, match="sparsity"):
            parse_sparsity(bad)


def test_2_4_pattern_exact(tiny_model):
    model = sparsify_lm(tiny_model, sparsity="2:4")
    names = sparse_linear_names(model, sparsity="2:4", keep_dense=["lm_head"])
    assert names and "lm_head" not in names and len(names) == 7 * 4
    for n in names:
        w, orig = model.get_submodule(n).weight, tiny_model.get_submodule(n).weight
        groups = w.reshape(w.shape[0], -1, 4)
        assert bool(((groups == 0).sum(-1) >= 2).all()) and is_2_4(w)
        # the kept 2 are the largest |w| of their group
        og = orig.detach().abs().reshape(w.shape[0], -1, 4)
        kept = groups != 0
        assert torch.equal(og[kept].reshape(-1, 2).min(-1).values >= og[~kept].reshape(-1, 2).max(-1).values,
                           torch.ones(kept.sum().item() // 2, dtype=torch.bool))
    assert torch.equal(model.lm_head.weight, tiny_model.lm_head.weight)  # kept dense (tied to the embeddings)
    assert abs(sparsity_report(model, sparsity="2:4")["zero_fraction"] - 0.5) < 1e-9
    assert not is_2_4(tiny_model.model.layers[0].mlp.up_proj.weight)  # the original is untouched (a copy)


@pytest.mark.parametrize("percent", [30, 50, 90])
def test_unstructured_fraction(tiny_model, percent):
    model = sparsify_lm(tiny_model, sparsity=f"unstructured_{percent}")
    names = sparse_linear_names(model, sparsity=f"unstructured_{percent}", keep_dense=["lm_head"])
    for n in names:
        w = model.get_submodule(n).weight
        assert int((w == 0).sum()) == round(percent / 100 * w.numel())  # exactly, per layer
        thr = w.abs()[w != 0].min()
        assert bool((tiny_model.get_submodule(n).weight.abs()[w == 0] <= thr).all())  # the smallest went
    rep = sparsity_report(model, sparsity=f"unstructured_{percent}")
    assert abs(rep["zero_fraction"] - percent / 100) < 1e-3 and rep["dense_layers"] == ["lm_head"]


def test_pruning_lm_head_unties_it(tiny_model):
    emb = tiny_model.model.embed_tokens.weight.detach().clone()
    model = sparsify_lm(tiny_model, sparsity="unstructured_50", keep_dense=[])
    assert torch.equal(model.model.embed_tokens.weight, emb) and not model.config.tie_word_embeddings
    assert int((model.lm_head.weight == 0).sum()) == model.lm_head.weight.numel() // 2


@pytest.mark.parametrize("shape", [(8, 16), (5, 12), (3, 4)])
def test_pack_2_4_round_trip(shape):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(*shape, generator=g)
    w = w * torch.zeros_like(w, dtype=torch.bool).reshape(shape[0], -1, 4).scatter_(
        -1, torch.rand(shape[0], shape[1] // 4, 4, generator=g).topk(2, -1).indices, True).reshape(shape)
    w[0, :4] = 0  # a group with fewer than 2 non-zeros
    values, codes = pack_2_4(w)
    assert values.shape == (shape[0], shape[1] // 2) and codes.dtype == torch.uint8 and codes.numel() == -(-w.numel() // 8)
    assert torch.equal(unpack_2_4(values, codes, shape=shape), w)
    q = (w * 10).round().to(torch.int8)  # int8 codes pack the same way
    assert torch.equal(unpack_2_4(*pack_2_4(q), shape=shape), q)
    with pytest.raises(ValueError, match="not 2:4"):
        pack_2_4(torch.ones(2, 8))


@pytest.mark.parametrize("numel", [64, 61, 1])
def test_pack_unstructured_round_trip(numel):
    w = torch.randn(numel, generator=torch.Generator().manual_seed(2))
    w = w * mask_unstructured(w, fraction=0.5)
    values, mask = pack_unstructured(w)
    assert mask.numel() == -(-numel // 8) and values.numel() == int((w != 0).sum())
    assert torch.equal(unpack_unstructured(values, mask, shape=(numel,)), w)


def _layer_bytes(path, names) -> int:
    """Bytes of the stored tensors of the named Linear layers' weights (their parts and scales) in a safetensors file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()
                   if any(k.startswith(f"{n}.weight") for n in names))


def _file_bytes(path):
    return path.stat().st_size


@pytest.mark.parametrize("sparsity", ["2:4", "unstructured_50"])
def test_sparse_storage_round_trip_and_size(tiny_model, tiny_tokenizer, tmp_path, sparsity):
    """The packed artifact rebuilds the identical dense weights and logits, no pickle, and the pruned layers take
    2.125 bytes a weight (values + 1/8 byte of codes / mask) instead of 4."""
    pruned = sparsify_lm(tiny_model, sparsity=sparsity)
    names = sparse_linear_names(pruned, sparsity=sparsity, keep_dense=["lm_head"])
    dense_dir = save_lm(pruned, tiny_tokenizer, tmp_path / "dense", meta=LMArtifactMeta(sparsity=sparsity))
    meta = LMArtifactMeta(sparsity=sparsity, storage=compact_storage("none", sparsity=sparsity))
    out = save_lm(pruned, tiny_tokenizer, tmp_path / "sparse", meta=meta)
    assert meta.storage == "sparse" and (out / SPARSE_FILE).is_file() and not (out / "model.safetensors").exists()
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt")) and not list(tmp_path.glob(".sparse.tmp-*"))
    model, _, meta2 = load_lm(out)
    assert meta2 == meta
    for n in names:
        assert torch.equal(model.get_submodule(n).weight, pruned.get_submodule(n).weight)
    assert torch.equal(_logits(model), _logits(pruned))

    num_pruned = sum(pruned.get_submodule(n).weight.numel() for n in names)
    dense, sparse = _file_bytes(dense_dir / "model.safetensors"), _file_bytes(out / SPARSE_FILE)
    saved = dense - sparse
    expected = num_pruned * (4 - 2.125)
    assert abs(saved - expected) / expected < 0.03, (dense, sparse, saved, expected)
    assert sparse < 0.65 * dense


def test_sparse_int8_and_bf16_storage(tiny_model, tiny_tokenizer, tmp_path):
    """2:4 + token_int8: the int8 codes are packed (zeros stay zero) and rebuild the very same quantized model;
    2:4 + bf16 stores bf16 values."""
    from slimray.families.causal_lm.quantize import quantize_lm

    pruned = sparsify_lm(tiny_model, sparsity="2:4")
    meta = LMArtifactMeta(quant_method="token_int8", sparsity="2:4", storage=compact_storage("token_int8", sparsity="2:4"))
    assert meta.storage == "sparse_int8"
    out = save_lm(pruned, tiny_tokenizer, tmp_path / "q", meta=meta)
    model, _, _ = load_lm(out)
    ref = quantize_lm(pruned, method="token_int8")
    layer, ref_layer = model.model.layers[1].mlp.down_proj, ref.model.layers[1].mlp.down_proj
    assert torch.equal(layer.weight_t, ref_layer.weight_t) and is_2_4(layer.weight_t.t())
    assert torch.equal(_logits(model), _logits(ref))
    int8_dense = save_lm(pruned, tiny_tokenizer, tmp_path / "i8", meta=LMArtifactMeta(quant_method="token_int8", storage="int8"))
    num_pruned = sum(pruned.get_submodule(n).weight.numel() for n in sparse_linear_names(pruned, sparsity="2:4", keep_dense=["lm_head"]))
    names = sparse_linear_names(pruned, sparsity="2:4", keep_dense=["lm_head"])
    saved = _layer_bytes(int8_dense / "model.safetensors", names) - _layer_bytes(out / SPARSE_INT8_FILE, names)
    # int8: 1 byte -> 1/2 + 1/8 a weight (the dense int8 folder is compressed-tensors: weight + weight_scale per layer)
    assert abs(saved - num_pruned * (1 - 0.625)) / (num_pruned * 0.375) < 0.01

    bf = save_lm(pruned, tiny_tokenizer, tmp_path / "bf",
                 meta=LMArtifactMeta(quant_method="bf16", sparsity="2:4", storage="sparse"))
    model, _, _ = load_lm(bf)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert torch.equal(_logits(model), _logits(pruned.to(torch.bfloat16)))


def test_sparse_storage_refusals(tiny_model, tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="int4_weight_only.*sparsity"):
        compact_storage("int4_weight_only", sparsity="2:4")
    with pytest.raises(ValueError, match="needs a sparsity"):
        save_lm(tiny_model, tiny_tokenizer, tmp_path / "a", meta=LMArtifactMeta(storage="sparse"))
    with pytest.raises(ValueError, match="not 2:4 sparse"):  # a model not pruned is not silently pruned at save
        save_lm(tiny_model, tiny_tokenizer, tmp_path / "b", meta=LMArtifactMeta(sparsity="2:4", storage="sparse"))
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.tmp-*"))


def test_gpu_paths_refuse_on_cpu(tiny_model):
    from slimray.families.causal_lm.quantize import GPU_QUANT_METHODS, gpu_quant_config, quantize_lm

    for method in GPU_QUANT_METHODS:
        with pytest.raises(NeedsGPUError, match=f"{method}.*needs a GPU"):
            quantize_lm(tiny_model, method=method)
        assert type(gpu_quant_config(method)).__name__.endswith("Config")
    from torchao.quantization import PerRow

    assert all(isinstance(g, PerRow) for g in gpu_quant_config("fp8_dynamic").granularity)  # activations, weights
    assert gpu_quant_config("torchao_int4_weight_only").group_size == 128
    with pytest.raises(NeedsGPUError, match="2:4 semi-structured kernels need a GPU"):
        to_semi_structured_gpu(sparsify_lm(tiny_model, sparsity="2:4"))
    from torch.sparse import to_sparse_semi_structured  # the API the GPU path calls exists in this torch

    assert callable(to_sparse_semi_structured)


@pytest.mark.parametrize(("search", "field", "words"), [
    ({"sparsities": ["2:8"]}, "search.sparsities", "not one of"),
    ({"sparsities": ["unstructured_100"]}, "search.sparsities", "not one of"),
    ({"sparse_quant_methods": ["int4_weight_only"]}, "search.sparse_quant_methods", "cannot be combined with sparsity"),
    ({"sparse_quant_methods": ["torchao_int8_weight_only"]}, "search.sparse_quant_methods", "cannot be combined"),
    ({"quant_methods": ["none", "fp8_weight_only"]}, "search.quant_methods", "need a GPU"),
    ({"quant_methods": ["fp8_dynamic"]}, "search.quant_methods", "need a GPU"),
    ({"compiled_quant_methods": ["torchao_int4_weight_only"]}, "search.compiled_quant_methods", "need a GPU"),
])
def test_config_rejects_bad_sparsity_and_gpu_methods(search, field, words):
    from slimray.families.causal_lm.config import LMPipelineConfig
    from slimray.schema import ConfigError

    with pytest.raises(ConfigError) as err:
        LMPipelineConfig.from_dict({"family": "causal_lm", "search": search}, source="t.yaml")
    assert field in str(err.value) and words in str(err.value), str(err.value)


def test_config_sparsity_axis_and_grid():
    from slimray.families.causal_lm.config import LMPipelineConfig, load_lm_config
    from slimray.families.causal_lm.search import candidate_grid

    for recipe in ("smollm", "smollm-tiny"):  # the recipes' grids are unchanged: no sparsity unless asked
        assert load_lm_config(recipe=recipe).search.sparsities == ["none"]
    s = LMPipelineConfig.from_dict({"family": "causal_lm", "search": {
        "sparsities": ["none", "2:4", "unstructured_50", "2:4"], "quant_methods": ["none", "bf16", "token_int8", "int4_weight_only"],
        "runtimes": ["hf_eager", "static_compiled"], "compiled_quant_methods": ["none"]}}, source="t.yaml").search
    assert s.sparsities == ["none", "2:4", "unstructured_50"] and s.sparsity_keep_dense == ["lm_head"]
    grid = candidate_grid(["teacher", "s20"], sparsities=s.sparsities, quant_methods=s.quant_methods, runtimes=s.runtimes,
                          compiled_quant_methods=s.compiled_quant_methods, sparse_quant_methods=s.sparse_quant_methods)
    assert grid["teacher-int4_weight_only-hf_eager"] == ("teacher", "int4_weight_only", "hf_eager", "none")
    assert grid["s20-2of4-token_int8-hf_eager"] == ("s20", "token_int8", "hf_eager", "2:4")
    assert grid["teacher-unstructured50-none-static_compiled"] == ("teacher", "none", "static_compiled", "unstructured_50")
    sparse = {k for k, v in grid.items() if v[3] != "none"}
    assert len(grid) == 2 * (5 + 2 * 3) and all(grid[k][1] in ("none", "token_int8") for k in sparse)
    assert all(":" not in k for k in grid)  # keys are file names


def test_measure_candidate_sparse(tiny_folder, tiny_windows, tmp_path):
    """One sparse trial's row: pruned, packed artifact size counted, perplexity measured (CPU speed timed, not claimed)."""
    from slimray.families.causal_lm.search import measure_candidate

    search = {"prefill_len": 8, "num_repeats": 1, "num_new_tokens": 2}
    ref = torch.zeros(tiny_windows.shape[0], tiny_windows.shape[1] - 1, dtype=torch.long)
    rows = {sp: measure_candidate(model_dir=str(tiny_folder), model_name="teacher", quant="none", runtime="hf_eager",
                                  keep_float=[], windows=tiny_windows[:2], reference_argmax=ref[:2], search=search,
                                  tmp_root=tmp_path, sparsity=sp) for sp in ("none", "2:4")}
    assert rows["2:4"]["key"] == "teacher-2of4-none-hf_eager" and rows["2:4"]["storage"] == "sparse"
    assert abs(rows["2:4"]["sparsity_report"]["zero_fraction"] - 0.5) < 1e-9
    assert rows["2:4"]["size_bytes"] < 0.8 * rows["none"]["size_bytes"]
    assert rows["2:4"]["perplexity"] != rows["none"]["perplexity"]


def test_report_note_claims_no_cpu_speedup():
    from slimray.families.causal_lm.config import LMPipelineConfig
    from slimray.families.causal_lm.report import sparsity_note

    assert sparsity_note(LMPipelineConfig.from_dict({"family": "causal_lm"}, source="t.yaml")) is None
    cfg = LMPipelineConfig.from_dict({"family": "causal_lm", "search": {"sparsities": ["none", "2:4"]}}, source="t.yaml")
    note = sparsity_note(cfg)
    assert "'2:4'" in note and "no CPU speedup is claimed" in note and "GPU" in note and "['none', 'token_int8']" in note


def test_low_sparsity_int8_layers_stay_dense(tiny_model, tiny_tokenizer, tmp_path):
    """At 10% a bitmask (1/8 byte) + 90% of the int8 bytes costs more than the int8 layer: stored dense, still exact."""
    from safetensors.torch import load_file

    from slimray.families.causal_lm.quantize import quantize_lm

    pruned = sparsify_lm(tiny_model, sparsity="unstructured_10")
    out = save_lm(pruned, tiny_tokenizer, tmp_path / "q",
                  meta=LMArtifactMeta(quant_method="token_int8", sparsity="unstructured_10", storage="sparse_int8"))
    keys = load_file(str(out / SPARSE_INT8_FILE)).keys()
    assert not any(k.endswith(".spu_mask") for k in keys) and "model.layers.0.mlp.up_proj.weight.int8" in keys
    assert torch.equal(_logits(load_lm(out)[0]), _logits(quantize_lm(pruned, method="token_int8")))
    flt = save_lm(pruned, tiny_tokenizer, tmp_path / "f", meta=LMArtifactMeta(sparsity="unstructured_10", storage="sparse"))
    assert any(k.endswith(".spu_mask") for k in load_file(str(flt / SPARSE_FILE)).keys())  # float32: packing pays
