"""Is an endpoint reachable from outside this host, and is it then protected by an API key?

* ``warn_if_exposed(host=..., api_key_env=...)``: one warning line when ``slimray serve --host`` binds a
  non-loopback address while the environment variable that holds the API key is unset (the endpoint
  would answer anyone who can reach it).
* ``manifest_problems(doc)``: for a KubeRay RayService manifest, what would leave the endpoint open: a
  non-loopback bind with the API key from a Secret marked ``optional: true`` (a missing Secret then
  starts the pods without a key), no key at all, or a key written into the manifest itself.
Pure python: no ray import.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from typing import Any, Iterator

import yaml

DEFAULT_KEY_ENV = "SLIMRAY_API_KEY"


def is_loopback(host: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``; an unset host is not assumed to be loopback."""
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: may resolve to anything


def warn_if_exposed(*, host: str, api_key_env: str = DEFAULT_KEY_ENV, api_key_file: str | None = None, stream=None) -> str | None:
    """Print (and return) a one-line warning when ``host`` is not loopback and no key is set (``$api_key_env``
    unset and no ``api_key_file``: the replica fails closed on an unreadable file)."""
    if is_loopback(host) or os.environ.get(api_key_env) or api_key_file:
        return None
    msg = (f"slimray: WARNING: binding {host} without an API key (${api_key_env} is unset): anyone who can reach "
           f"this host can call the endpoint; set {api_key_env} or bind 127.0.0.1")
    print(msg, file=stream or sys.stderr, flush=True)
    return msg


def _containers(cluster_spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(group name, pod spec, container) for the head and every worker group."""
    groups = [("head", cluster_spec.get("headGroupSpec", {}))]
    groups += [(g.get("groupName", "worker"), g) for g in cluster_spec.get("workerGroupSpecs", [])]
    for name, group in groups:
        pod = (group.get("template") or {}).get("spec") or {}
        for c in pod.get("containers", []):
            yield name, pod, c


def manifest_problems(doc: dict[str, Any]) -> list[str]:
    """What leaves a RayService's endpoint open (empty when nothing does); other kinds have none."""
    if doc.get("kind") != "RayService":
        return []
    spec = doc.get("spec") or {}
    serve = spec.get("serveConfigV2") or ""
    serve = yaml.safe_load(serve) if isinstance(serve, str) else serve
    host = ((serve or {}).get("http_options") or {}).get("host")
    if is_loopback(host):
        return []
    key_envs = {((app.get("args") or {}).get("api_key_env") or DEFAULT_KEY_ENV) for app in (serve or {}).get("applications", [])}
    key_envs = key_envs or {DEFAULT_KEY_ENV}
    problems = []
    for group, pod, c in _containers(spec.get("rayClusterConfig") or {}):
        where = f"{group} container {c.get('name', '?')}"
        env = {e.get("name"): e for e in c.get("env", []) if isinstance(e, dict)}
        for key_env in sorted(key_envs):
            e = env.get(key_env)
            if e is None:
                problems.append(f"{where}: binds {host or '(unset host)'} but has no {key_env}: the endpoint is open")
                continue
            if "value" in e:
                problems.append(f"{where}: {key_env} is written into the manifest; read it from a Secret")
                continue
            ref = (e.get("valueFrom") or {}).get("secretKeyRef")
            if ref is None:
                problems.append(f"{where}: {key_env} does not come from a Secret (secretKeyRef)")
            elif ref.get("optional", False):
                problems.append(
                    f"{where}: {key_env} comes from Secret {ref.get('name')!r} marked optional: true while binding "
                    f"{host or '(unset host)'}: a missing Secret leaves the endpoint open; set optional: false"
                )
        for v in pod.get("volumes", []):
            if (v.get("secret") or {}).get("optional", False):
                problems.append(f"{group}: Secret volume {v.get('name')!r} is optional while binding {host}: set optional: false")
    return problems
