"""OpenAI-compatible completions for causal LMs, without any server (pure python/torch, no ray): strict request
models for ``POST /v1/completions`` and ``POST /v1/chat/completions``, their 4xx errors, the chat template, a
step-by-step generator with sampling (temperature, top_p, seed) and stop strings, usage counts, the response and
``stream: true`` chunk shapes (server-sent events ``data: {...}\\n\\n`` ... ``data: [DONE]\\n\\n``), and
``GET /v1/models``. The shapes follow the OpenAI API reference and parse with the official ``openai`` client's
pydantic types (tested).

Building blocks for a batching server (``engine.BatchEngine``): ``Sampler`` (one request's sampling state),
``TextStream`` (incremental detokenisation with stop strings held back until they can no longer match),
``Decoding`` (both plus the token budget: logits in, Delta out), ``prepare`` (validation against the model's
limits, prompt ids), ``StreamFormatter`` (a request's SSE events from its Deltas) and ``final_body``. ``complete`` / ``stream`` run one request end to end on a ``runtime`` session.
Errors are ``RequestError`` (status 400 or 404, an OpenAI-style ``{"error": {...}}`` body); never a 5xx for input.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError, model_validator

SSE_DONE = "data: [DONE]\n\n"
MAX_STOP = 4


class RequestError(ValueError):
    """Bad input: ``status`` (4xx), ``param`` (the offending field, if one) and an OpenAI-style body."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


Number = StrictFloat | StrictInt


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class _Common(_Strict):
    model: StrictStr | None = Field(None, description="the served model's id (checked by the server)")
    max_tokens: StrictInt | None = Field(None, description="tokens to generate at most (>= 1)")
    temperature: Annotated[Number, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[Number, Field(gt=0, le=1)] = 1.0
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_STOP)] | None = None
    seed: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = Field(1, description="only one choice per request")
    user: StrictStr | None = None

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class CompletionRequest(_Common):
    prompt: Annotated[StrictStr, Field(min_length=1)]
    echo: StrictBool = False


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: StrictStr
    name: StrictStr | None = None


class ChatCompletionRequest(_Common):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: StrictInt | None = None

    @model_validator(mode="after")
    def _one_limit(self):
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_tokens or max_completion_tokens, not both")
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self


def _field_path(loc: Sequence[Any]) -> str:
    """The request field a validation error is about, e.g. ``messages.0.role``: the error's location without the
    union-member tags pydantic adds (``temperature.float``, ``stop.list[str].0`` -> ``temperature``, ``stop``)."""
    names = (set(CompletionRequest.model_fields) | set(ChatCompletionRequest.model_fields) | set(ChatMessage.model_fields)
             | set(StreamOptions.model_fields))
    out: list[str] = []
    for part in loc:
        if isinstance(part, int) and out or isinstance(part, str) and part in names:
            out.append(str(part))
        else:
            break
    return ".".join(out)


def _validation_message(err: ValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for e in err.errors():
        full = ".".join(str(p) for p in e["loc"])
        loc = full if e["type"] == "extra_forbidden" else (_field_path(e["loc"]) or full)
        param = param or (loc or None)
        msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(dict.fromkeys(parts)), param


def parse_request(kind: Literal["completion", "chat"], body: bytes | str | dict) -> CompletionRequest | ChatCompletionRequest:
    """Validate a request body (JSON text or an already-decoded dict); ``RequestError`` (400) names the field."""
    cls = CompletionRequest if kind == "completion" else ChatCompletionRequest
    if isinstance(body, (bytes, str)):
        try:
            body = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RequestError(f"the body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    try:
        return cls.model_validate(body)
    except ValidationError as err:
        msg, param = _validation_message(err)
        raise RequestError(msg, param=param) from None


@dataclass(frozen=True)
class Limits:
    """What the served model accepts: its context (prompt + generated tokens) and the cap on ``max_tokens``."""

    context_len: int
    max_tokens_limit: int
    default_max_tokens: int = 16  # /v1/completions' default, as OpenAI's; chat defaults to what fits


@dataclass
class Prepared:
    """A validated request: prompt ids, the resolved token budget and sampling settings."""

    prompt_ids: list[int]
    max_tokens: int
    stop: list[str]
    temperature: float
    top_p: float
    seed: int | None
    chat: bool
    prompt_text: str = ""


def chat_prompt(messages: Sequence[ChatMessage], tokenizer) -> str:
    """The tokenizer's chat template applied to ``messages`` with the assistant turn opened."""
    if not getattr(tokenizer, "chat_template", None):
        raise RequestError("this model has no chat template: use /v1/completions", status=400)
    return tokenizer.apply_chat_template([m.model_dump(exclude_none=True) for m in messages],
                                         add_generation_prompt=True, tokenize=False)


def prepare(request: CompletionRequest | ChatCompletionRequest, tokenizer, *, limits: Limits) -> Prepared:
    """Tokenise the prompt and check it and ``max_tokens`` against ``limits`` (RequestError 400 otherwise)."""
    chat = isinstance(request, ChatCompletionRequest)
    text = chat_prompt(request.messages, tokenizer) if chat else request.prompt
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise RequestError("the prompt encodes to no tokens", param="messages" if chat else "prompt")
    room = limits.context_len - len(ids)
    if room < 1:
        raise RequestError(f"the prompt has {len(ids)} tokens; this model's context is {limits.context_len} tokens "
                           "(prompt + completion): shorten it", param="messages" if chat else "prompt",
                           code="context_length_exceeded")
    param = "max_completion_tokens" if chat and getattr(request, "max_completion_tokens", None) is not None else "max_tokens"
    if request.max_tokens is None:
        max_tokens = min(room, limits.max_tokens_limit, limits.max_tokens_limit if chat else limits.default_max_tokens)
    else:
        max_tokens = request.max_tokens
        if max_tokens <= 0:
            raise RequestError(f"{param} must be at least 1, got {max_tokens}", param=param)
        if max_tokens > limits.max_tokens_limit:
            raise RequestError(f"{param}={max_tokens} is over this server's limit of {limits.max_tokens_limit}", param=param)
        if max_tokens > room:
            raise RequestError(f"the prompt ({len(ids)} tokens) plus {param}={max_tokens} exceeds this model's context "
                               f"of {limits.context_len} tokens", param=param, code="context_length_exceeded")
    return Prepared(prompt_ids=ids, max_tokens=max_tokens, stop=request.stop_list(), temperature=float(request.temperature),
                    top_p=float(request.top_p), seed=request.seed, chat=chat, prompt_text=text)


class Sampler:
    """Next-token choice for one request: greedy at temperature 0, else temperature + nucleus (top_p) sampling
    from a generator seeded with ``seed`` (random when None), so a seeded request repeats exactly."""

    def __init__(self, *, temperature: float, top_p: float = 1.0, seed: int | None = None):
        self.temperature, self.top_p = temperature, top_p
        self.generator = torch.Generator().manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)

    def sample(self, logits: torch.Tensor) -> int:
        """``logits [V]`` (float) -> token id."""
        if self.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / self.temperature, -1)
        if self.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < self.top_p  # smallest prefix reaching top_p (always >= 1 token)
            sorted_p = sorted_p * keep
            return int(order[torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=self.generator)])
        return int(torch.multinomial(probs, 1, generator=self.generator))


@dataclass
class TextStream:
    """Incremental detokenisation with stop strings: ``push(token_id)`` returns the text safe to emit now (never
    part of a stop string, never half a UTF-8 character) and whether a stop string ended the text."""

    tokenizer: Any
    stop: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of the decoded text already returned
    text: str = ""
    stopped: bool = False

    def push(self, token_id: int) -> tuple[str, bool]:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for s in self.stop:
            at = text.find(s, max(0, self.emitted - len(s) + 1))
            if at != -1:
                self.text, self.stopped = text[:at], True
                return self._take(len(self.text)), True
        self.text = text
        safe = len(text)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            safe = len(text.rstrip("\ufffd"))
        hold = 0
        for s in self.stop:  # hold back the longest tail that could still grow into a stop string
            for k in range(min(len(s) - 1, safe), 0, -1):
                if text[safe - k:safe] == s[:k]:
                    hold = max(hold, k)
                    break
        safe -= hold
        return self._take(max(safe, self.emitted)), False

    def finish(self) -> str:
        """The rest of the text (held-back characters that turned out not to start a stop string)."""
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        out = self.text[self.emitted:upto]
        self.emitted = max(self.emitted, upto)
        return out


@dataclass
class Delta:
    """One generation step's output: new text (may be empty), the token, and the finish reason on the last one."""

    text: str
    token_id: int | None
    finish_reason: Literal["stop", "length"] | None = None


class Decoding:
    """One request's decode state between model steps: its ``Sampler``, ``TextStream`` and token budget.
    ``advance(logits)`` chooses the next token and returns its Delta; ``done`` is then set on the last one. The
    same object serves ``generate`` (one request per session) and a server batching many requests per step."""

    def __init__(self, prepared: Prepared, tokenizer, *, eos_token_ids: Sequence[int]):
        self.prepared = prepared
        self.sampler = Sampler(temperature=prepared.temperature, top_p=prepared.top_p, seed=prepared.seed)
        self.stream = TextStream(tokenizer, stop=prepared.stop)
        self.eos = set(eos_token_ids)
        self.num_tokens = 0
        self.last_token: int | None = None
        self.done = False

    def advance(self, logits: torch.Tensor) -> Delta:
        """``logits [V]`` of the next position -> this step's Delta (``finish_reason`` set when it is the last)."""
        tok = self.sampler.sample(logits)
        self.num_tokens += 1
        self.last_token = tok
        if tok in self.eos:
            self.done = True
            return Delta(self.stream.finish(), tok, "stop")
        text, stopped = self.stream.push(tok)
        if stopped:
            self.done = True
            return Delta(text, tok, "stop")
        if self.num_tokens >= self.prepared.max_tokens:
            self.done = True
            return Delta(text + self.stream.finish(), tok, "length")
        return Delta(text, tok)


def generate(session, prepared: Prepared, tokenizer, *, eos_token_ids: Sequence[int]) -> Iterator[Delta]:
    """Decode one request step by step on a runtime ``session`` (``prefill`` / ``step``, batch 1): yields a Delta
    per token; the last one has ``finish_reason`` ("stop": EOS or a stop string; "length": ``max_tokens``)."""
    dec = Decoding(prepared, tokenizer, eos_token_ids=eos_token_ids)
    logits = session.prefill(torch.tensor([prepared.prompt_ids]))[0]
    while True:
        d = dec.advance(logits)
        yield d
        if dec.done:
            return
        logits = session.step(torch.tensor([dec.last_token]))[0]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def completion_body(*, id: str, model: str, created: int, text: str, finish_reason: str | None,
                    usage_: dict | None) -> dict:
    """A ``text_completion`` object (the same shape serves each streamed chunk, with ``usage`` on the last)."""
    return {"id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
            **({"usage": usage_} if usage_ is not None else {})}


def chat_body(*, id: str, model: str, created: int, text: str, finish_reason: str, usage_: dict) -> dict:
    return {"id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage_}


def chat_chunk(*, id: str, model: str, created: int, delta: dict | None, finish_reason: str | None = None,
               usage_: dict | None = None) -> dict:
    """A ``chat.completion.chunk``; ``delta=None`` gives the final usage-only chunk (``choices: []``)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    return {"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices,
            **({"usage": usage_} if usage_ is not None else {})}


def sse(data: dict) -> str:
    """One server-sent event carrying ``data`` as JSON."""
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def models_body(model_ids: Sequence[str], *, created: int | None = None, owned_by: str = "slimray") -> dict:
    """``GET /v1/models``."""
    created = int(time.time()) if created is None else created
    return {"object": "list", "data": [{"id": m, "object": "model", "created": created, "owned_by": owned_by} for m in model_ids]}


def final_body(request: CompletionRequest | ChatCompletionRequest, prepared: Prepared, *, model: str, text: str,
               num_tokens: int, finish_reason: str) -> dict:
    """The non-streamed answer to ``request`` once its text is generated: ``text_completion`` or ``chat.completion``."""
    if isinstance(request, CompletionRequest) and request.echo:
        text = request.prompt + text
    rid, created, u = new_id(prepared.chat), int(time.time()), usage(len(prepared.prompt_ids), num_tokens)
    if prepared.chat:
        return chat_body(id=rid, model=model, created=created, text=text, finish_reason=finish_reason, usage_=u)
    return completion_body(id=rid, model=model, created=created, text=text, finish_reason=finish_reason, usage_=u)


def complete(session, request: CompletionRequest | ChatCompletionRequest, tokenizer, *, model: str, limits: Limits,
             eos_token_ids: Sequence[int]) -> dict:
    """One non-streamed request end to end: the ``text_completion`` or ``chat.completion`` body."""
    prepared = prepare(request, tokenizer, limits=limits)
    text, count, finish = "", 0, "length"
    for d in generate(session, prepared, tokenizer, eos_token_ids=eos_token_ids):
        text += d.text
        count += 1
        finish = d.finish_reason or finish
    return final_body(request, prepared, model=model, text=text, num_tokens=count, finish_reason=finish)


def stream(session, request: CompletionRequest | ChatCompletionRequest, tokenizer, *, model: str, limits: Limits,
           eos_token_ids: Sequence[int]) -> Iterator[str]:
    """One streamed request: SSE strings, ending with ``data: [DONE]``. Validation happens before the first
    event (call ``prepare`` first, or let the RequestError propagate before a response starts)."""
    prepared = prepare(request, tokenizer, limits=limits)
    return _stream(session, request, prepared, tokenizer, model=model, eos_token_ids=eos_token_ids)


class StreamFormatter:
    """The server-sent events of one streamed request, built from its Deltas as they come (``start``, ``delta``
    per token, ``end``); a batching server feeds it from its own loop, ``stream`` from a session."""

    def __init__(self, request: CompletionRequest | ChatCompletionRequest, prepared: Prepared, *, model: str):
        self.request, self.prepared, self.model = request, prepared, model
        self.id, self.created = new_id(prepared.chat), int(time.time())
        self.include_usage = bool(request.stream_options and request.stream_options.include_usage)
        self.num_tokens = 0

    def start(self) -> list[str]:
        if self.prepared.chat:
            return [sse(chat_chunk(id=self.id, model=self.model, created=self.created, delta={"role": "assistant", "content": ""}))]
        if isinstance(self.request, CompletionRequest) and self.request.echo:
            return [sse(completion_body(id=self.id, model=self.model, created=self.created, text=self.request.prompt,
                                        finish_reason=None, usage_=None))]
        return []

    def delta(self, d: Delta) -> list[str]:
        self.num_tokens += 1
        out = []
        if self.prepared.chat:
            if d.text:
                out.append(sse(chat_chunk(id=self.id, model=self.model, created=self.created, delta={"content": d.text})))
            if d.finish_reason:
                out.append(sse(chat_chunk(id=self.id, model=self.model, created=self.created, delta={},
                                          finish_reason=d.finish_reason)))
        elif d.text or d.finish_reason:
            out.append(sse(completion_body(id=self.id, model=self.model, created=self.created, text=d.text,
                                           finish_reason=d.finish_reason, usage_=None)))
        return out

    def end(self) -> list[str]:
        out = []
        if self.include_usage:
            u = usage(len(self.prepared.prompt_ids), self.num_tokens)
            if self.prepared.chat:
                out.append(sse(chat_chunk(id=self.id, model=self.model, created=self.created, delta=None, usage_=u)))
            else:
                out.append(sse({"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                                "choices": [], "usage": u}))
        return out + [SSE_DONE]


def _stream(session, request, prepared: Prepared, tokenizer, *, model: str, eos_token_ids: Sequence[int]) -> Iterator[str]:
    fmt = StreamFormatter(request, prepared, model=model)
    yield from fmt.start()
    for d in generate(session, prepared, tokenizer, eos_token_ids=eos_token_ids):
        yield from fmt.delta(d)
    yield from fmt.end()
