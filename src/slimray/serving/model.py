"""The model server inside a replica: the codec's forward pass, batched across requests, off the event loop.

``ModelServer.infer(items)`` is what every protocol awaits. Inside a Serve replica, requests' items are gathered
by ``@serve.batch`` (``max_batch_size`` items, ``batch_wait_timeout_s``) into one forward pass and split back
(a request alone in flight skips the wait);
the forward runs on one dedicated thread so the event loop keeps parsing requests meanwhile
(``forward_in_thread``). Outside a replica (tests, benchmarks) each call runs on its own.
"""

from __future__ import annotations

import asyncio
import resource
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from ray import serve

from slimray.serving.codecs import Codec, make_codec
from slimray.serving.options import ServeOptions


def _count(items: list[Any]) -> int:
    return sum(len(x) for x in items)


class ModelServer:
    """Loads the artifact through its codec once; ``infer`` answers one request's items."""

    def __init__(self, options: ServeOptions, *, loader: Any = None):
        self.options = options
        torch.set_num_threads(options.num_threads)
        self.codec: Codec = make_codec(options, loader)
        self.ready = self.codec.healthy(self.codec.forward(self.codec.probe()))
        self.batches_run = 0
        self.largest_batch = 0
        self.on_batch = None  # metrics hook: called with the batch size
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slimray-forward")
        self.replica_id = None
        self._inflight = 0  # infer() calls in progress (one event loop: no lock needed)
        try:
            ctx = serve.get_replica_context()
        except Exception:
            ctx = None  # in-process use: no Serve context
        self._batched = None
        if ctx is not None:
            self.replica_id = ctx.replica_id.to_full_id_str()
            # per-instance batcher: it reads this replica's options; @serve.batch works only inside a replica
            self._batched = serve.batch(
                max_batch_size=options.max_batch_size, batch_wait_timeout_s=options.batch_wait_timeout_s, batch_size_fn=_count,
            )(self._run_batch)

    async def _forward_async(self, items: Any) -> dict[str, np.ndarray]:
        n = len(items)
        self.batches_run += 1
        self.largest_batch = max(self.largest_batch, n)
        if self.on_batch is not None:
            self.on_batch(n)
        if self.options.forward_in_thread:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self.codec.forward, items)
        return self.codec.forward(items)

    async def _run_batch(self, parts: list[Any]) -> list[dict[str, np.ndarray]]:
        """``@serve.batch`` target: concatenate the requests' items, one forward pass, split back."""
        out = await self._forward_async(self.codec.concat(parts))
        answers, start = [], 0
        for p in parts:
            answers.append({k: v[start : start + len(p)] for k, v in out.items()})
            start += len(p)
        return answers

    async def infer(self, items: Any) -> dict[str, np.ndarray]:
        """Batched inference for one request's items (a request larger than a batch runs on its own, and so does a
        request that finds no other one in flight: nothing could join its batch, so it does not wait
        ``batch_wait_timeout_s`` for company)."""
        self._inflight += 1
        try:
            if self._batched is None or len(items) > self.options.max_batch_size or self._inflight == 1:
                return await self._forward_async(items)
            return await self._batched(items)
        finally:
            self._inflight -= 1

    def check_health(self) -> None:
        """Raises when the model answers NaN/Inf on a probe input (Serve then replaces the replica)."""
        self.ready = self.codec.healthy(self.codec.forward(self.codec.probe()))
        if not self.ready:
            raise RuntimeError("model answers NaN/Inf on a probe input")

    def info(self) -> dict[str, Any]:
        import ray

        return {
            "model": self.options.name,
            "kind": self.codec.kind,
            "replica_id": self.replica_id,
            "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else None,
            "device": str(getattr(self.codec, "device", "cpu")),
            "runtime": self.codec.describe().get("runtime", "torch"),
            "batches_run": self.batches_run,
            "largest_batch": self.largest_batch,
            "max_batch_size": self.options.max_batch_size,
            "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            **self.codec.stats(),
        }
