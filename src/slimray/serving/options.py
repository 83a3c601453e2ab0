"""The one serve schema (any model kind), and what it turns into on Ray Serve.

``ServeConfig`` is how a model is served: the ``serve:`` section of every run config and recipe (the families
subclass it only to change defaults), what ``slimray serve`` reads back from a run, and, as ``ServeOptions``
(the same fields plus ``model_dir`` / ``name`` / ``kind``), the ``args`` of ``serve/*.yaml`` and what a replica
gets. It is validated strictly (unknown keys refused) and in full where it is loaded, each check naming its
field; ``deployment_options`` maps it onto ``serve.deployment`` keyword arguments. Secrets never pass through
here: ``api_key_env`` and ``api_key_file`` only *name* where the replica finds the key (its own environment, or a
file such as a mounted Kubernetes Secret).
``options_for_run`` fills the options from a finished run folder (image or text run), with overrides that win
only when given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, ValidationInfo, field_validator

from slimray.schema import StrictModel

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"

# text generation limits (causal_lm)
LM_MAX_TOKENS_LIMIT = 512
LM_DEFAULT_MAX_TOKENS = 16
LM_MAX_NUM_SEQS = 8
MAX_TOKENS_LIMIT_DOC = "causal_lm: the most tokens one request may generate (max_tokens above it: 400)"
DEFAULT_MAX_TOKENS_DOC = "causal_lm: tokens /v1/completions generates when max_tokens is absent (chat: what fits)"
MAX_NUM_SEQS_DOC = ("causal_lm: most sequences one decode step runs (continuous batching); later requests wait. Keep "
                    "max_ongoing_requests at least this, or steps never fill")
MAX_CONTEXT_LEN_DOC = "causal_lm: prompt + completion tokens at most; None: the model's max_position_embeddings"


_NEEDS_PROXY = {
    "max_replicas": "max_replicas (autoscaling) needs ingress: proxy (the direct ingress bypasses the request counts Serve's "
                    "autoscaler reads)",
    "max_replicas_per_node": "max_replicas_per_node spreads replicas over nodes: use ingress: proxy (the direct ingress "
                             "serves one node)",
}


class ServeConfig(StrictModel):
    """How a model is served: the one serve schema of run configs (``serve:``), recipes, ``slimray serve`` and the
    ``args`` of ``serve/*.yaml`` (there as ``ServeOptions``, which adds the model folder). Every check lives here and
    names its field, so a bad value fails when the config loads, before any stage runs."""

    ingress: Literal["direct", "proxy"] = Field(
        "direct",
        description="direct: each replica serves HTTP (and gRPC) itself on host:port, several replicas on one node share "
                    "the port (single node; fastest); proxy: Ray Serve's HTTP proxy on host:port routes to the replicas "
                    "(clusters, autoscaling). What each binds: docs/serving-ingress.md",
    )
    host: str = Field("127.0.0.1", description="bind address; 0.0.0.0 exposes the endpoint")
    port: int = Field(8000, ge=1, le=65535)
    route_prefix: str = "/"
    grpc_port: int | None = Field(
        None, ge=1, le=65535,
        description="OIP v2 GRPCInferenceService on this port; None: no gRPC. ingress direct: the replicas bind host:PORT; "
                    "ingress proxy: Ray 2.60's gRPC proxy binds every interface ([::]:PORT), whatever `host` says",
    )
    # placement and scaling
    num_replicas: PositiveInt = Field(1, description="fixed replica count (ignored when max_replicas is set)")
    max_replicas: PositiveInt | None = Field(None, description="turns autoscaling on: replicas between min and max (ingress proxy)")
    min_replicas: NonNegativeInt | None = Field(None, description="autoscaling lower bound (needs max_replicas)")
    target_ongoing_requests: PositiveFloat = Field(2.0, description="autoscaling target of requests per replica")
    num_cpus_per_replica: float = Field(1.0, ge=0)
    gpus_per_replica: float = Field(0.0, ge=0, description="GPUs per replica; fractions below 1 share a GPU")
    max_replicas_per_node: PositiveInt | None = Field(None, description="1 = one replica per node (e.g. per GPU node; ingress proxy)")
    num_threads: PositiveInt = 1
    # batching
    max_batch_size: PositiveInt = Field(16, description="most examples one batched forward pass takes")
    batch_wait_timeout_s: float = Field(0.002, ge=0, le=10, description="how long a batch waits to fill up")
    forward_in_thread: bool = Field(True, description="run the forward pass off the replica's event loop")
    # limits
    max_batch_examples: PositiveInt = Field(1024, description="most examples (or texts) one request may send (413 above)")
    max_text_chars: PositiveInt = Field(4096, description="longest text accepted, in characters (422 above)")
    max_body_bytes: PositiveInt = 16 * 1024 * 1024
    max_ongoing_requests: PositiveInt = Field(16, description="requests one replica works on at once")
    max_queued_requests: int = Field(256, ge=-1, description="requests waiting for a replica before 503; -1: no limit")
    request_timeout_s: PositiveFloat | None = Field(None, description="HTTP timeout (408); set on the proxy by deploy()")
    health_check_period_s: PositiveFloat = 5.0
    health_check_timeout_s: PositiveFloat = 30.0
    # the API key: the replica reads it itself (never copied into the deployment)
    api_key_env: str = Field("SLIMRAY_API_KEY", description="environment variable (of the replica) holding an optional API key")
    api_key_file: str | None = Field(None, description="file holding the API key (e.g. a mounted Secret); wins over api_key_env")
    access_log: bool = Field(False, description="log every request in the replica (costs CPU under load)")
    # text generation (causal_lm; ignored by the other families)
    max_tokens_limit: PositiveInt = Field(LM_MAX_TOKENS_LIMIT, description=MAX_TOKENS_LIMIT_DOC)
    default_max_tokens: PositiveInt = Field(LM_DEFAULT_MAX_TOKENS, description=DEFAULT_MAX_TOKENS_DOC, validate_default=True)
    max_num_seqs: PositiveInt = Field(LM_MAX_NUM_SEQS, description=MAX_NUM_SEQS_DOC)
    max_context_len: PositiveInt | None = Field(None, description=MAX_CONTEXT_LEN_DOC)

    # Checks between fields are field validators of the later field, so the error names the field (serve.min_replicas),
    # not the whole section.
    @field_validator("grpc_port")
    @classmethod
    def _distinct_ports(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and v == info.data.get("port"):
            raise ValueError(f"grpc_port must differ from port (both {v})")
        return v

    @field_validator("max_replicas", "max_replicas_per_node")
    @classmethod
    def _needs_proxy(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and info.data.get("ingress") == "direct":
            raise ValueError(_NEEDS_PROXY[info.field_name])
        return v

    @field_validator("min_replicas")
    @classmethod
    def _min_replicas(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is None:
            return v
        top = info.data.get("max_replicas")
        if top is None:
            raise ValueError("min_replicas needs max_replicas (autoscaling); for a fixed count use num_replicas")
        if v > top:
            raise ValueError(f"min_replicas ({v}) must not exceed max_replicas ({top})")
        return v

    @field_validator("gpus_per_replica")
    @classmethod
    def _gpus(cls, v: float) -> float:
        if v > 1 and not float(v).is_integer():
            raise ValueError("gpus_per_replica above 1 must be a whole number (fractions only below 1)")
        return v

    @field_validator("default_max_tokens")
    @classmethod
    def _default_tokens(cls, v: int, info: ValidationInfo) -> int:
        top = info.data.get("max_tokens_limit")
        if top is not None and v > top:
            raise ValueError(f"default_max_tokens ({v}) must not exceed max_tokens_limit ({top})")
        return v

    @field_validator("max_context_len")
    @classmethod
    def _context(cls, v: int | None) -> int | None:
        if v is not None and v < 2:
            raise ValueError("max_context_len must leave room for a prompt token and a generated one (>= 2)")
        return v


class ServeOptions(ServeConfig):
    """``ServeConfig`` plus which model: the folder to serve and its name (``slimray serve`` / ``slimray run`` fill
    them from the run; a ``serve deploy`` config gives them in its application's ``args``)."""

    model_dir: str = Field(description="artifact folder (model.safetensors + spec.json) to serve")
    name: str = Field("slimray", pattern=NAME_PATTERN, description="model and application name (the V2 model name)")
    kind: str | None = Field(None, description="model kind (a codec in slimray.serving.codecs); default: the artifact's")


def deployment_options(options: ServeOptions) -> dict[str, Any]:
    """``serve.deployment`` keyword arguments for ``options`` (placement, scaling, limits, health checks).
    No runtime_env: in particular the API key is never copied into the deployment."""
    actor_options: dict[str, Any] = {"num_cpus": options.num_cpus_per_replica}
    if options.gpus_per_replica:
        actor_options["num_gpus"] = options.gpus_per_replica
    kwargs: dict[str, Any] = {
        "name": options.name,
        "ray_actor_options": actor_options,
        "max_ongoing_requests": options.max_ongoing_requests,
        "max_queued_requests": options.max_queued_requests,
        "health_check_period_s": options.health_check_period_s,
        "health_check_timeout_s": options.health_check_timeout_s,
        "logging_config": {"enable_access_log": options.access_log},
    }
    if options.max_replicas is not None:
        kwargs["autoscaling_config"] = {
            "min_replicas": options.min_replicas if options.min_replicas is not None else 1,
            "max_replicas": options.max_replicas,
            "target_ongoing_requests": options.target_ongoing_requests,
        }
    else:
        kwargs["num_replicas"] = options.num_replicas
    if options.max_replicas_per_node is not None:
        kwargs["max_replicas_per_node"] = options.max_replicas_per_node
    return kwargs


def options_for_run(run_dir: str | Path, *, serve_config: Any = None, name: str | None = None, **overrides: Any) -> ServeOptions:
    """Options serving the winner of a finished run (image or text): ``serve_config`` is the run's serve section
    (None: read from ``run_dir/config.json``); ``overrides`` that are not None win over it."""
    run_dir = Path(run_dir)
    if serve_config is None:
        from slimray import families

        cfg: Any = families.for_artifact(run_dir / "winner").load("config").from_file(run_dir / "config.json")
        serve_config, name = cfg.serve, name or cfg.name
    opts = {**serve_config.model_dump(), "model_dir": str(run_dir / "winner"), "name": name or run_dir.name}
    opts.update({k: v for k, v in overrides.items() if v is not None})
    return ServeOptions.from_dict(opts, source=f"the serve options of {run_dir}")
