"""LM artifacts: plain-transformers folders plus slimray_lm.json, quantization re-applied at load."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimray.families.causal_lm.artifacts import LMArtifactMeta, load_lm, save_lm
from slimray.families.causal_lm.quantize import TokenInt8Linear


def test_save_and_load(tiny_model, tiny_tokenizer, tmp_path):
    meta = LMArtifactMeta(quant_method="token_int8", keep_float=["lm_head"], runtime="static",
                          reports={"depth": {"kept": [0, 2, 3]}})
    out = save_lm(tiny_model, tiny_tokenizer, tmp_path / "a", meta=meta)
    assert not list(tmp_path.glob(".a.tmp-*")) and not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    model, tok, meta2 = load_lm(out)
    assert meta2 == meta and isinstance(model.model.layers[0].mlp.up_proj, TokenInt8Linear)
    plain = AutoModelForCausalLM.from_pretrained(out)  # no slimray code needed for the float model
    ids = torch.randint(3, 250, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.allclose(plain(ids).logits, tiny_model(ids).logits, atol=1e-5)
    with pytest.raises(FileExistsError):
        save_lm(tiny_model, tiny_tokenizer, out)
