"""GGUF out (``slimray export RUN --format gguf``): the file is read back by transformers' own GGUF loader, which is
independent of our writer, and must give the source's predictions (exactly in f32, nearly in q8_0 / q4_0) and
its tokenizer's ids; llama.cpp's check runs where ``llama-cpp-python`` is installed. Bad input fails with a line
naming it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slimray.families.causal_lm.gguf_export import check_gguf, interleave_rotary, tokenizer_pre, write_gguf
from slimray.schema import ConfigError
from tests.families.causal_lm.conftest import SENTENCES, make_model, make_tokenizer

TEXTS = SENTENCES[:3] + ["digits 12345 and  two spaces\n<|im_end|> then more"]


def _folder(tmp_path: Path, tokenizer, **overrides) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    model = make_model(tokenizer)
    if overrides:
        torch.manual_seed(1)
        model = LlamaForCausalLM(LlamaConfig(**{**model.config.to_dict(), **overrides})).eval()
    out = tmp_path / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_interleave_rotary_pairs_the_two_halves_of_each_head():
    w = torch.arange(8).float().view(8, 1)  # 2 heads of 4 rows: halves (0,1 | 2,3) and (4,5 | 6,7)
    assert interleave_rotary(w, 2).view(-1).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.mark.parametrize("overrides", [{}, {"num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32,
                                            "tie_word_embeddings": False}], ids=["tied", "head_dim-untied"])
def test_f32_gguf_reads_back_as_the_same_model(tmp_path, tiny_tokenizer, tiny_windows, overrides):
    src = _folder(tmp_path, tiny_tokenizer, **overrides)
    info = write_gguf(src, tmp_path / "m.gguf", qtype="f32")
    assert info["architecture"] == "llama" and info["tokenizer_pre"] == "gpt-2" and set(info["tensor_types"]) == {"f32"}
    check = check_gguf(src, tmp_path / "m.gguf", tiny_windows, texts=TEXTS)
    assert check["top1_agreement"] == 1.0
    assert check["perplexity_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert check["tokenizer_same_ids"] is True


@pytest.mark.parametrize("qtype,min_agree", [("q8_0", 0.97), ("q4_0", 0.85)])
def test_quantized_gguf_keeps_the_predictions(tmp_path, tiny_tokenizer, tiny_windows, qtype, min_agree):
    src = _folder(tmp_path, tiny_tokenizer)
    info = write_gguf(src, tmp_path / "m.gguf", qtype=qtype)
    # 2-D weights quantized, norms f32; smaller than f32 by the type's bits
    assert info["tensor_types"][qtype] == 1 + 4 * 7 and info["tensor_types"]["f32"] == 1 + 4 * 2
    check = check_gguf(src, tmp_path / "m.gguf", tiny_windows)
    assert check["top1_agreement"] >= min_agree, check
    assert check["perplexity_ratio"] < 1.02, check


def test_tokenizer_pre_is_read_from_the_pre_tokenizer():
    assert tokenizer_pre({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"
    smollm = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                    {"type": "ByteLevel", "use_regex": True}]}
    assert tokenizer_pre({"pre_tokenizer": smollm}) == "smollm"
    assert tokenizer_pre({"pre_tokenizer": {"type": "Split", "pattern": {"Regex": "x"}}}) == "default"


def test_refuses_what_it_cannot_write(tmp_path, tiny_tokenizer):
    src = _folder(tmp_path, tiny_tokenizer)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
    with pytest.raises(ConfigError, match="Llama-architecture.*gpt_neox"):
        write_gguf(src, tmp_path / "m.gguf")
    (src / "config.json").write_text(json.dumps(cfg))
    tok = json.loads((src / "tokenizer.json").read_text())
    (src / "tokenizer.json").write_text(json.dumps({**tok, "decoder": {"type": "Metaspace"}}))
    with pytest.raises(ConfigError, match="byte-level BPE"):
        write_gguf(src, tmp_path / "m.gguf")
    with pytest.raises(ConfigError, match="gguf type"):
        write_gguf(src, tmp_path / "m.gguf", qtype="q3_k")
    assert not list(tmp_path.glob("*.gguf*"))  # nothing half-written


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """A causal_lm run folder whose winner is stored W8A8 in compressed-tensors, as the smollm recipe stores it."""
    from slimray.families.causal_lm.artifacts import LMArtifactMeta, compact_storage, save_lm
    from slimray.families.causal_lm.config import load_lm_config

    tok = make_tokenizer()
    run = tmp_path_factory.mktemp("lm-run")
    save_lm(make_model(tok), tok, run / "winner",
            meta=LMArtifactMeta(quant_method="token_int8", storage=compact_storage("token_int8")))
    cfg = load_lm_config(recipe="smollm-tiny")
    (run / "config.json").write_text(cfg.model_copy(update={"name": "gguf-run"}).model_dump_json(indent=2))
    return run


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).with_name("slimray")), *args], capture_output=True, text=True,
                          timeout=600)


def test_cli_exports_the_int8_winner_as_gguf(lm_run, tmp_path):
    out = tmp_path / "winner.gguf"
    proc = _cli("export", str(lm_run), "--format", "gguf", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "top-1 agreement" in proc.stdout
    check = json.loads((tmp_path / "winner.gguf.check.json").read_text())
    assert check["gguf_type"] == "q8_0" and check["data"] == "the run's test split"
    assert check["top1_agreement"] >= 0.95 and check["perplexity_ratio"] < 1.02, check
    assert check["tokenizer_same_ids"] is True and check["num_texts"] > 0
    import gguf

    names = {t.name for t in gguf.GGUFReader(str(out)).tensors}
    assert {"token_embd.weight", "blk.0.attn_q.weight", "output_norm.weight"} <= names


@pytest.mark.parametrize("args,message", [
    (["--format", "onnx"], "causal_lm run exports gguf"),
    (["--format", "gguf", "--trial", "../etc"], "model"),
    (["--format", "gguf", "--trial", "nosuch"], "this run has the winner"),
    (["--format", "onnx", "--gguf-type", "q4_0"], "causal_lm run exports gguf"),
])
def test_cli_export_refuses_bad_requests_with_a_line(lm_run, tmp_path, capsys, args, message):
    from slimray.cli import main

    assert main(["export", str(lm_run), *args, "--out", str(tmp_path / "x.gguf")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.long
def test_smollm2_teacher_exports_to_a_gguf_that_reads_back(tmp_path):
    """The real SmolLM2 teacher in q8_0: ids match, perplexity within 1%. Its folder's tokenizer.json is the one
    transformers writes when it converts the packaged GGUF: a plain byte-level pre-tokenizer (GPT-2's regex, no
    digit splitting), so the GGUF names ``gpt-2``, which is what makes llama.cpp split text as the folder does."""
    from transformers import AutoTokenizer

    from slimray.families.causal_lm import data as D
    from slimray.families.causal_lm.teacher import ensure_smollm2_teacher

    torch.set_num_threads(2)
    folder = ensure_smollm2_teacher(tmp_path / "teacher")
    info = write_gguf(folder, tmp_path / "smollm2-q8_0.gguf", qtype="q8_0")
    assert info["tokenizer_pre"] == "gpt-2"
    tok = AutoTokenizer.from_pretrained(folder)
    split = D.split_documents(D.load_wiki_summaries(), seed=0)
    windows = D.pack_windows(split["test"], tok, window_len=128, num_windows=4)
    check = check_gguf(folder, tmp_path / "smollm2-q8_0.gguf", windows, texts=[d.text for d in split["test"][:8]])
    assert check["tokenizer_same_ids"] is True
    assert check["perplexity_ratio"] < 1.01 and check["top1_agreement"] > 0.95, check


def test_llama_cpp_runs_the_file_where_installed(tmp_path, tiny_tokenizer, tiny_windows):
    """llama.cpp itself (``llama-cpp-python``, built from source: not in CI) loads the file and predicts as the source."""
    pytest.importorskip("llama_cpp")
    src = _folder(tmp_path, tiny_tokenizer)
    write_gguf(src, tmp_path / "m.gguf", qtype="f32")
    check = check_gguf(src, tmp_path / "m.gguf", tiny_windows, llama_cpp=True)
    assert check["llama_cpp"] == "loaded" and check["llama_cpp_top1_agreement"] >= 0.99, check
