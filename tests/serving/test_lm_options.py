"""Serving a causal LM without Ray: the text-generation limits in the one serve schema (ServeConfig -> ServeOptions),
a causal_lm run folder through ``options_for_run`` / ``check_winner`` / ``make_codec`` (what ``slimray serve RUN``
does), the codec's probe and description, the family's ingress hook, and the OpenAI ingress in-process."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from slimray.config import ServeConfig
from slimray.serving.options import ServeOptions, options_for_run
from tests.serving.test_openai_lm import make_tiny_lm


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """A causal_lm run folder as far as serving reads it: RUN/winner = a save_lm folder."""
    run = tmp_path_factory.mktemp("lm-run")
    make_tiny_lm(run / "winner")
    return run


def test_lm_limits_are_validated_in_both_schemas():
    for cls, base in ((ServeOptions, {"model_dir": "/x"}), (ServeConfig, {})):
        d = cls(**base)
        assert (d.max_tokens_limit, d.default_max_tokens, d.max_num_seqs, d.max_context_len) == (512, 16, 8, None)
        for bad, match in (({"default_max_tokens": 600}, "must not exceed max_tokens_limit"), ({"max_num_seqs": 0}, "max_num_seqs"),
                           ({"max_context_len": 1}, "max_context_len"), ({"max_tokens_limit": "many"}, "max_tokens_limit")):
            with pytest.raises(ValidationError, match=match):
                cls(**base, **bad)


def test_a_causal_lm_run_folder_serves_through_options_for_run(lm_run):
    from slimray.serving.checks import check_winner
    from slimray.families.causal_lm.serving import CausalLMCodec
    from slimray.serving.codecs import make_codec
    from slimray.serving.protocols import build_api, ingress_for

    check_winner(lm_run / "winner")
    cfg = ServeConfig(max_num_seqs=4, max_tokens_limit=64, default_max_tokens=8, max_context_len=200)
    options = options_for_run(lm_run, serve_config=cfg, name="tiny")
    assert options.model_dir == str(lm_run / "winner") and options.kind is None  # the artifact names its family
    assert (options.max_num_seqs, options.max_tokens_limit, options.default_max_tokens, options.max_context_len) == (4, 64, 8, 200)
    codec = make_codec(options)
    assert isinstance(codec, CausalLMCodec) and codec.kind == "causal_lm"
    assert (codec.limits.context_len, codec.limits.max_tokens_limit, codec.limits.default_max_tokens) == (200, 64, 8)
    assert codec.engine.max_num_seqs == 4
    assert codec.healthy(codec.forward(codec.probe()))
    info = codec.describe()
    assert info["quantization"] == "none" and info["context_len"] == 200 and info["chat_template"] and info["num_layers"] == 2
    assert ingress_for(codec).__name__ == "build_openai_api"
    assert ingress_for(type("Tensor", (), {"ingress": "slimray.serving.protocols:build_api"})()) is build_api
    # the model's own context caps max_context_len
    assert make_codec(options.model_copy(update={"max_context_len": 10_000})).limits.context_len == 256


def test_a_damaged_lm_winner_is_refused_naming_the_file(lm_run, tmp_path):
    import shutil

    from slimray.serving.checks import check_winner
    from slimray.storage import DamagedArtifactError

    bad = tmp_path / "winner"
    shutil.copytree(lm_run / "winner", bad)
    (bad / "slimray_lm.json").write_text(json.dumps({"format": "slimray.causal_lm/1", "quant_method": "int3"}))
    with pytest.raises(DamagedArtifactError, match="slimray_lm.json"):
        check_winner(bad)


def test_the_openai_ingress_in_process(lm_run):
    """The ingress on a ModelServer outside Serve (no metrics, no Ray): a completion, a stream, errors, the key."""
    from fastapi.testclient import TestClient

    from slimray.serving.model import ModelServer
    from slimray.serving.openai_api import build_openai_api

    server = ModelServer(ServeOptions(model_dir=str(lm_run / "winner"), name="tiny", max_tokens_limit=32))
    try:
        client = TestClient(build_openai_api(server, api_key="k"), headers={"Authorization": "Bearer k"})
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "The cat", "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 5
        with client.stream("POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                                                                 "stream": True}) as s:
            assert s.headers["content-type"].startswith("text/event-stream") and "".join(s.iter_text()).endswith("data: [DONE]\n\n")
        r = client.post("/v1/completions", json={"prompt": "The cat", "max_tokens": 33})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        assert client.get("/nowhere").status_code == 404 and "error" in client.get("/nowhere").json()
        assert client.get("/v2/models/tiny/ready").json() == {"name": "tiny", "ready": True}
        assert client.get("/v2/models/other/ready").status_code == 404
        assert TestClient(build_openai_api(server, api_key="k")).get("/v1/models").status_code == 401
        assert client.get("/v1/replica").json()["engine"]["num_finished"] == 2
    finally:
        server.codec.engine.close()


def _yaml(name: str) -> dict:
    from pathlib import Path

    import yaml

    return yaml.safe_load((Path(__file__).resolve().parents[2] / "serve" / name).read_text())


def _check_serve_schema(config: dict):
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

    assert set(config) <= set(ServeDeploySchema.model_fields)
    for app in config["applications"]:
        assert set(app) <= set(ServeApplicationSchema.model_fields), set(app) - set(ServeApplicationSchema.model_fields)
    return ServeDeploySchema.model_validate(config)


def test_cpu_serve_config_builds_the_app():
    from ray import serve

    from slimray.serving.app import app_builder

    config = _yaml("smollm.yaml")
    (app,) = _check_serve_schema(config).applications
    assert app.import_path == "slimray.serving.app:app_builder"
    args = config["applications"][0]["args"]
    options = ServeOptions.model_validate(args)
    assert options.kind == "causal_lm" and options.max_ongoing_requests >= options.max_num_seqs
    assert isinstance(app_builder(args), serve.Application)  # binds, deploys nothing


def test_gpu_serve_config_matches_ray_serve_llm_schemas():
    """serve/smollm-vllm.yaml against the installed Ray 2.60: Serve's deploy schema and ``ray.serve.llm``'s own
    builder arguments (``LLMServingArgs``, which validates each ``LLMConfig``; vLLM's CPU build is installed, so the
    public module imports; ``engine_kwargs`` go to vLLM unchecked)."""
    from pathlib import Path

    pytest.importorskip("vllm")
    from ray.serve.llm import LLMServingArgs, build_openai_app
    from ray.serve.schema import DeploymentSchema

    config = _yaml("smollm-vllm.yaml")
    (app,) = _check_serve_schema(config).applications
    assert app.import_path == "ray.serve.llm:build_openai_app" and callable(build_openai_app)
    args = LLMServingArgs.model_validate(config["applications"][0]["args"])
    for raw, llm in zip(config["applications"][0]["args"]["llm_configs"], args.llm_configs):
        assert set(raw["deployment_config"]) <= set(DeploymentSchema.model_fields)
        assert llm.model_id == "smollm" and Path(llm.model_loading_config.model_source).name == "winner"
