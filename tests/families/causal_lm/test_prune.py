"""Depth and width pruning: measured importance, tensors shrink, configs load in plain transformers."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from slimray.families.causal_lm import prune
from slimray.families.causal_lm.evaluate import perplexity
from slimray.families.causal_lm.runtime import greedy_decode, hf_generate, make_session


def _roundtrip(model, path):
    model.save_pretrained(path)
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(3, 250, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)
    return loaded


def test_layer_importance_finds_a_disabled_layer(tiny_model, tiny_windows):
    # make layer 2 an identity (zero output projections): skipping it changes nothing
    with torch.no_grad():
        tiny_model.model.layers[2].self_attn.o_proj.weight.zero_()
        tiny_model.model.layers[2].mlp.down_proj.weight.zero_()
    scores = prune.layer_importance(tiny_model, tiny_windows[:4])
    assert len(scores) == 4 and scores[2] < 1e-6 < min(s for i, s in enumerate(scores) if i != 2)
    assert tiny_model.config.num_hidden_layers == 4 and len(tiny_model.model.layers) == 4  # restored


def test_prune_depth_saves_and_loads(tiny_model, tiny_windows, tmp_path):
    with torch.no_grad():
        tiny_model.model.layers[1].mlp.down_proj.weight.zero_()
        tiny_model.model.layers[1].self_attn.o_proj.weight.zero_()
    before = perplexity(tiny_model, tiny_windows[:4])
    report = prune.prune_depth(tiny_model, tiny_windows[:4], num_layers_to_drop=1)
    assert report.dropped == [1] and report.kept == [0, 2, 3]
    assert perplexity(tiny_model, tiny_windows[:4]) == __import__("pytest").approx(before, rel=1e-4)
    assert [layer.self_attn.layer_idx for layer in tiny_model.model.layers] == [0, 1, 2]
    loaded = _roundtrip(tiny_model, tmp_path)
    assert loaded.config.num_hidden_layers == 3
    ids = torch.randint(3, 250, (1, 8), generator=torch.Generator().manual_seed(1))
    session = make_session(loaded, "static", max_cache_len=24)
    assert torch.equal(greedy_decode(session, ids, num_new_tokens=8), hf_generate(loaded, ids, num_new_tokens=8))


def test_prune_depth_iterative(tiny_model, tiny_windows):
    report = prune.prune_depth(tiny_model, tiny_windows[:2], num_layers_to_drop=2, iterative=True)
    assert len(report.kept) == 2 and sorted(report.kept + report.dropped) == [0, 1, 2, 3]
    assert tiny_model.config.num_hidden_layers == 2


def test_prune_width_shrinks_and_loads(tiny_model, tiny_windows, tmp_path):
    report = prune.prune_width(tiny_model, num_kv_heads=1, intermediate_size=48, calibration=tiny_windows[:2])
    assert report.num_heads_after == 2 and report.importance == "activations"
    layer = tiny_model.model.layers[0]
    assert layer.self_attn.q_proj.weight.shape == (2 * 16, 64) and layer.self_attn.k_proj.weight.shape == (16, 64)
    assert layer.self_attn.o_proj.weight.shape == (64, 32) and layer.mlp.down_proj.weight.shape == (64, 48)
    n_params = sum(p.numel() for p in tiny_model.parameters())
    loaded = _roundtrip(tiny_model, tmp_path)
    assert loaded.config.num_attention_heads == 2 and loaded.config.num_key_value_heads == 1
    assert loaded.config.head_dim == 16 and loaded.config.intermediate_size == 48
    assert sum(p.numel() for p in loaded.parameters()) == n_params


def test_prune_width_keeps_the_strong_group(tiny_model):
    # KV group 0 (query heads 0, 1) scaled up: it must be the one kept, with its own query heads
    attn = tiny_model.model.layers[0].self_attn
    with torch.no_grad():
        for p in (attn.k_proj.weight[:16], attn.v_proj.weight[:16], attn.q_proj.weight[:32]):
            p.mul_(10)
    q_before = attn.q_proj.weight[:32].clone()
    report = prune.prune_width(tiny_model, num_kv_heads=1)
    assert report.kv_groups_kept[0] == [0] and report.importance == "weights"
    assert torch.equal(tiny_model.model.layers[0].self_attn.q_proj.weight, q_before)
