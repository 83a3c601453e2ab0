"""The causal-LM recipe with vLLM as its runtime, the way a user runs it: ``slimray run --config`` in a subprocess
(the smollm-tiny recipe on the real SmolLM2 teacher, searching vLLM candidates only so the winner is a vLLM one),
which distils, searches, re-times the finalists beside the uncompressed teacher in vLLM, writes the report and then
serves the winner through Ray Serve LLM; the official ``openai`` client gets a completion and a streamed chat, and
the endpoint's API key is enforced. Marked long (~10 min on 2 cores: every vLLM engine loads in 20-60 s)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import yaml

from tests.serving.conftest import free_port

pytestmark = [pytest.mark.slow, pytest.mark.long]

KEY = "test-key-vllm-9f3a"


def test_smollm_tiny_with_vllm_runtime_serves_its_winner_to_the_openai_client(tmp_path):
    from openai import AuthenticationError, OpenAI

    from slimray.families.causal_lm.config import lm_recipe_path

    pytest.importorskip("vllm")
    cfg = yaml.safe_load(lm_recipe_path("smollm-tiny").read_text())
    cfg["name"] = "tiny-vllm"
    cfg["search"].update(runtimes=["vllm"], quant_methods=["token_int8"], compiled_quant_methods=[])
    port = free_port()
    cfg.setdefault("serve", {}).update(port=port, num_cpus_per_replica=1)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    cli = Path(sys.executable).with_name("slimray")
    env = {**os.environ, "SLIMRAY_API_KEY": KEY}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([str(cli), "run", "--config", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "runs")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C stops the server" in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    timer = threading.Timer(1800, proc.kill)
    timer.start()
    try:
        while not ready.wait(2):
            assert proc.poll() is None, "slimray run exited:\n" + "".join(lines[-60:])
        timer.cancel()
        out = "".join(lines)
        assert "served greedy completion by vLLM" in out, out[-3000:]
        run = tmp_path / "runs" / "tiny-vllm"
        report = json.loads((run / "report.json").read_text())
        assert report["winner"]["runtime"] == "vllm"
        assert json.loads((run / "winner" / "slimray_lm.json").read_text())["runtime"] == "vllm"
        vllm_trials = [t for t in report["trials"] if t["runtime"] == "vllm" and t["status"] == "ok"]
        assert len(vllm_trials) == 2, report["trials"]  # {teacher, student} x token_int8
        assert all(t["perplexity"] > 1 and t["decode_tokens_per_s_b1"] > 0 for t in vllm_trials)
        beside = {r["key"]: r for r in report["beside"]}  # the uncompressed teacher in the same engine, in its own process
        assert beside["teacher-bf16-vllm"]["decode_tokens_per_s_b1"] > 0 and report["teacher_vllm_key"] in (None, "teacher-bf16-vllm")
        url = f"http://127.0.0.1:{port}"
        client = OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)
        (model_id,) = [m.id for m in client.models.list().data]
        assert model_id == "tiny-vllm"
        done = client.completions.create(model=model_id, prompt="The capital of France is", max_tokens=8, temperature=0)
        assert done.choices[0].text.strip() and done.usage.completion_tokens >= 1
        chunks = list(client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Name a river."}],
                                                     max_tokens=8, temperature=0, stream=True))
        assert len(chunks) >= 2
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).completions.create(model=model_id, prompt="x", max_tokens=1)
        assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 401
    finally:
        timer.cancel()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
