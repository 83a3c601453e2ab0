"""The ``vllm`` runtime of the causal-LM search, without starting an engine: which candidates it gets, the engine
arguments per stored format, the config check when vLLM is missing, and the Ray Serve LLM config a vLLM winner is
served with (CPU placement, no secret in it)."""

from __future__ import annotations

import json

import pytest

from slimray.families.causal_lm import vllm_engine
from slimray.schema import ConfigError


def test_the_grid_gives_vllm_only_the_dense_folders_it_loads():
    from slimray.families.causal_lm.search import candidate_grid

    grid = candidate_grid(["teacher", "student"], sparsities=["none", "2:4"],
                          quant_methods=["none", "bf16", "token_int8", "dynamic_int8", "int4_weight_only"],
                          runtimes=["hf_eager", "vllm"], compiled_quant_methods=[], sparse_quant_methods=["token_int8"])
    in_vllm = sorted(k for k, v in grid.items() if v[2] == "vllm")
    assert in_vllm == sorted(f"{m}-{q}-vllm" for m in ("teacher", "student") for q in ("none", "bf16", "token_int8", "int4_weight_only"))
    assert not [k for k, v in grid.items() if v[2] == "vllm" and v[3] != "none"]  # slimray's sparse packing is not vLLM's
    assert "teacher-2of4-token_int8-hf_eager" in grid


@pytest.mark.parametrize("quant, dtype", [("none", "float32"), ("bf16", "bfloat16"), ("token_int8", "bfloat16"),
                                          ("int4_weight_only", "bfloat16")])
def test_engine_kwargs_per_stored_format(quant, dtype):
    kw = vllm_engine.engine_kwargs(quant_method=quant, max_model_len=512, max_num_seqs=4)
    assert kw == {"dtype": dtype, "max_model_len": 512, "enforce_eager": True, "enable_prefix_caching": False, "seed": 0,
                  "max_num_seqs": 4}


def test_methods_vllm_does_not_load_are_refused():
    with pytest.raises(ValueError, match="dynamic_int8"):
        vllm_engine.dtype_for("dynamic_int8")


def test_config_names_the_field_when_vllm_is_missing(monkeypatch):
    from slimray.families.causal_lm.config import LMPipelineConfig, lm_recipe_path

    import yaml

    raw = yaml.safe_load(lm_recipe_path("smollm-tiny").read_text())
    raw["search"]["runtimes"] = ["hf_eager", "vllm"]
    monkeypatch.setattr(vllm_engine, "vllm_available", lambda: False)
    with pytest.raises((ConfigError, ValueError), match=r"search\.runtimes.*vllm"):
        LMPipelineConfig.from_dict(raw, source="test")


def test_served_llm_config_places_a_cpu_replica_and_carries_no_secret(tmp_path, monkeypatch):
    pytest.importorskip("vllm")
    from slimray.serving.llm import llm_config
    from slimray.serving.options import ServeOptions

    monkeypatch.setenv("SLIMRAY_API_KEY", "secret-not-in-config")
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 8192}))
    opts = ServeOptions(model_dir=str(tmp_path), name="lm", num_cpus_per_replica=1, max_replicas=2, min_replicas=1, ingress="proxy",
                        max_num_seqs=4, max_context_len=512)
    cfg = llm_config(opts, quant_method="token_int8")
    assert cfg.placement_group_config == {"bundles": [{"CPU": 1.0}]}
    assert cfg.deployment_config["autoscaling_config"]["max_replicas"] == 2
    assert cfg.engine_kwargs["dtype"] == "bfloat16" and cfg.engine_kwargs["max_num_seqs"] == 4
    assert cfg.runtime_env["env_vars"]["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    assert "secret-not-in-config" not in repr(cfg.model_dump())
    gpu = llm_config(opts.model_copy(update={"gpus_per_replica": 1.0}), quant_method="bf16")
    assert gpu.placement_group_config == {"bundles": [{"GPU": 1.0, "CPU": 1.0}]}


def test_a_failed_trial_says_what_to_change():
    """vLLM's CPU build without its AVX512 int4 kernel (seen on an AVX2-only EPYC) gets a line naming the setting."""
    from slimray.families.causal_lm.search import trial_advice

    missing = "AttributeError(\"'_OpNamespace' '_C' object has no attribute 'cpu_gemm_wna16'\")"
    assert "no int4 (W4A16) kernel on this CPU" in trial_advice(missing, quant="int4_weight_only", runtime="vllm")
    assert trial_advice("RuntimeError('boom')", quant="bf16", runtime="vllm") == (
        "leave bf16 out of search.quant_methods (or vllm out of search.runtimes)")
