"""Continuous batching for causal LMs (pure torch/transformers + threads + asyncio, no ray): one ``BatchEngine`` per
server runs a decode loop on its own thread; every step is ONE forward pass for all active sequences. New requests
are prefilled (one forward each, batch 1) and join the batch between steps; finished or cancelled ones leave.

The batch's KV cache is one ``DynamicCache`` whose rows are right-aligned: a row's real tokens end at the last
column and the columns before its first token are left padding, masked out by the 2D attention mask; each row
gets its own position ids, so RoPE and attention see exactly what a solo run sees (greedy outputs equal the solo
ones up to float rounding of batched matmuls). The requests waiting at a step are prefilled together (one forward,
prompts left-padded the same way); joining pads either the newcomers' cache or the batch's on the left to the
longer of the two; leaving drops the row and trims padding every remaining row shares.

Batch invariance holds for float weights: fp32 greedy outputs equal the solo ones (tested); bf16 ones can flip on
near-ties (measured on the tiny test model: 4 of 5 prompts equal). Quantized artifacts are NOT batch-invariant:
``dynamic_int8`` quantizes activations with one scale per input tensor, i.e. shared by all rows of a step, and
``token_int8`` takes another kernel for multi-row inputs than for one token (measured: 2 of 5 greedy
continuations equal the solo ones for each), so a request's text can depend on what else is in flight.

Each request keeps its own ``Decoding`` (``openai.Decoding``: sampler with its seed, temperature, top_p; stop
strings; token budget). Results go back to the request's asyncio queue with ``loop.call_soon_threadsafe``, so the
event loop that parses requests never runs the model. ``stats()`` counts steps, the largest step batch,
prefills and generated tokens.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from slimray.families.causal_lm.openai import Decoding, Delta, Prepared
from slimray.families.causal_lm.runtime import cache_kwarg

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Sequence:
    """One request inside the engine."""

    decoding: Decoding
    emit: Callable[[Any], None]  # thread-safe: a Delta, or an exception that ends the request
    cancelled: bool = False
    pad: int = 0  # left padding columns of this row in the batch cache


@dataclass
class EngineStats:
    num_steps: int = 0  # batched decode forwards
    largest_step_batch: int = 0
    num_step_rows: int = 0  # sum of the step batch sizes (mean = num_step_rows / num_steps)
    num_prefills: int = 0  # sequences prefilled
    num_prefill_forwards: int = 0  # forwards that prefilled them (newcomers of one step share one)
    num_generated_tokens: int = 0
    num_finished: int = 0
    num_cancelled: int = 0
    step_batch_counts: dict[int, int] = field(default_factory=dict)  # step batch size -> steps

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "step_batch_counts"}
        d["mean_step_batch"] = round(self.num_step_rows / self.num_steps, 3) if self.num_steps else 0.0
        d["step_batch_counts"] = {str(k): v for k, v in sorted(self.step_batch_counts.items())}
        return d


class BatchEngine:
    """The decode loop of one server: ``submit`` a prepared request, iterate its Deltas.

    ``max_num_seqs`` sequences share a step at most; later requests wait in arrival order. ``on_step(n)`` is
    called (on the engine thread) with each step's batch size, ``on_tokens(n)`` with the tokens it produced."""

    def __init__(self, model: torch.nn.Module, tokenizer, *, eos_token_ids: Sequence[int], max_num_seqs: int = 8,
                 on_step: Callable[[int], None] | None = None, on_tokens: Callable[[int], None] | None = None):
        if max_num_seqs < 1:
            raise ValueError("max_num_seqs must be at least 1")
        self.model, self.tokenizer = model, tokenizer
        self.eos_token_ids = list(eos_token_ids)
        self.max_num_seqs = max_num_seqs
        self.on_step, self.on_tokens = on_step, on_tokens
        self.stats = EngineStats()
        self._inbox: queue.Queue[_Sequence | None] = queue.Queue()
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._active: list[_Sequence] = []
        self._cache = None  # DynamicCache of the active rows, or None when there are none
        self._cache_kw = cache_kwarg(model)  # ``cache`` or ``past_key_values``, whichever this transformers takes
        self._admitting: list[_Sequence] = []  # taken off the queue, not yet in the batch (failed with it if a prefill fails)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        pad = getattr(tokenizer, "pad_token_id", None)
        self._pad_id = int(pad if pad is not None else (self.eos_token_ids[0] if self.eos_token_ids else 0))

    # ------------------------------------------------------------------------------------------------ public

    def start(self) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="slimray-lm-engine", daemon=True)
                self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._closed = True
            thread = self._thread
        self._inbox.put(None)
        if thread is not None:
            thread.join(timeout)

    def submit_threadsafe(self, prepared: Prepared, emit: Callable[[Any], None]) -> _Sequence:
        """Queue ``prepared``; ``emit`` is called from the engine thread with each Delta (or an exception)."""
        seq = _Sequence(Decoding(prepared, self.tokenizer, eos_token_ids=self.eos_token_ids), emit)
        self.start()
        self._inbox.put(seq)
        return seq

    async def generate(self, prepared: Prepared) -> AsyncIterator[Delta]:
        """The Deltas of one request as the engine produces them; leaving the iteration early (client gone,
        task cancelled) cancels the request, which then leaves the batch at the next step."""
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()

        def emit(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(inbox.put_nowait, item)
            except RuntimeError:  # the event loop is gone: nobody is listening any more
                seq.cancelled = True

        seq = self.submit_threadsafe(prepared, emit)
        try:
            while True:
                item = await inbox.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            seq.cancelled = True

    def info(self) -> dict[str, Any]:
        return {**self.stats.as_dict(), "num_active": len(self._active), "num_waiting": len(self._waiting) + self._inbox.qsize(),
                "max_num_seqs": self.max_num_seqs}

    # ------------------------------------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        while True:
            if not self._active and not self._waiting:
                item = self._inbox.get()  # idle: block until a request (or close) arrives
                if item is None:
                    return
                self._waiting.append(item)
            while True:  # everything that arrived meanwhile
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._fail_all(RuntimeError("the server is shutting down"))
                    return
                self._waiting.append(item)
            try:
                self._admit()
                if self._active:
                    self._step()
            except Exception as err:  # a failing forward ends the requests in flight, never the engine
                log.exception("decode step failed")
                self._fail_all(err)

    def _fail_all(self, err: BaseException) -> None:
        for seq in self._admitting + self._active + list(self._waiting):
            seq.emit(err)
        self._active, self._cache, self._admitting = [], None, []
        self._waiting.clear()

    def _finish(self, seq: _Sequence, delta: Delta) -> None:
        seq.emit(delta)
        self.stats.num_generated_tokens += 1
        if delta.finish_reason is not None:
            self.stats.num_finished += 1

    @torch.inference_mode()
    def _admit(self) -> None:
        """Prefill every waiting request that fits (one forward for all of them: prompts left-padded to the longest,
        masked, each with its own positions), take each one's first token, and join the rest to the batch."""
        from transformers import DynamicCache

        group: list[_Sequence] = []
        while self._waiting and len(self._active) + len(group) < self.max_num_seqs:
            seq = self._waiting.popleft()
            if seq.cancelled:
                self.stats.num_cancelled += 1
            else:
                group.append(seq)
        if not group:
            return
        self._admitting = group
        prompts = [seq.decoding.prepared.prompt_ids for seq in group]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(group), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
            group[i].pad = width - len(p)
        cache = DynamicCache(config=self.model.config)
        if len(group) == 1:  # no padding: the plain path
            out = self.model(input_ids=ids, **{self._cache_kw: cache}, use_cache=True, logits_to_keep=1)
        else:
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, **{self._cache_kw: cache}, use_cache=True,
                             logits_to_keep=1)
        self.stats.num_prefills += len(group)
        self.stats.num_prefill_forwards += 1
        logits = out.logits[:, -1].float()
        keep = []
        for i, seq in enumerate(group):
            self._finish(seq, seq.decoding.advance(logits[i]))
            if not seq.decoding.done:
                keep.append(i)
        if self.on_tokens is not None:
            self.on_tokens(len(group))
        if keep:
            self._join([group[i] for i in keep], cache, keep)
        self._admitting = []

    def _join(self, group: list[_Sequence], cache, rows: list[int]) -> None:
        """Add ``group`` (rows ``rows`` of their prefilled, right-aligned ``cache``) at the end of the batch cache."""
        if len(rows) < cache.layers[0].keys.shape[0]:
            index = torch.tensor(rows)
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
        if self._cache is None:
            trim = min(s.pad for s in group)
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[:, :, trim:], layer.values[:, :, trim:]
            for s in group:
                s.pad -= trim
            self._cache, self._active = cache, list(group)
            return
        width, new = self._cache.get_seq_length(), cache.get_seq_length()
        grow, lag = max(0, new - width), max(0, width - new)  # the shorter side is padded on the left
        for mine, theirs in zip(self._cache.layers, cache.layers):
            k, v, nk, nv = mine.keys, mine.values, theirs.keys, theirs.values
            if grow:
                k, v = F.pad(k, (0, 0, grow, 0)), F.pad(v, (0, 0, grow, 0))
            if lag:
                nk, nv = F.pad(nk, (0, 0, lag, 0)), F.pad(nv, (0, 0, lag, 0))
            mine.keys, mine.values = torch.cat([k, nk]), torch.cat([v, nv])
        for s in self._active:
            s.pad += grow
        for s in group:
            s.pad += lag
        self._active.extend(group)

    def _leave(self, keep: list[int]) -> None:
        """Keep only the rows ``keep`` of the batch cache, then trim the left padding they all share."""
        if not keep:
            self._active, self._cache = [], None
            return
        self._active = [self._active[i] for i in keep]
        trim = min(s.pad for s in self._active)
        index = torch.tensor(keep)
        for layer in self._cache.layers:
            layer.keys, layer.values = layer.keys.index_select(0, index)[:, :, trim:], layer.values.index_select(0, index)[:, :, trim:]
        for s in self._active:
            s.pad -= trim

    @torch.inference_mode()
    def _step(self) -> None:
        keep = [i for i, s in enumerate(self._active) if not s.cancelled]
        if len(keep) < len(self._active):
            self.stats.num_cancelled += len(self._active) - len(keep)
            self._leave(keep)
            if not self._active:
                return
        n = len(self._active)
        width = self._cache.get_seq_length()
        pads = torch.tensor([s.pad for s in self._active])
        mask = (torch.arange(width + 1)[None, :] >= pads[:, None]).long()  # 0 on each row's left padding
        positions = (width - pads)[:, None]  # the next token's position in its own sequence
        tokens = torch.tensor([[s.decoding.last_token] for s in self._active])
        out = self.model(input_ids=tokens, attention_mask=mask, position_ids=positions, **{self._cache_kw: self._cache},
                         use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1].float()
        st = self.stats
        st.num_steps += 1
        st.num_step_rows += n
        st.largest_step_batch = max(st.largest_step_batch, n)
        st.step_batch_counts[n] = st.step_batch_counts.get(n, 0) + 1
        if self.on_step is not None:
            self.on_step(n)
        keep = []
        for i, seq in enumerate(self._active):
            if seq.cancelled:  # its client left during this forward
                self.stats.num_cancelled += 1
                continue
            self._finish(seq, seq.decoding.advance(logits[i]))
            if not seq.decoding.done:
                keep.append(i)
        if self.on_tokens is not None:
            self.on_tokens(n)
        if len(keep) < n:
            self._leave(keep)
