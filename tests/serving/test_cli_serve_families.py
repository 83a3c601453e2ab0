"""Every family's winner served the way a user serves it: ``slimray serve RUN`` in a subprocess (against the test
session's cluster, with the default ingress), then a real request over HTTP. Quantized winners included: a causal LM stored in
compressed-tensors int8 and int4, and one in slimray's sparse int8 packing; the OpenAI routes answer the official
``openai`` client (a completion and a streamed chat)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import torch

from tests.serving.conftest import free_port

pytestmark = pytest.mark.slow


def _write_config(run: Path, cfg) -> None:
    (run / "config.json").write_text(cfg.model_dump_json(indent=2))


@pytest.fixture(scope="module")
def lm_runs(tmp_path_factory):
    """causal_lm run folders (config.json + winner) with an int8, an int4 and a 2:4-sparse int8 winner."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from slimray.families.causal_lm.artifacts import LMArtifactMeta, compact_storage, save_lm
    from slimray.families.causal_lm.config import load_lm_config
    from slimray.families.causal_lm.sparsity import sparsify_lm
    from tests.families.causal_lm.conftest import make_tokenizer

    tok = make_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=True,
                      initializer_range=0.1, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg).eval()
    runs = {}
    for kind, quant, sparsity in (("int8", "token_int8", "none"), ("int4", "int4_weight_only", "none"), ("sparse", "token_int8", "2:4")):
        run = tmp_path_factory.mktemp(f"lm-{kind}")
        m = sparsify_lm(model, sparsity=sparsity, keep_dense=["lm_head"]) if sparsity != "none" else model
        save_lm(m, tok, run / "winner", meta=LMArtifactMeta(quant_method=quant, sparsity=sparsity,
                                                            storage=compact_storage(quant, sparsity=sparsity)))
        lm_cfg = load_lm_config(recipe="smollm-tiny").model_dump()
        lm_cfg["name"] = f"cli-lm-{kind}"
        _write_config(run, type(load_lm_config(recipe="smollm-tiny")).model_validate(lm_cfg))
        runs[kind] = run
    return runs


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory):
    from slimray.families.sentence_encoder.config import load_text_config
    from slimray.families.sentence_encoder.models import (load_teacher, quantize_text, save_text_artifact, spec_for, teacher_config,
                                                          teacher_dir, truncated)

    run = tmp_path_factory.mktemp("enc-run")
    model = truncated(load_teacher(), [0]).eval()
    spec = spec_for(model, name="cli-encoder", base_config=teacher_config(), max_seq_len=32, quantization="dynamic_int8")
    save_text_artifact(run / "winner", quantize_text(model, "dynamic_int8"), spec, tokenizer_dir=teacher_dir())
    cfg = load_text_config(recipe="minilm-tiny").model_dump()
    cfg["name"] = "cli-encoder"
    _write_config(run, type(load_text_config(recipe="minilm-tiny")).model_validate(cfg))
    return run


class Served:
    """``slimray serve RUN`` (or the ``command`` given, e.g. ``run --config ...``) in a subprocess until the check has
    passed; SIGINT on exit."""

    def __init__(self, run: Path | None, *, port: int, address: str, command: list[str] | None = None):
        cli = Path(sys.executable).with_name("slimray")
        args = command if command is not None else ["serve", str(run), "--port", str(port)]
        self.proc = subprocess.Popen([str(cli), *args, "--address", address],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if "Ctrl-C stops the server" in line:
                self.ready.set()

    def __enter__(self) -> "Served":
        while not self.ready.wait(1):
            assert self.proc.poll() is None, "slimray serve exited:\n" + "".join(self.lines[-40:])
            assert len(self.lines) < 10_000
        return self

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _wait(served: Served, timeout: float = 240) -> None:
    timer = threading.Timer(timeout, served.proc.kill)
    timer.start()
    try:
        served.__enter__()
    finally:
        timer.cancel()


# int8 in `make test`; int4 and the sparse packing with the long tests (each CLI start is ~30-45 s on 2 cores). A vLLM
# winner served through Ray Serve LLM by the CLI: tests/pipelines/test_causal_lm_vllm.py (the recipe run, then served)
@pytest.mark.parametrize("kind", ["int8", pytest.param("int4", marks=pytest.mark.long), pytest.param("sparse", marks=pytest.mark.long)])
def test_causal_lm_winner_served_through_the_cli_answers_the_openai_client(lm_runs, kind, ray_session):
    from openai import OpenAI

    from slimray.families.causal_lm.artifacts import load_lm

    run = lm_runs[kind]
    serve_port = free_port()
    served = Served(run, port=serve_port, address=ray_session.get_runtime_context().gcs_address)
    try:
        _wait(served)
        out = "".join(served.lines)
        assert "Traceback" not in out, out[-3000:]
        client = OpenAI(base_url=f"http://127.0.0.1:{serve_port}/v1", api_key="unused", max_retries=0, timeout=60)
        (model_id,) = [m.id for m in client.models.list().data]
        done = client.completions.create(model=model_id, prompt="The cat sat on", max_tokens=6, temperature=0)
        assert done.choices[0].finish_reason in ("length", "stop") and done.usage.completion_tokens >= 1
        # greedy: the same text as the winner loaded in-process
        model, tok, _ = load_lm(run / "winner")
        ids = tok("The cat sat on", add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            gen = model.generate(ids, max_new_tokens=done.usage.completion_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        assert done.choices[0].text == tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
        chunks = list(client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Bees"}],
                                                     max_tokens=5, temperature=0, stream=True))
        assert len(chunks) >= 2 and chunks[-1].choices[0].finish_reason in ("length", "stop")
        bad = httpx.post(f"http://127.0.0.1:{serve_port}/v1/completions", json={"model": model_id, "max_tokens": -1,
                                                                                 "prompt": "x"}, timeout=30)
        assert bad.status_code == 400 and "max_tokens" in json.dumps(bad.json())
    finally:
        served.__exit__()
    assert served.proc.returncode == 130, "".join(served.lines[-40:])


@pytest.mark.long
def test_sentence_encoder_winner_served_through_the_cli(encoder_run, ray_session):
    serve_port = free_port()
    served = Served(encoder_run, port=serve_port, address=ray_session.get_runtime_context().gcs_address)
    try:
        _wait(served)
        r = httpx.post(f"http://127.0.0.1:{serve_port}/v1/embed", json={"texts": ["a cat", "the stock market fell"]}, timeout=30)
        assert r.status_code == 200, r.text
        emb = torch.tensor(r.json()["embeddings"])
        assert emb.shape[0] == 2 and torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-3)
        assert httpx.post(f"http://127.0.0.1:{serve_port}/v1/embed", json={"texts": []}, timeout=30).status_code == 422
    finally:
        served.__exit__()
    assert served.proc.returncode == 130, "".join(served.lines[-40:])


def test_classifier_winner_served_through_the_cli(digits_run, digits, ray_session):
    run_dir, report = digits_run
    serve_port = free_port()
    served = Served(run_dir, port=serve_port, address=ray_session.get_runtime_context().gcs_address)
    try:
        _wait(served)
        r = httpx.get(f"http://127.0.0.1:{serve_port}/v1/models", timeout=30)
        assert r.status_code == 200, r.text
        x = digits.test.x[:4]
        p = httpx.post(f"http://127.0.0.1:{serve_port}/v1/predict", json={"inputs": x.tolist()}, timeout=30)
        assert p.status_code == 200, p.text
        assert len(p.json()["predictions"]) == 4 and report["winner"]["quantization"]
        assert httpx.post(f"http://127.0.0.1:{serve_port}/v1/predict", json={"inputs": [[0.0] * 5]}, timeout=30).status_code == 422
    finally:
        served.__exit__()
    assert served.proc.returncode == 130, "".join(served.lines[-40:])
