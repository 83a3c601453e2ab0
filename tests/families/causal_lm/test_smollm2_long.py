"""The real SmolLM2-135M teacher end to end without Ray (marked long: ~1-2 min): GGUF converted once into an HF
folder, sensible held-out perplexity, depth + width pruning saved and loaded by plain transformers, and an
OpenAI-style chat completion from the pruned model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimray.families.causal_lm import data as D
from slimray.families.causal_lm import openai as oa
from slimray.families.causal_lm.evaluate import perplexity
from slimray.families.causal_lm.prune import prune_depth, prune_width
from slimray.families.causal_lm.runtime import make_session
from slimray.families.causal_lm.teacher import ensure_smollm2_teacher, load_causal_lm

pytestmark = pytest.mark.long


def test_smollm2_convert_prune_serve(tmp_path):
    torch.set_num_threads(1)
    folder = ensure_smollm2_teacher(tmp_path / "teacher")
    assert ensure_smollm2_teacher(tmp_path / "teacher") == folder  # reused, not converted again
    assert not list(tmp_path.glob(".teacher.tmp-*"))
    model, tok = load_causal_lm(folder)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    splits = D.split_documents(D.load_wiki_summaries(), seed=0)
    windows = D.pack_windows(splits["test"], tok, window_len=128, num_windows=2)
    ppl = perplexity(model, windows, batch_size=1)
    assert 5 < ppl < 40, ppl
    calib = D.pack_windows(splits["val"], tok, window_len=64, num_windows=2)
    report = prune_depth(model, calib, num_layers_to_drop=2)
    assert len(report.kept) == 28 and report.kept[0] == 0  # the first layer is never the least important
    prune_width(model, num_kv_heads=2, intermediate_size=1024, calibration=calib)
    out = tmp_path / "student"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert plain.config.num_attention_heads == 6 and plain.config.num_key_value_heads == 2 and plain.config.head_dim == 64
    with torch.inference_mode():
        assert torch.allclose(plain(windows[:1]).logits, model(windows[:1]).logits, atol=1e-4)
    req = oa.parse_request("chat", {"messages": [{"role": "user", "content": "What is the capital of France?"}],
                                    "max_tokens": 8, "temperature": 0})
    body = oa.complete(make_session(plain, "static", max_cache_len=256), req, tok, model="student",
                       limits=oa.Limits(context_len=256, max_tokens_limit=64), eos_token_ids=[tok.eos_token_id])
    assert body["usage"]["completion_tokens"] >= 1 and isinstance(body["choices"][0]["message"]["content"], str)
