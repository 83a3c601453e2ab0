"""What ``slimray run`` / ``slimray serve`` do around deploying a finished run's winner, per model family: before,
``check_winner`` verifies the folder (spec, sha256 of every file); after, one real request is sent, the answer
compared with the model run in-process, and how to call the endpoint printed. A family names its after-deploy
check in the registry (``slimray.families``)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


def post_json(url: str, body: dict, *, key: str | None, timeout: float = 30.0, wait_s: float = 60.0) -> dict:
    """POST ``body``; while the endpoint is still coming up (connection refused) retry for ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        if key:
            req.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return json.loads(resp.read())
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def check_winner(path: str | Path) -> None:
    """Verify a model folder before serving it, image or text model alike (``DamagedArtifactError`` names the file)."""
    from slimray import families
    from slimray.storage import SPEC, DamagedArtifactError, verify_artifact

    path = Path(path)
    if not (path / SPEC).exists() and (path / "slimray_lm.json").exists():  # a causal LM: an HF folder + its meta
        _check_lm_winner(path)
        return
    verify_artifact(path)  # the spec parses as JSON and every recorded sha256 matches
    fmt = json.loads((path / SPEC).read_text()).get("format")
    family = families.for_artifact(path)
    if family.artifact_spec is None or family.artifact_format != fmt:
        known = [families.get(n).artifact_format for n in families.names() if families.get(n).artifact_spec]
        raise DamagedArtifactError(path / SPEC, f"unknown format {fmt!r} (expected one of {', '.join(map(repr, known))})")
    verify_artifact(path, family.load("artifact_spec"))  # the family's spec schema


def _check_lm_winner(path: Path) -> None:
    """A causal-LM folder: ``slimray_lm.json`` parses, and the HF folder passes the family's folder checks."""
    from slimray.families.causal_lm.artifacts import META_FILE, WEIGHT_FILES, WEIGHTS, load_meta
    from slimray.families.causal_lm.teacher import check_causal_lm_folder
    from slimray.schema import ConfigError
    from slimray.storage import DamagedArtifactError

    try:
        meta = load_meta(path)
    except (ValueError, ConfigError) as err:
        raise DamagedArtifactError(path / META_FILE, str(err).splitlines()[0]) from None
    try:
        check_causal_lm_folder(path, field="winner", weights=WEIGHT_FILES.get(meta.storage, WEIGHTS))
    except ConfigError as err:
        raise DamagedArtifactError(path / "config.json", str(err)) from None


def _key(serve_cfg: Any) -> str | None:
    from slimray.serving.http import read_api_key

    return read_api_key(env=getattr(serve_cfg, "api_key_env", "SLIMRAY_API_KEY"), file=getattr(serve_cfg, "api_key_file", None))  # the key the server checks


def check_classifier(url: str, run_dir: Path, serve_cfg: Any) -> None:
    import torch

    from slimray.families.classifier.artifacts import load_runnable
    from slimray.families.classifier.datasets import normalize
    from slimray.families.classifier.sample import read_test_sample

    model, spec = load_runnable(run_dir / "winner")
    x, labels = read_test_sample(run_dir)
    x, labels = x[:8], labels[:8]
    body = {"inputs": x.tolist()}
    sample = run_dir / "sample_request.json"
    sample.write_text(json.dumps(body))
    answer = post_json(f"{url}/v1/predict", body, key=_key(serve_cfg))
    with torch.inference_mode():
        local = model(normalize(torch.from_numpy(x), spec.input)).argmax(1).tolist()
    same = answer["predictions"] == local
    print(f"served predictions {answer['predictions']} (labels {labels.tolist()}); in-process {local}: {'same' if same else 'DIFFERENT'}")
    print(f"\nServing {url}/v1/predict  (OpenAPI: {url}/docs, health: {url}/healthz)")
    print(f"  curl -s -X POST {url}/v1/predict -H 'Content-Type: application/json' -d @{sample}")


def check_encoder(url: str, run_dir: Path, serve_cfg: Any) -> None:
    import numpy as np

    from slimray.families.sentence_encoder.models import embed_texts, load_text_artifact, load_tokenizer

    texts = ["slimray serves the distilled encoder.", "A second sentence, to check the batch."]
    answer = post_json(f"{url}/v1/embed", {"texts": texts}, key=_key(serve_cfg))
    model, spec = load_text_artifact(run_dir / "winner")
    local = embed_texts(model, load_tokenizer(run_dir / "winner", max_seq_len=spec.max_seq_len), texts, max_seq_len=spec.max_seq_len)
    served = np.asarray(answer["embeddings"], dtype=np.float32)
    cos = float(np.min(np.sum(served * local, 1) / (np.linalg.norm(served, axis=1) * np.linalg.norm(local, axis=1))))
    print(f"served embeddings {served.shape}; cosine to the in-process model's >= {cos:.4f}: {'same' if cos > 0.999 else 'DIFFERENT'}")
    print(f"\nServing {url}/v1/embed  (V2: {url}/v2/models/<name>/infer, OpenAPI: {url}/docs, health: {url}/healthz)")
    print(f"  curl -s -X POST {url}/v1/embed -H 'Content-Type: application/json' -d '{{\"texts\": [\"hello world\"]}}'")


def check_causal_lm(url: str, run_dir: Path, serve_cfg: Any) -> None:
    """One greedy completion from the endpoint compared with the same request run in-process on the winner (the
    same text expected), then how to call the endpoint (curl, the openai client)."""
    from slimray.families.causal_lm import openai as oa
    from slimray.families.causal_lm.artifacts import load_lm
    from slimray.families.causal_lm.runtime import make_session
    from slimray.families.causal_lm.serving import eos_ids

    key = _key(serve_cfg)
    req = urllib.request.Request(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"} if key else {})
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                model_id = json.loads(resp.read())["data"][0]["id"]
                break
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    num_tokens = min(16, getattr(serve_cfg, "max_tokens_limit", 16))
    body = {"model": model_id, "prompt": "The history of", "max_tokens": num_tokens, "temperature": 0}
    answer = post_json(f"{url}/v1/completions", body, key=key)
    served = answer["choices"][0]["text"]
    from slimray.families.causal_lm.artifacts import load_meta

    if load_meta(run_dir / "winner").runtime == "vllm":  # vLLM's kernels are not slimray's: no token-exact comparison
        print(f"served greedy completion by vLLM {served!r} ({answer['usage']['completion_tokens']} tokens)")
        _how_to_call(url, model_id, key)
        return
    model, tokenizer, _ = load_lm(run_dir / "winner")
    limits = oa.Limits(context_len=int(model.config.max_position_embeddings), max_tokens_limit=num_tokens)
    session = make_session(model, "static", max_cache_len=min(int(model.config.max_position_embeddings), 512))
    local = oa.complete(session, oa.parse_request("completion", body), tokenizer, model=model_id, limits=limits,
                        eos_token_ids=eos_ids(model, tokenizer))["choices"][0]["text"]
    print(f"served greedy completion {served!r} ({answer['usage']['completion_tokens']} tokens); "
          f"in-process {local!r}: {'same' if served == local else 'DIFFERENT'}")
    _how_to_call(url, model_id, key)


def _how_to_call(url: str, model_id: str, key: str | None) -> None:
    auth = " -H 'Authorization: Bearer $SLIMRAY_API_KEY'" if key else ""
    print(f"\nServing {url}/v1/completions and {url}/v1/chat/completions (OpenAI API; models: {url}/v1/models)")
    print(f"  curl -s {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} "
          f"-d '{{\"model\": \"{model_id}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}], \"max_tokens\": 32}}'")
    print(f"  python -c \"from openai import OpenAI; c = OpenAI(base_url='{url}/v1', api_key='{'KEY' if key else 'none'}'); "
          f"print(c.completions.create(model='{model_id}', prompt='The history of', max_tokens=32).choices[0].text)\"")


def check_with_codec(url: str, run_dir: Path, serve_cfg: Any) -> None:
    """Any family's check, through its codec: the run's ``sample_request.json`` (held-out examples, written by the
    shared pipeline's export stage) is sent to the native route and the answer compared with the same codec run
    in-process on the winner folder."""
    import numpy as np

    from slimray.serving.codecs import make_codec
    from slimray.serving.options import options_for_run

    options = options_for_run(run_dir, serve_config=serve_cfg)
    codec = make_codec(options)
    sample = run_dir / "sample_request.json"
    body = json.loads(sample.read_text())
    local = codec.v1_answer(codec.forward(codec.parse_v1(body)))
    route = f"{url}/v1/{codec.v1_verb}"
    answer = post_json(route, body, key=_key(serve_cfg))
    same = all(np.allclose(np.asarray(answer[k], dtype=np.float64), np.asarray(v, dtype=np.float64), rtol=1e-4, atol=1e-5)
               for k, v in local.items())
    first = next(iter(local))
    print(f"served {first} {answer[first][:4]}...; in-process {local[first][:4]}...: {'same' if same else 'DIFFERENT'}")
    print(f"\nServing {route}  (OpenAPI: {url}/docs, health: {url}/healthz)")
    print(f"  curl -s -X POST {route} -H 'Content-Type: application/json' -d @{sample}")
