"""Data parallelism changes speed, not the result: 2 DDP workers reach the 1-worker accuracy (same seed, same
global batch), and across the workers every training sample is drawn once per epoch."""

from __future__ import annotations

import json
import math

import pytest

pytestmark = pytest.mark.long  # two Ray Train runs; `make test-long`

from slimray.compress.measure import accuracy
from slimray.training.distill import run_training

from .test_distill import _job, kd_data  # noqa: F401  (fixture)

EPOCHS = 6
GLOBAL_BATCH = 64


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory, kd_data):  # noqa: F811
    runs = {}
    for workers in (1, 2):
        d = tmp_path_factory.mktemp(f"w{workers}")
        # batch_size is per worker: 2 x 32 applies the same global batches, in the same order, as 1 x 64
        job = _job(d, run_name=f"w{workers}", num_workers=workers, batch_size=GLOBAL_BATCH // workers, epochs=EPOCHS)
        model, _ = run_training(job, kd_data)
        runs[workers] = (model, [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()])
    return runs


def test_two_workers_reach_the_one_worker_accuracy(one_and_two, digits):
    x, y = digits.normalized("test")
    acc = {w: accuracy(model, x, y) for w, (model, _) in one_and_two.items()}
    # Tolerance: two standard errors of an accuracy measured on this test set, sqrt(p (1 - p) / n). That is the
    # noise of the measurement itself; the two runs see the same global batches (sampler order is a function of
    # seed and epoch; DDP averages the two half-batch gradients) and differ only in float summation order and in
    # the one padded sample an odd-sized split gets, so anything beyond it would be a real data-parallel bug.
    p = acc[1] / 100
    tol = 2 * 100 * math.sqrt(p * (1 - p) / len(y))
    assert abs(acc[2] - acc[1]) <= tol, f"1 worker {acc[1]:.2f}%, 2 workers {acc[2]:.2f}% (tolerance {tol:.2f})"
    losses = {w: [m["loss"] for m in lines] for w, (_, lines) in one_and_two.items()}
    for l1, l2 in zip(losses[1], losses[2]):  # the same training, epoch by epoch
        assert l2 == pytest.approx(l1, rel=0.05), losses


def test_every_sample_is_seen_once_per_epoch_across_workers(one_and_two, digits):
    n = len(digits.train)
    for workers, (_, lines) in one_and_two.items():
        assert [m["epoch"] for m in lines] == list(range(1, EPOCHS + 1))
        assert all(len(m["worker_nodes"]) == workers for m in lines)
        pad = -n % workers  # DistributedSampler pads an uneven split with the first indices of the permutation
        for m in lines:
            assert m["distinct_samples"] == n, m
            assert m["samples_seen"] == n + pad, m
            assert m["max_seen_per_sample"] == (1 if pad == 0 else 2), m
