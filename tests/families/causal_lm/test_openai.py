"""OpenAI-compatible request validation, sampling, stop strings, and response/stream shapes checked with the
official ``openai`` client's types."""

from __future__ import annotations

import json

import pytest
import torch
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from slimray.families.causal_lm import openai as oa
from slimray.families.causal_lm.runtime import make_session

LIMITS = oa.Limits(context_len=128, max_tokens_limit=64)


def _session(model):
    return make_session(model, "static", max_cache_len=LIMITS.context_len)


@pytest.mark.parametrize(("kind", "body", "match"), [
    ("completion", {"prompt": "hi", "max_tokens": 4, "foo": 1}, "foo: unknown field"),
    ("completion", {"prompt": "hi", "max_tokens": "4"}, "max_tokens"),
    ("completion", {"prompt": 5}, "prompt"),
    ("completion", {"prompt": ""}, "prompt"),
    ("completion", {"prompt": "hi", "temperature": 3}, "temperature"),
    ("completion", {"prompt": "hi", "top_p": 0}, "top_p"),
    ("completion", {"prompt": "hi", "n": 2}, "n"),
    ("completion", {"prompt": "hi", "stream": "yes"}, "stream"),
    ("completion", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("completion", {}, "prompt: Field required"),
    ("chat", {"messages": []}, "messages"),
    ("chat", {"messages": [{"role": "robot", "content": "x"}]}, "role"),
    ("chat", {"messages": [{"role": "user"}]}, "content"),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "max_completion_tokens": 2}, "not both"),
    ("chat", "[1, 2]", "JSON object"),
    ("chat", b"{not json", "not valid JSON"),
])
def test_bad_requests(kind, body, match):
    with pytest.raises(oa.RequestError, match=match) as err:
        oa.parse_request(kind, body)
    assert err.value.status == 400
    assert err.value.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(("body", "match", "param"), [
    ({"prompt": "hi", "max_tokens": 0}, "at least 1", "max_tokens"),
    ({"prompt": "hi", "max_tokens": -3}, "at least 1", "max_tokens"),
    ({"prompt": "hi", "max_tokens": 65}, "over this server's limit of 64", "max_tokens"),
    ({"prompt": "the cat " * 200}, "context is 128 tokens", "prompt"),
    ({"prompt": "the cat " * 40, "max_tokens": 64}, "exceeds this model's context", "max_tokens"),
])
def test_limits(tiny_tokenizer, body, match, param):
    req = oa.parse_request("completion", body)
    with pytest.raises(oa.RequestError, match=match) as err:
        oa.prepare(req, tiny_tokenizer, limits=LIMITS)
    assert err.value.status == 400 and err.value.param == param


def test_prepare_defaults_and_chat_template(tiny_tokenizer):
    p = oa.prepare(oa.parse_request("completion", {"prompt": "The cat", "stop": "\n"}), tiny_tokenizer, limits=LIMITS)
    assert p.max_tokens == 16 and p.stop == ["\n"] and not p.chat
    chat = oa.parse_request("chat", {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]})
    p = oa.prepare(chat, tiny_tokenizer, limits=LIMITS)
    assert p.chat and p.prompt_text.endswith("<|im_start|>assistant\n") and "<|im_start|>system\nBe brief.<|im_end|>" in p.prompt_text
    assert p.max_tokens == 64  # chat: as much as fits, capped by the limit
    assert p.prompt_ids == tiny_tokenizer(p.prompt_text, add_special_tokens=False)["input_ids"]


def test_sampler():
    logits = torch.tensor([0.0, 5.0, 4.9, -10.0])
    assert oa.Sampler(temperature=0).sample(logits) == 1
    draws = [oa.Sampler(temperature=1.0, seed=s).sample(logits) for s in range(40)]
    assert set(draws) == {1, 2}
    assert [oa.Sampler(temperature=1.0, seed=7).sample(logits) for _ in range(3)] == [draws[7]] * 3  # seeded: repeatable
    nucleus = {oa.Sampler(temperature=1.0, top_p=0.3, seed=s).sample(logits) for s in range(40)}
    assert nucleus == {1}


class _CharTok:
    """A tokenizer stand-in whose tokens are single characters (ids = code points)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_text_stream_holds_back_stop_prefixes():
    s = oa.TextStream(_CharTok(), stop=["END"])
    out = [s.push(ord(c)) for c in "abEN"]
    assert "".join(t for t, _ in out) == "ab" and not any(stop for _, stop in out)
    assert s.push(ord("x")) == ("ENx", False)  # "ENx" cannot become END any more
    for c in "yE":
        s.push(ord(c))
    assert s.push(ord("N")) == ("", False)  # "EN" held back
    assert s.push(ord("D")) == ("", True)
    assert s.text == "abENxy"
    s2 = oa.TextStream(_CharTok(), stop=["\n"])
    assert s2.push(ord("a")) == ("a", False) and s2.push(ord("\n")) == ("", True)


def test_completion_shapes(tiny_model, tiny_tokenizer):
    req = oa.parse_request("completion", {"model": "tiny", "prompt": "The cat sat", "max_tokens": 5, "temperature": 0})
    body = oa.complete(_session(tiny_model), req, tiny_tokenizer, model="tiny", limits=LIMITS, eos_token_ids=[tiny_tokenizer.eos_token_id])
    c = Completion.model_validate(body)
    assert c.object == "text_completion" and c.model == "tiny" and c.choices[0].finish_reason in ("length", "stop")
    assert c.usage.prompt_tokens == len(tiny_tokenizer("The cat sat", add_special_tokens=False)["input_ids"])
    assert c.usage.completion_tokens <= 5 and c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
    # greedy = the runtime's own argmax continuation
    again = oa.complete(_session(tiny_model), req, tiny_tokenizer, model="tiny", limits=LIMITS, eos_token_ids=[])
    assert again["usage"]["completion_tokens"] == 5 and again["choices"][0]["finish_reason"] == "length"
    json.dumps(body)


def test_seeded_sampling_repeats(tiny_model, tiny_tokenizer):
    req = oa.parse_request("completion", {"prompt": "Rivers", "max_tokens": 8, "temperature": 1.0, "top_p": 0.9, "seed": 3})
    a, b = (oa.complete(_session(tiny_model), req, tiny_tokenizer, model="m", limits=LIMITS, eos_token_ids=[])["choices"][0]["text"]
            for _ in range(2))
    assert a == b


def _events(lines):
    assert lines[-1] == oa.SSE_DONE
    for ev in lines[:-1]:
        assert ev.startswith("data: ") and ev.endswith("\n\n")
    return [json.loads(ev[len("data: "):]) for ev in lines[:-1]]


def test_chat_stream_shapes(tiny_model, tiny_tokenizer):
    req = oa.parse_request("chat", {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6,
                                    "stream": True, "stream_options": {"include_usage": True}, "seed": 1})
    chunks = [ChatCompletionChunk.model_validate(e) for e in _events(list(oa.stream(
        _session(tiny_model), req, tiny_tokenizer, model="tiny", limits=LIMITS, eos_token_ids=[tiny_tokenizer.eos_token_id])))]
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 6
    assert len({c.id for c in chunks}) == 1
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    full = oa.complete(_session(tiny_model), req, tiny_tokenizer, model="tiny", limits=LIMITS, eos_token_ids=[tiny_tokenizer.eos_token_id])
    assert ChatCompletion.model_validate(full).choices[0].message.content == streamed  # same seed, same text


def test_completion_stream_and_stop(tiny_model, tiny_tokenizer):
    req = oa.parse_request("completion", {"prompt": "The", "max_tokens": 12, "temperature": 0, "stream": True})
    events = _events(list(oa.stream(_session(tiny_model), req, tiny_tokenizer, model="m", limits=LIMITS, eos_token_ids=[])))
    # OpenAI streams intermediate text_completion chunks with finish_reason null; its client builds them without
    # validation (construct), so only the last one is validated strictly here, the others by their keys
    texts = [e["choices"][0]["text"] for e in events]
    assert Completion.model_validate(events[-1]).choices[0].finish_reason == "length"
    assert all(e["object"] == "text_completion" and e["choices"][0]["finish_reason"] is None for e in events[:-1])
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    full = "".join(texts)
    assert len(full) > 2
    stop = full[len(full) // 2: len(full) // 2 + 2]
    req2 = oa.parse_request("completion", {"prompt": "The", "max_tokens": 12, "temperature": 0, "stop": [stop]})
    body = oa.complete(_session(tiny_model), req2, tiny_tokenizer, model="m", limits=LIMITS, eos_token_ids=[])
    assert body["choices"][0]["finish_reason"] == "stop" and body["choices"][0]["text"] == full[: full.index(stop)]


def test_models_body():
    from openai.types import Model

    body = oa.models_body(["smollm-tiny"], created=1)
    assert body["object"] == "list" and Model.model_validate(body["data"][0]).id == "smollm-tiny"
