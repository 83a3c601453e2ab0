"""The OpenAI-compatible routes of a causal LM through the direct ingress (the replica's own server, loopback, under
a route prefix): test_openai_lm.py's client, SSE, API-key and bad-input tests, imported and run against a direct
deployment of the same tiny Llama. Marked ``long`` (another LM replica, ~25 s on 2 cores): `make test` stays under
its 20 minutes; `make test-long` (CI's second step) runs it."""

from __future__ import annotations

import httpx
import pytest

from slimray.serving.app import ServeOptions, build_app, deploy
from tests.serving.conftest import free_port
from tests.serving.test_openai_lm import (  # noqa: F401  (collected here again, with this module's `served_lm`)
    CONTEXT,
    KEY,
    LIMIT,
    NAME,
    PREFIX,
    lm_dir,
    local_lm,
    oai,
    test_api_key_required,
    test_bad_input_is_a_4xx_naming_the_field,
    test_completion_stream_is_server_sent_events,
    test_models_and_health,
    test_openai_client_completion,
    test_openai_client_streamed_chat,
)

pytestmark = [pytest.mark.slow, pytest.mark.long]


@pytest.fixture(scope="module")
def served_lm(lm_dir, serve_ports, tmp_path_factory):  # serve_ports first: the package's Serve keeps its proxies
    from ray import serve

    key_file = tmp_path_factory.mktemp("lm-secret") / "api-key"
    key_file.write_text(KEY + "\n")
    options = ServeOptions(model_dir=str(lm_dir), name=NAME, num_cpus_per_replica=0.5, api_key_file=str(key_file),
                           max_tokens_limit=LIMIT, max_context_len=CONTEXT, max_num_seqs=8, max_body_bytes=20_000)
    port = free_port()
    url = deploy(build_app(options), name="lm-direct", port=port, route_prefix=PREFIX, ingress="direct")
    assert url == f"http://127.0.0.1:{port}{PREFIX}"
    with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield url, client
    serve.delete("lm-direct")


def test_options_on_the_openai_routes(served_lm):
    _, client = served_lm
    r = client.options("/v1/completions")
    assert r.status_code == 204 and set(r.headers["allow"].split(", ")) == {"POST", "OPTIONS"}
