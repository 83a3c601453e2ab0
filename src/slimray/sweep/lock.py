"""A cluster-wide lock so that only one trial times a model at a time.

Two trials timing at once on a 2-core machine disturb each other's latencies 3-10x (project notes);
training and evaluation may overlap, timing may not. A holder that dies is released after ``lease_s``.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import contextmanager

import ray


@ray.remote(num_cpus=0, max_concurrency=64)
class TimingLock:
    def __init__(self, lease_s: float = 300.0):
        self._holder: str | None = None
        self._since = 0.0
        self._lease_s = lease_s

    async def acquire(self, holder: str) -> None:
        while self._holder is not None and time.monotonic() - self._since < self._lease_s:
            await asyncio.sleep(0.05)
        self._holder, self._since = holder, time.monotonic()

    def release(self, holder: str) -> None:
        if self._holder == holder:
            self._holder = None


@contextmanager
def hold(lock, holder: str):
    if lock is None:
        yield
        return
    ray.get(lock.acquire.remote(holder))
    try:
        yield
    finally:
        ray.get(lock.release.remote(holder))
