"""A causal LM served by the one Serve builder behind its OpenAI-compatible ingress, over real HTTP through Ray
Serve: the official ``openai`` client (completion, streamed chat, models), the raw SSE stream, the API key, the
bad-input table (each case a 4xx naming the field, never a 5xx), and continuous batching (concurrent greedy
requests equal their solo runs and the in-process model, and they really shared decode steps).

One Serve application (a tiny random 2-layer Llama with an offline BPE tokenizer, saved with ``save_lm``; API key
from a file) for the whole module."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from slimray.families.causal_lm import openai as oa
from slimray.families.causal_lm.artifacts import LMArtifactMeta, load_lm, save_lm
from slimray.families.causal_lm.runtime import make_session
from slimray.families.causal_lm.serving import eos_ids
from slimray.serving.app import ServeOptions, build_app
from tests.families.causal_lm.conftest import make_tokenizer

pytestmark = pytest.mark.slow

NAME = "tiny-lm"
KEY = "lm-s3cret"
PREFIX = "/lm"
LIMIT = 48  # max_tokens_limit
CONTEXT = 96  # max_context_len
PROMPTS = ["The cat sat on", "Rivers flow from the mountains to the", "A computer program is", "Bees",
           "Paris is the capital of France and a centre of art and science. The history of music", "The garden"]


def make_tiny_lm(out_dir, *, seed: int = 0):
    """A random 2-layer Llama (hidden 64) with the offline test tokenizer, written as a causal_lm artifact."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=True,
                      initializer_range=0.1, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    return save_lm(LlamaForCausalLM(cfg).eval(), tok, out_dir, meta=LMArtifactMeta())


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return make_tiny_lm(tmp_path_factory.mktemp("lm") / "winner")


@pytest.fixture(scope="module")
def served_lm(lm_dir, serve_port, tmp_path_factory):
    from ray import serve

    key_file = tmp_path_factory.mktemp("lm-secret") / "api-key"
    key_file.write_text(KEY + "\n")
    options = ServeOptions(model_dir=str(lm_dir), name=NAME, num_cpus_per_replica=0.5, api_key_file=str(key_file),
                           max_tokens_limit=LIMIT, max_context_len=CONTEXT, max_num_seqs=8, max_body_bytes=20_000)
    serve.run(build_app(options), name="lm", route_prefix=PREFIX)
    url = f"http://127.0.0.1:{serve_port}{PREFIX}"
    with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield url, client
    serve.delete("lm")


@pytest.fixture(scope="module")
def oai(served_lm):
    from openai import OpenAI

    url, _ = served_lm
    return OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def local_lm(lm_dir):
    model, tok, _ = load_lm(lm_dir)
    return model, tok


def in_process(local_lm, kind: str, body: dict) -> dict:
    """The same request run alone in-process: the one-request generator on a static-cache session."""
    model, tok = local_lm
    limits = oa.Limits(context_len=CONTEXT, max_tokens_limit=LIMIT)
    return oa.complete(make_session(model, "static", max_cache_len=CONTEXT), oa.parse_request(kind, body), tok, model=NAME,
                       limits=limits, eos_token_ids=eos_ids(model, tok))


def test_openai_client_completion(oai, local_lm):
    c = oai.completions.create(model=NAME, prompt="The cat sat on", max_tokens=12, temperature=0)
    local = in_process(local_lm, "completion", {"prompt": "The cat sat on", "max_tokens": 12, "temperature": 0})
    assert c.object == "text_completion" and c.model == NAME
    assert c.choices[0].text == local["choices"][0]["text"] and c.choices[0].finish_reason == local["choices"][0]["finish_reason"]
    assert c.usage.prompt_tokens == local["usage"]["prompt_tokens"] and c.usage.completion_tokens == local["usage"]["completion_tokens"]
    assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
    # stop strings and seeded sampling through the same route
    text = c.choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    s = oai.completions.create(model=NAME, prompt="The cat sat on", max_tokens=12, temperature=0, stop=[stop])
    assert s.choices[0].finish_reason == "stop" and s.choices[0].text == text[: text.index(stop)]
    seeded = [oai.completions.create(model=NAME, prompt="Rivers", max_tokens=10, temperature=1.0, top_p=0.9, seed=7).choices[0].text
              for _ in range(2)]
    assert seeded[0] == seeded[1] == in_process(local_lm, "completion", {"prompt": "Rivers", "max_tokens": 10, "temperature": 1.0,
                                                                        "top_p": 0.9, "seed": 7})["choices"][0]["text"]


def test_openai_client_streamed_chat(oai, local_lm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about bees"}]
    chunks = list(oai.chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and len({c.id for c in chunks}) == 1
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    local = in_process(local_lm, "chat", {"messages": messages, "max_tokens": 16, "temperature": 0})
    assert streamed == local["choices"][0]["message"]["content"] and finals == [local["choices"][0]["finish_reason"]]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == local["usage"]["completion_tokens"]
    whole = oai.chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0)
    assert whole.object == "chat.completion" and whole.choices[0].message.content == streamed


def test_completion_stream_is_server_sent_events(served_lm):
    _, client = served_lm
    body = {"model": NAME, "prompt": "The garden", "max_tokens": 8, "temperature": 0, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = "".join(r.iter_text())
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    parsed = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert parsed[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    whole = client.post("/v1/completions", json={**body, "stream": False}).json()
    assert "".join(p["choices"][0]["text"] for p in parsed) == whole["choices"][0]["text"]


def test_models_and_health(oai, served_lm):
    url, client = served_lm
    assert [m.id for m in oai.models.list().data] == [NAME]
    assert oai.models.retrieve(NAME).id == NAME
    r = client.get("/v1/models/other")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    with httpx.Client(base_url=url, timeout=30) as anonymous:  # health stays open without the key
        assert anonymous.get("/healthz").json() == {"status": "ok", "model": NAME}
        assert anonymous.get("/v2/health/ready").status_code == 200 and anonymous.get("/v2/health/live").status_code == 200
    info = client.get("/v1/replica").json()
    assert info["kind"] == "causal_lm" and info["context_len"] == CONTEXT and info["max_tokens_limit"] == LIMIT
    assert {"num_steps", "largest_step_batch", "num_generated_tokens"} <= set(info["engine"])


def test_api_key_required(served_lm):
    url, _ = served_lm
    body = {"model": NAME, "prompt": "The cat", "max_tokens": 2}
    with httpx.Client(base_url=url, timeout=30) as anonymous:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            for method, path in (("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models")):
                r = anonymous.request(method, path, json=body if method == "POST" else None, headers=headers)
                assert r.status_code == 401, (path, r.text)
                assert r.json()["error"]["code"] == "invalid_api_key"
    from openai import AuthenticationError, OpenAI

    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).completions.create(model=NAME, prompt="x", max_tokens=1)


CHAT = [{"role": "user", "content": "Hi"}]
BAD = [  # (route, body: dict or raw bytes, status, the field the error names or None)
    ("completions", {"model": NAME, "prompt": "the cat " * 60, "max_tokens": 4}, 400, "prompt"),  # longer than the context
    ("completions", {"model": NAME, "prompt": "the cat " * 20, "max_tokens": LIMIT}, 400, "max_tokens"),  # prompt + max_tokens > context
    ("completions", {"model": NAME, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("completions", {"model": NAME, "prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ("completions", {"model": NAME, "prompt": "hi", "max_tokens": LIMIT + 1}, 400, "max_tokens"),
    ("completions", {"model": NAME, "prompt": "hi", "max_tokens": "4"}, 400, "max_tokens"),
    ("completions", {"model": NAME, "prompt": "hi", "bogus": 1}, 400, "bogus"),
    ("completions", {"model": NAME, "prompt": 5}, 400, "prompt"),
    ("completions", {"model": NAME}, 400, "prompt"),
    ("completions", {"model": NAME, "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("completions", {"model": NAME, "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("completions", {"model": NAME, "prompt": "hi", "stop": [1]}, 400, "stop"),
    ("completions", {"model": NAME, "prompt": "hi", "seed": 1.5}, 400, "seed"),
    ("completions", {"model": NAME, "prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    ("completions", b"{not json", 400, None),
    ("completions", b"[1, 2]", 400, None),
    ("completions", b"", 400, None),
    ("completions", b"x" * 30_000, 413, None),  # over max_body_bytes
    ("chat/completions", {"model": NAME, "messages": []}, 400, "messages"),
    ("chat/completions", {"model": NAME, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
    ("chat/completions", {"model": NAME, "messages": [{"role": "user"}]}, 400, "messages.0.content"),
    ("chat/completions", {"model": NAME, "messages": "hi"}, 400, "messages"),
    ("chat/completions", {"model": NAME, "messages": CHAT, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ("chat/completions", {"model": NAME, "messages": CHAT, "max_tokens": 2, "max_completion_tokens": 2}, 400, None),
    ("chat/completions", {"model": NAME, "messages": CHAT, "n": 2}, 400, "n"),
    ("chat/completions", {"model": "nope", "messages": CHAT}, 404, "model"),
]


@pytest.mark.parametrize(("route", "body", "status", "param"), BAD, ids=[f"{i}-{b[0]}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_input_is_a_4xx_naming_the_field(served_lm, route, body, status, param):
    _, client = served_lm
    if isinstance(body, bytes):
        r = client.post(f"/v1/{route}", content=body, headers={"Content-Type": "application/json"})
    else:
        r = client.post(f"/v1/{route}", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    if param is not None:
        assert err["param"] == param and param in err["message"]


def test_concurrent_greedy_requests_equal_solo_and_share_steps(served_lm, local_lm):
    _, client = served_lm
    bodies = [{"model": NAME, "prompt": p, "max_tokens": 20 + 4 * i, "temperature": 0} for i, p in enumerate(PROMPTS)]
    bodies.append({"model": NAME, "prompt": "Rivers", "max_tokens": 24, "temperature": 0.8, "seed": 11})  # its own sampler

    def ask(body):
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"], r.json()["usage"]["completion_tokens"]

    alone = [ask(b) for b in bodies]  # one at a time through the endpoint
    before = client.get("/v1/replica").json()["engine"]
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(ask, bodies))
    after = client.get("/v1/replica").json()["engine"]
    assert together == alone
    local = [in_process(local_lm, "completion", {k: v for k, v in b.items() if k != "model"}) for b in bodies]
    assert [t for t, _ in alone] == [c["choices"][0]["text"] for c in local]
    assert after["largest_step_batch"] > 1  # concurrent requests ran in the same decode steps
    steps = after["num_steps"] - before["num_steps"]
    tokens = after["num_generated_tokens"] - before["num_generated_tokens"]
    assert tokens == sum(n for _, n in together) and steps < tokens - len(bodies)  # fewer forwards than tokens


def test_serve_check_compares_with_the_in_process_model(served_lm, lm_dir, capsys, tmp_path_factory):
    """What `slimray serve RUN` runs after deploying a causal_lm winner: one greedy completion, same text as in-process."""
    from slimray.config import ServeConfig
    from slimray.serving.checks import check_causal_lm

    url, _ = served_lm
    key_file = tmp_path_factory.mktemp("check-secret") / "key"
    key_file.write_text(KEY)
    check_causal_lm(url, lm_dir.parent, ServeConfig(api_key_file=str(key_file)))
    out = capsys.readouterr().out
    assert ": same" in out and "DIFFERENT" not in out
    assert f"{url}/v1/chat/completions" in out and "from openai import OpenAI" in out and "Authorization: Bearer" in out


def test_metrics_reach_prometheus(served_lm, ray_session):
    """The replica's request counters, step batch sizes and generated tokens appear on the node's Prometheus endpoint."""
    import time

    _, client = served_lm
    client.post("/v1/completions", json={"model": NAME, "prompt": "The cat", "max_tokens": 3})
    client.post("/v1/completions", json={"model": NAME, "prompt": "The cat", "max_tokens": 0})
    port = ray_session._private.worker.global_worker.node.metrics_export_port
    wanted = ("ray_slimray_requests", "ray_slimray_request_errors", "ray_slimray_batch_size", "ray_slimray_generated_tokens")

    def counted_400(text: str) -> bool:
        return any(line.startswith("ray_slimray_request_errors") and 'status="400"' in line and 'route="/v1/completions"' in line
                   for line in text.splitlines())

    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:  # metrics are exported every few seconds
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if all(w in text for w in wanted) and counted_400(text):
            break
        time.sleep(1)
    assert not [w for w in wanted if w not in text] and counted_400(text)
