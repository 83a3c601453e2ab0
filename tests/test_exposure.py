"""Endpoints reachable from outside need a key (``slimray.exposure``): the RayService manifest check, the
``--host`` warning, and the post-deploy self-check sending the key named by ``serve.api_key_env``. No Ray."""

from __future__ import annotations

import copy
import http.server
import io
import json
import threading
from pathlib import Path

import pytest
import yaml

from slimray.exposure import is_loopback, manifest_problems, warn_if_exposed

RAYSERVICE = Path(__file__).resolve().parents[1] / "cluster" / "kuberay" / "rayservice.yaml"


def _service() -> dict:
    return yaml.safe_load(RAYSERVICE.read_text())


def _key_refs(doc: dict) -> list[dict]:
    spec = doc["spec"]["rayClusterConfig"]
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    return [e["valueFrom"]["secretKeyRef"] for t in templates for c in t["spec"]["containers"] for e in c["env"]
            if e["name"] == "SLIMRAY_API_KEY"]


def _set_host(doc: dict, host: str) -> dict:
    serve = yaml.safe_load(doc["spec"]["serveConfigV2"])
    serve["http_options"]["host"] = host
    doc["spec"]["serveConfigV2"] = yaml.safe_dump(serve)
    return doc


def test_shipped_rayservice_requires_its_key_secret():
    doc = _service()
    assert _key_refs(doc) and all(ref["optional"] is False for ref in _key_refs(doc))
    assert manifest_problems(doc) == []


def test_manifest_check_refuses_an_optional_key_secret_with_a_non_loopback_bind():
    doc = copy.deepcopy(_service())
    for ref in _key_refs(doc):
        ref["optional"] = True
    problems = manifest_problems(doc)
    assert len(problems) == len(_key_refs(doc)) and all("optional: true" in p and "0.0.0.0" in p for p in problems)
    assert manifest_problems(_set_host(doc, "127.0.0.1")) == []  # loopback only: nothing reachable from outside


def test_manifest_check_refuses_a_missing_or_inline_key():
    doc = copy.deepcopy(_service())
    head = doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["env"] = [e for e in head["env"] if e["name"] != "SLIMRAY_API_KEY"]
    worker = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    worker["env"] = [{"name": "SLIMRAY_API_KEY", "value": "hunter2"}]
    problems = manifest_problems(doc)
    assert any("no SLIMRAY_API_KEY" in p for p in problems) and any("written into the manifest" in p for p in problems)


@pytest.mark.parametrize("host,loop", [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("localhost", True),
                                       ("0.0.0.0", False), ("::", False), ("10.1.2.3", False), ("example.org", False)])
def test_is_loopback(host, loop):
    assert is_loopback(host) is loop


def test_non_loopback_host_without_a_key_warns_once(monkeypatch):
    monkeypatch.delenv("MY_KEY", raising=False)
    out = io.StringIO()
    assert warn_if_exposed(host="0.0.0.0", api_key_env="MY_KEY", stream=out)
    assert len(out.getvalue().strip().splitlines()) == 1 and "0.0.0.0" in out.getvalue() and "MY_KEY" in out.getvalue()
    monkeypatch.setenv("MY_KEY", "s3cret")
    out = io.StringIO()
    assert warn_if_exposed(host="0.0.0.0", api_key_env="MY_KEY", stream=out) is None and out.getvalue() == ""
    assert warn_if_exposed(host="127.0.0.1", api_key_env="UNSET_KEY", stream=out) is None


def test_self_check_sends_the_key_named_by_api_key_env(monkeypatch):
    from slimray.serving.checks import post_json as _post_json

    seen: list[str | None] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            seen.append(self.headers.get("Authorization"))
            body = json.dumps({"predictions": [1]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("SLIMRAY_API_KEY", "not-this-one")
        monkeypatch.setenv("TEAM_KEY", "this-one")
        url = f"http://127.0.0.1:{server.server_address[1]}/v1/predict"
        from slimray.serving.http import read_api_key

        key = read_api_key(env="TEAM_KEY", file=None)  # what _check_and_wait reads for serve.api_key_env: TEAM_KEY
        assert _post_json(url, {"inputs": [[0.0]]}, key=key, timeout=5) == {"predictions": [1]}
    finally:
        server.shutdown()
        server.server_close()
    assert seen == ["Bearer this-one"]
