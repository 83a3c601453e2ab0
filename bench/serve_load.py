"""Closed-loop load test: slimray on Ray Serve vs a plain FastAPI + uvicorn server vs the raw batched forward.

Run from the repository root with the virtual environment active, on a finished run (one with ``winner/``)::

    python bench/serve_load.py --run-dir /tmp/runs2/mnist

It takes about 4-6 minutes on 2 cores and, in one invocation, measures for each concurrency (default 1, 8, 32):

* ``raw``            the model's forward pass in-process on a batch of ``concurrency`` examples: the compute limit;
* ``in-process``     the request path without the network: parse ``concurrency`` JSON bodies, one batched forward,
                     serialise the answers (what a perfect batching server could do);
* ``plain``          a plain FastAPI + uvicorn server (one worker, sync endpoint, no batching, same model and
                     validation), started by this script in a subprocess on 127.0.0.1;
* ``slimray``        ``slimray.serving`` on Ray Serve (local Ray, 2 CPUs), dynamic batching, forward on a thread;
* ``slimray-inline`` the same with the forward pass run inline on the replica's event loop (``forward_in_thread``
                     off), to show what moving it to a thread buys;
* ``slimray-haproxy`` the default variant behind Ray Serve's experimental HAProxy ingress
                     (``RAY_SERVE_ENABLE_HA_PROXY=1``: HAProxy forwards HTTP straight to the replicas), which
                     removes most of the Python proxy's per-request cost.

Each HTTP level is a closed loop of ``concurrency`` clients (aiohttp, in this process) sending one example per
request, bounded by ``--max-requests`` and ``--duration-s``; only 127.0.0.1 is ever contacted. The table gives
throughput (examples/s), p50/p99 latency and the ratios slimray/plain and slimray/raw; ``--out`` gets the JSON.
Ray and the plain server are shut down before the script exits, also on errors. The client shares the CPUs with
the servers, so absolute numbers are this machine's; compare rows of one invocation.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from slimray.serving.app import PredictRequest  # module level: FastAPI resolves the endpoint's annotation here

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def summarise(name: str, concurrency: int, latencies_s: list[float], elapsed_s: float, examples: int, errors: int) -> dict:
    return {
        "system": name,
        "concurrency": concurrency,
        "requests": len(latencies_s),
        "errors": errors,
        "examples_per_s": examples / elapsed_s if elapsed_s > 0 else 0.0,
        "p50_ms": percentile(latencies_s, 50) * 1000,
        "p99_ms": percentile(latencies_s, 99) * 1000,
        "seconds": elapsed_s,
    }


# ----------------------------------------------------------------------------------------- inputs


def sample_examples(run_dir: Path, spec) -> list[list]:
    """Examples in raw units: the run's sample request if present, else random values in the input range."""
    sample = run_dir / "sample_request.json"
    if sample.is_file():
        inputs = json.loads(sample.read_text()).get("inputs") or []
        if inputs:
            return inputs
    rng = np.random.default_rng(0)
    lo, hi = spec.input.min_value, spec.input.max_value
    return [np.round(rng.uniform(lo, hi, size=spec.input.shape), 3).tolist() for _ in range(8)]


# ----------------------------------------------------------------------------------------- in-process limits


def bench_raw(model_dir: str, examples: list[list], levels: list[int], seconds: float, threads: int) -> list[dict]:
    import torch

    from slimray.serving.app import ServeOptions, SlimrayModel, parse_inputs

    torch.set_num_threads(threads)
    server = SlimrayModel(ServeOptions(model_dir=model_dir, num_threads=threads).model_dump())
    spec = server.spec.input
    rows = []
    for c in levels:
        batch = np.asarray([examples[i % len(examples)] for i in range(c)], dtype=np.float32).reshape(c, *spec.shape)
        for _ in range(20):
            server.forward(batch)
        lat, start = [], time.perf_counter()
        while time.perf_counter() - start < seconds and len(lat) < 100_000:
            t0 = time.perf_counter()
            server.forward(batch)
            lat.append(time.perf_counter() - t0)
        rows.append(summarise("raw", c, lat, time.perf_counter() - start, c * len(lat), 0))

        bodies = [json.dumps({"inputs": [examples[i % len(examples)]]}).encode() for i in range(c)]
        lat, start = [], time.perf_counter()
        while time.perf_counter() - start < seconds and len(lat) < 100_000:
            t0 = time.perf_counter()
            arrays = [
                parse_inputs(json.loads(b)["inputs"], shape=spec.shape, min_value=spec.min_value, max_value=spec.max_value, max_examples=1024)
                for b in bodies
            ]
            probs, preds = server.forward(np.concatenate(arrays))
            for i in range(c):
                json.dumps({"model": "m", "predictions": preds[i : i + 1].tolist(), "probabilities": probs[i : i + 1].tolist()})
            lat.append(time.perf_counter() - t0)
        rows.append(summarise("in-process", c, lat, time.perf_counter() - start, c * len(lat), 0))
    return rows


# ----------------------------------------------------------------------------------------- HTTP load


async def closed_loop(url: str, bodies: list[bytes], concurrency: int, *, max_requests: int, seconds: float, warmup_s: float) -> dict:
    import aiohttp

    assert url.startswith(f"http://{HOST}:"), "the benchmark only targets the loopback address"
    lat: list[float] = []
    errors = 0
    issued = 0
    headers = {"Content-Type": "application/json"}
    conn = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:

        async def one(i: int) -> tuple[bool, float]:
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=bodies[i % len(bodies)], headers=headers) as r:
                    await r.read()
                    ok = r.status == 200
            except (aiohttp.ClientError, asyncio.TimeoutError):
                ok = False
            return ok, time.perf_counter() - t0

        # warm-up (not recorded): fills the batch queues, JITs nothing, opens the connections
        end = time.perf_counter() + warmup_s

        async def warm(w: int) -> None:
            i = w
            while time.perf_counter() < end:
                await one(i)
                i += concurrency

        await asyncio.gather(*(warm(w) for w in range(concurrency)))

        start = time.perf_counter()
        stop_at = start + seconds

        async def worker(w: int) -> None:
            nonlocal errors, issued
            while issued < max_requests and time.perf_counter() < stop_at:
                issued += 1
                ok, dt = await one(issued)
                if ok:
                    lat.append(dt)
                else:
                    errors += 1

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {"latencies": lat, "elapsed": elapsed, "errors": errors}


def load_levels(name: str, url: str, bodies: list[bytes], levels: list[int], args) -> list[dict]:
    rows = []
    for c in levels:
        res = asyncio.run(closed_loop(url, bodies, c, max_requests=args.max_requests, seconds=args.duration_s, warmup_s=args.warmup_s))
        row = summarise(name, c, res["latencies"], res["elapsed"], len(res["latencies"]), res["errors"])
        rows.append(row)
        print(f"  {name:15s} c={c:<3d} {row['examples_per_s']:8.0f}/s  p50 {row['p50_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms  errors {row['errors']}", flush=True)
    return rows


def wait_ready(url: str, timeout_s: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f} s")


# ----------------------------------------------------------------------------------------- the plain server


def plain_server_main(model_dir: str, port: int, threads: int) -> None:
    """A plain FastAPI + uvicorn server: same model and validation, no batching, sync endpoint."""
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    from slimray.serving.app import RequestError, ServeOptions, SlimrayModel, parse_inputs

    server = SlimrayModel(ServeOptions(model_dir=model_dir, num_threads=threads).model_dump())
    spec = server.spec.input
    app = FastAPI()

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.post("/v1/predict")
    def predict(req: PredictRequest):
        try:
            arr = parse_inputs(req.inputs, shape=spec.shape, min_value=spec.min_value, max_value=spec.max_value, max_examples=1024)
        except RequestError as err:
            return JSONResponse({"error": err.message}, status_code=err.status)
        return server.predict_array(arr)

    uvicorn.run(app, host=HOST, port=port, log_level="warning", access_log=False)


def bench_plain(model_dir: str, bodies: list[bytes], levels: list[int], args) -> list[dict]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--plain-server", "--model-dir", model_dir, "--port", str(port), "--threads", str(args.threads)],
        start_new_session=True,
    )
    try:
        wait_ready(f"http://{HOST}:{port}/healthz", 60)
        return load_levels("plain", f"http://{HOST}:{port}/v1/predict", bodies, levels, args)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ----------------------------------------------------------------------------------------- slimray on Serve


def bench_slimray(model_dir: str, bodies: list[bytes], levels: list[int], args) -> list[dict]:
    import ray
    from ray import serve

    from slimray.runtime import init_ray
    from slimray.serving.app import ServeOptions, build_app, deploy

    rows, port = [], None
    in_thread = {"slimray": True, "slimray-inline": False, "slimray-haproxy": True}
    for name in args.variants:
        # Ray Serve's experimental HAProxy ingress is switched on by an environment variable read when Serve
        # starts, so that variant gets a Ray of its own.
        haproxy = name == "slimray-haproxy"
        if haproxy != (os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1") and ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        if haproxy:
            os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
        else:
            os.environ.pop("RAY_SERVE_ENABLE_HA_PROXY", None)
        if init_ray(num_cpus=2) or port is None:
            port = free_port()  # the proxy's port is fixed when Serve starts
        opts = ServeOptions(
            model_dir=model_dir, name="bench", num_replicas=args.replicas, num_cpus_per_replica=0.5, num_threads=args.threads,
            max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_ms / 1000,
            max_ongoing_requests=args.max_ongoing_requests, max_queued_requests=-1,
            forward_in_thread=in_thread[name], access_log=args.access_log,
        )
        url = deploy(build_app(opts), name="bench", port=port, route_prefix="/")
        wait_ready(f"{url}/healthz", 60)
        rows += load_levels(name, f"{url}/v1/predict", bodies, levels, args)
        serve.delete("bench")
    os.environ.pop("RAY_SERVE_ENABLE_HA_PROXY", None)
    return rows


# ----------------------------------------------------------------------------------------- report


def table(rows: list[dict], levels: list[int]) -> str:
    by = {(r["system"], r["concurrency"]): r for r in rows}
    systems = [s for s in ("raw", "in-process", "plain", "slimray", "slimray-inline", "slimray-haproxy") if any(k[0] == s for k in by)]
    lines = ["| system | concurrency | examples/s | p50 ms | p99 ms | errors | vs plain | vs raw |", "|---|---|---|---|---|---|---|---|"]
    for c in levels:
        plain, raw = by.get(("plain", c)), by.get(("raw", c))
        for s in systems:
            r = by.get((s, c))
            if r is None:
                continue
            vs_plain = f"{r['examples_per_s'] / plain['examples_per_s']:.2f}x" if plain and s.startswith("slimray") and plain["examples_per_s"] else ""
            vs_raw = f"{r['examples_per_s'] / raw['examples_per_s']:.2f}x" if raw and s != "raw" and raw["examples_per_s"] else ""
            lines.append(
                f"| {s} | {c} | {r['examples_per_s']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['errors']} | {vs_plain} | {vs_raw} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", type=Path, help="finished run with winner/ (e.g. /tmp/runs2/mnist)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--duration-s", type=float, default=6.0, help="measured seconds per level (bound)")
    p.add_argument("--max-requests", type=int, default=20_000, help="requests per level (bound)")
    p.add_argument("--warmup-s", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads in every server")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-wait-ms", type=float, default=2.0)
    p.add_argument("--max-ongoing-requests", type=int, default=64)
    p.add_argument("--access-log", action="store_true", help="keep Serve's per-request access log on")
    p.add_argument(
        "--variants", nargs="+", default=["slimray", "slimray-inline", "slimray-haproxy"],
        choices=["slimray", "slimray-inline", "slimray-haproxy"],
    )
    p.add_argument("--skip", nargs="*", default=[], choices=["raw", "plain", "slimray"])
    p.add_argument("--out", type=Path, default=Path("bench/results/serve_load.json"))
    # internal: the plain server's subprocess
    p.add_argument("--plain-server", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.plain_server:
        plain_server_main(args.model_dir, args.port, args.threads)
        return 0
    if args.run_dir is None or not (args.run_dir / "winner" / "spec.json").is_file():
        p.error("--run-dir must be a finished run with winner/spec.json")
    if any(c < 1 or c > 256 for c in args.concurrency):
        p.error("concurrency must lie in 1..256")

    from slimray.artifacts import load_spec

    model_dir = str((args.run_dir / "winner").resolve())
    spec = load_spec(model_dir)
    examples = sample_examples(args.run_dir, spec)
    bodies = [json.dumps({"inputs": [e]}).encode() for e in examples]
    levels = sorted(set(args.concurrency))
    rows: list[dict] = []
    t0 = time.time()
    try:
        if "raw" not in args.skip:
            print("raw forward and in-process request path", flush=True)
            rows += bench_raw(model_dir, examples, levels, min(args.duration_s, 3.0), args.threads)
        if "plain" not in args.skip:
            print("plain FastAPI + uvicorn", flush=True)
            rows += bench_plain(model_dir, bodies, levels, args)
        if "slimray" not in args.skip:
            print("slimray on Ray Serve", flush=True)
            rows += bench_slimray(model_dir, bodies, levels, args)
    finally:
        try:
            import ray

            if ray.is_initialized():
                from ray import serve

                serve.shutdown()
                ray.shutdown()
        except Exception as err:  # noqa: BLE001 - report, still write what was measured
            print(f"shutdown: {err}", file=sys.stderr)

    report = table(rows, levels)
    print()
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "run_dir": str(args.run_dir), "model": spec.name, "input_shape": spec.input.shape, "request_bytes": [len(b) for b in bodies],
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("plain_server", "model_dir", "port")},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "loadavg_at_end": os.getloadavg()},
        "wall_s": round(time.time() - t0, 1),
    }
    args.out.write_text(json.dumps({"meta": meta, "rows": rows, "table": report}, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
