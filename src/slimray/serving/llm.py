"""Causal-LM winners whose runtime is vLLM, served by Ray Serve LLM (``ray.serve.llm``): vLLM's engine in the
replicas, Ray's OpenAI-compatible ingress in front (``/v1/completions``, ``/v1/chat/completions``, streaming,
``/v1/models``), continuous batching and autoscaling theirs; slimray only maps its serve options onto one
``LLMConfig`` and adds the optional API key.

The winner folder is a standard HF folder (int8 / int4 in compressed-tensors, see
``families.causal_lm.ctformat``), passed to vLLM by path: on a multi-node cluster every node must see the run
folder at the same path (a shared volume), as for the other families.

CPU nodes: Ray Serve LLM asks each replica's placement group for ``{GPU: 1}`` unless told otherwise; with
``gpus_per_replica: 0`` the bundle is ``{CPU: num_cpus_per_replica}`` and vLLM's CPU build runs (the replica actor
itself reserves nothing, the bundle holds the cores). vLLM's CPU settings travel as environment variables of the
replica (``vllm_engine.engine_env``: no secrets). The API key is read by the ingress replica from its own
environment or a file (``api_key_env`` / ``api_key_file``), never passed through Ray, as in every slimray app.
"""

from __future__ import annotations

import os
from typing import Any

from slimray.serving.options import ServeOptions


def _keyed_ingress():
    from slimray.serving.llm_ingress import KeyedOpenAiIngress  # imports ray.serve.llm, hence vLLM: only on this path

    return KeyedOpenAiIngress


def llm_config(options: ServeOptions, *, quant_method: str):
    """The ``LLMConfig`` of the winner folder ``options.model_dir`` (stored with ``quant_method``)."""
    from ray.serve.llm import LLMConfig

    from slimray.families.causal_lm.vllm_engine import engine_env, engine_kwargs

    engine = engine_kwargs(quant_method=quant_method, max_model_len=_context_len(options), max_num_seqs=options.max_num_seqs)
    env = {**engine_env(), "OMP_NUM_THREADS": str(max(1, int(options.num_cpus_per_replica))),
           "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}  # Serve's async engine runs its core in a child process
    deployment: dict[str, Any] = {
        "max_ongoing_requests": options.max_ongoing_requests,
        "health_check_period_s": options.health_check_period_s,
        "health_check_timeout_s": options.health_check_timeout_s,
        "ray_actor_options": {"num_cpus": 0},
    }
    if options.max_replicas is not None:
        deployment["autoscaling_config"] = {
            "min_replicas": options.min_replicas if options.min_replicas is not None else 1,
            "max_replicas": options.max_replicas, "target_ongoing_requests": options.target_ongoing_requests}
    else:
        deployment["num_replicas"] = options.num_replicas
    if options.max_replicas_per_node is not None:
        deployment["max_replicas_per_node"] = options.max_replicas_per_node
    kwargs: dict[str, Any] = {}
    if options.gpus_per_replica:
        bundle = {"GPU": options.gpus_per_replica, "CPU": options.num_cpus_per_replica}
        env.pop("VLLM_CPU_OMP_THREADS_BIND")
        env.pop("VLLM_CPU_KVCACHE_SPACE")
    else:
        bundle = {"CPU": options.num_cpus_per_replica}
    kwargs["placement_group_config"] = {"bundles": [bundle]}
    return LLMConfig(model_loading_config={"model_id": options.name, "model_source": os.path.abspath(options.model_dir)},
                     engine_kwargs=engine, deployment_config=deployment, runtime_env={"env_vars": env}, **kwargs)


def _context_len(options: ServeOptions) -> int:
    """Prompt + completion tokens: ``max_context_len``, else 2048, at most the model's ``max_position_embeddings``."""
    import json
    from pathlib import Path

    config = json.loads((Path(options.model_dir) / "config.json").read_text())
    limit = int(config.get("max_position_embeddings") or 2048)
    return min(options.max_context_len or 2048, limit)


def build_vllm_app(options: ServeOptions, *, quant_method: str):
    """The Ray Serve LLM application (``build_openai_app``) for the winner, its ingress keyed when a key is set."""
    from ray.serve.llm import build_openai_app

    return build_openai_app({
        "llm_configs": [llm_config(options, quant_method=quant_method)],
        "ingress_cls_config": {"ingress_cls": _keyed_ingress(),
                               "ingress_extra_kwargs": {"api_key_env": options.api_key_env, "api_key_file": options.api_key_file}},
        "ingress_deployment_config": {"ray_actor_options": {"num_cpus": 0}, "max_ongoing_requests": max(64, options.max_ongoing_requests),
                                      "max_queued_requests": options.max_queued_requests},
    })


def vllm_runtime_of(model_dir: str) -> str | None:
    """The winner's quantization when its runtime is vLLM (then ``build_vllm_app`` serves it), else None."""
    from pathlib import Path

    from slimray.families.causal_lm.artifacts import META_FILE, load_meta

    if not (Path(model_dir) / META_FILE).exists():
        return None
    meta = load_meta(model_dir)
    return meta.quant_method if meta.runtime == "vllm" else None
