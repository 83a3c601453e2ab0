"""Closed-loop load test: slimray on Ray Serve (the user's defaults) vs a plain FastAPI + uvicorn server vs the raw
batched forward, on a classifier run (e.g. mnist: one image per request, JSON and binary bodies) or a sentence-encoder
run (e.g. minilm: one sentence per request).

Run from the repository root with the virtual environment active, on finished runs (ones with ``winner/``), one
table per run::

    python bench/serve_load.py --run-dir /tmp/runs/mnist /tmp/runs/minilm

In one invocation it measures, for each run and each concurrency (default 1, 8, 32):

* ``raw``            the codec's forward pass in-process on a batch of ``concurrency`` items: the compute limit;
* ``in-process``     the request path without the network: parse ``concurrency`` JSON bodies, one batched forward,
                     serialise the answers;
* ``plain``          a plain FastAPI + uvicorn server (one worker, sync endpoint, pydantic body, no batching, same
                     model and validation, JSON), started by this script in a subprocess on 127.0.0.1;
* ``slimray``        ``slimray.serving`` on Ray Serve with exactly the options ``slimray serve RUN`` uses (the run's
                     config, hence its default ingress: ``direct``, the replica's own server; local Ray, 2 CPUs), JSON;
* ``slimray-binary`` the same deployment with binary bodies (raw float32 + ``X-Shape``; classifiers only);
* ``slimray-grpc``   the same deployment with ``serve.grpc_port`` set (a Ray of its own), over the Open Inference
                     Protocol's gRPC service (``ModelInfer`` with ``raw_input_contents``, tritonclient.grpc's encoding;
                     raw ``grpc.aio`` stubs on one channel, so the client costs little): on the default ingress, the
                     replica's own gRPC server on 127.0.0.1;
* ``slimray-proxy`` / ``slimray-proxy-binary`` the same behind Serve's HTTP proxy (``ingress: proxy``);
* ``slimray-haproxy`` / ``slimray-throughput`` Serve's proxy path with ``RAY_SERVE_ENABLE_HA_PROXY=1`` (HAProxy in
                     front of Ray's direct-ingress replicas; needs the ``haproxy`` binary, binds what
                     docs/serving-ingress.md lists) or with ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` (each a Ray of its own);
* ``noop-plain`` / ``noop-serve`` the ceiling of the HTTP stack alone: a FastAPI endpoint that reads the body and
                     answers ``{"n": len}``, on plain uvicorn (a subprocess) and inside Ray Serve behind its proxy
                     (``@serve.ingress``), same JSON bodies;

Each level is a closed loop of ``concurrency`` clients (aiohttp or grpc.aio, in this process) sending one item per request,
bounded by ``--max-requests`` and ``--duration-s``; only 127.0.0.1 is ever contacted. The table gives throughput
(items/s), p50/p99 latency and the ratios to plain (the no-op rows: to ``noop-plain``) and raw; ``--out`` gets the JSON with the machine's load average.
Ray and the plain server are shut down before the script exits, also on errors. The client shares the CPUs with the
servers, so absolute numbers are this machine's; compare rows of one invocation.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from fastapi import Request  # module level: the no-op endpoint's annotation resolves here

from slimray.raycompat import HA_PROXY_ENV
from slimray.serving.protocols import EmbedRequest, PredictRequest  # module level: FastAPI resolves the annotations here

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


def sample_items(run_dir: Path, codec) -> list:
    """One item per request: images in raw units (the run's sample request, else random values in the input range)
    or sentences (the text run's sample request)."""
    sample = run_dir / "sample_request.json"
    data = json.loads(sample.read_text()) if sample.is_file() else {}
    if codec.kind == "sentence_encoder":
        return data.get("texts") or ["A short sentence to embed.", "Another one, a little longer than the first."]
    if data.get("inputs"):
        return data["inputs"]
    rng = np.random.default_rng(0)
    lo, hi = codec.spec.input.min_value, codec.spec.input.max_value
    return [np.round(rng.uniform(lo, hi, size=codec.spec.input.shape), 3).tolist() for _ in range(8)]


def json_bodies(codec, items: list) -> list[bytes]:
    key = "texts" if codec.kind == "sentence_encoder" else "inputs"
    return [json.dumps({key: [it]}).encode() for it in items]


def binary_bodies(codec, items: list) -> list[tuple[bytes, dict]]:
    shape = ",".join(map(str, [1, *codec.spec.input.shape]))
    return [(np.asarray([it], dtype="<f4").tobytes(), {"Content-Type": "application/octet-stream", "X-Shape": shape}) for it in items]


def grpc_requests(codec, items: list, *, model: str) -> list:
    """One OIP ``ModelInferRequest`` per item, the tensor in ``raw_input_contents`` (tritonclient.grpc's default):
    little-endian float32 for images, 4-byte-length-prefixed UTF-8 for texts (the BYTES encoding)."""
    import struct

    from slimray.serving.grpc import inference_pb2 as pb

    reqs = []
    for it in items:
        req = pb.ModelInferRequest(model_name=model)
        if codec.kind == "sentence_encoder":
            req.inputs.add(name=codec.input_name, datatype="BYTES", shape=[1])
            raw = it.encode()
            req.raw_input_contents.append(struct.pack("<I", len(raw)) + raw)
        else:
            req.inputs.add(name=codec.input_name, datatype="FP32", shape=[1, *codec.spec.input.shape])
            req.raw_input_contents.append(np.asarray([it], dtype="<f4").tobytes())
        reqs.append(req)
    return reqs


def user_options(run_dir: Path, **overrides):
    """Exactly the options `slimray serve RUN_DIR` deploys with (the run's config), plus benchmark overrides."""
    from slimray.serving.options import options_for_run

    return options_for_run(run_dir.resolve(), **overrides)


# ----------------------------------------------------------------------------------------- in-process limits


def bench_raw(run_dir: Path, items: list, levels: list[int], seconds: float) -> list[dict]:
    from slimray.serving.model import ModelServer

    server = ModelServer(user_options(run_dir))
    codec = server.codec
    rows = []
    for c in levels:
        batch = [items[i % len(items)] for i in range(c)]
        batch = batch if codec.kind == "sentence_encoder" else np.asarray(batch, dtype=np.float32).reshape(c, *codec.spec.input.shape)
        for _ in range(10):
            codec.forward(batch)
        lat, start = [], time.perf_counter()
        while time.perf_counter() - start < seconds and len(lat) < 100_000:
            t0 = time.perf_counter()
            codec.forward(batch)
            lat.append(time.perf_counter() - t0)
        rows.append(summarise("raw", c, lat, time.perf_counter() - start, c * len(lat), 0))

        bodies = json_bodies(codec, [items[i % len(items)] for i in range(c)])
        lat, start = [], time.perf_counter()
        while time.perf_counter() - start < seconds and len(lat) < 100_000:
            t0 = time.perf_counter()
            parts = [codec.parse_v1(json.loads(b)) for b in bodies]
            out = codec.forward(codec.concat(parts))
            for i in range(c):
                json.dumps(codec.v1_answer({k: v[i : i + 1] for k, v in out.items()}))
            lat.append(time.perf_counter() - t0)
        rows.append(summarise("in-process", c, lat, time.perf_counter() - start, c * len(lat), 0))
    return rows


# ----------------------------------------------------------------------------------------- HTTP load


async def drive(one, concurrency: int, *, max_requests: int, seconds: float, warmup_s: float) -> dict:
    """Closed loop: ``concurrency`` workers each awaiting ``one(i)`` (-> ok, seconds) back to back; a warm-up first
    (not recorded: fills the batch queues, opens the connections), then at most ``max_requests`` or ``seconds``."""
    lat: list[float] = []
    errors = 0
    issued = 0
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
    return {"latencies": lat, "elapsed": time.perf_counter() - start, "errors": errors}


async def closed_loop(url: str, bodies: list, concurrency: int, *, max_requests: int, seconds: float, warmup_s: float) -> dict:
    import aiohttp

    assert url.startswith(f"http://{HOST}:"), "the benchmark only targets the loopback address"
    headers = {"Content-Type": "application/json"}
    conn = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:

        async def one(i: int) -> tuple[bool, float]:
            t0 = time.perf_counter()
            try:
                body = bodies[i % len(bodies)]
                data, hdrs = body if isinstance(body, tuple) else (body, headers)
                async with session.post(url, data=data, headers=hdrs) as r:
                    await r.read()
                    ok = r.status == 200
            except (aiohttp.ClientError, asyncio.TimeoutError):
                ok = False
            return ok, time.perf_counter() - t0

        return await drive(one, concurrency, max_requests=max_requests, seconds=seconds, warmup_s=warmup_s)


async def grpc_closed_loop(target: str, requests: list, concurrency: int, *, max_requests: int, seconds: float,
                           warmup_s: float) -> dict:
    """The same closed loop over OIP gRPC ``ModelInfer`` (one channel, HTTP/2 streams), answers checked for outputs."""
    import grpc

    from slimray.serving.grpc import inference_pb2_grpc

    assert target.startswith(f"{HOST}:"), "the benchmark only targets the loopback address"
    async with grpc.aio.insecure_channel(target) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)

        async def one(i: int) -> tuple[bool, float]:
            t0 = time.perf_counter()
            try:
                answer = await stub.ModelInfer(requests[i % len(requests)], timeout=30)
                ok = len(answer.raw_output_contents) > 0
            except grpc.aio.AioRpcError:
                ok = False
            return ok, time.perf_counter() - t0

        return await drive(one, concurrency, max_requests=max_requests, seconds=seconds, warmup_s=warmup_s)


def load_levels(name: str, url: str, bodies: list, levels: list[int], args, *, loop=closed_loop) -> list[dict]:
    rows = []
    for c in levels:
        res = asyncio.run(loop(url, bodies, c, max_requests=args.max_requests, seconds=args.duration_s, warmup_s=args.warmup_s))
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


def plain_server_main(run_dir: str, port: int) -> None:
    """A plain FastAPI + uvicorn server: same model and validation, no batching, sync endpoint, pydantic body."""
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    from slimray.serving.http import RequestError
    from slimray.serving.model import ModelServer

    codec = ModelServer(user_options(Path(run_dir))).codec
    app = FastAPI()

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    if codec.kind == "sentence_encoder":

        @app.post("/v1/embed")
        def embed(req: EmbedRequest):
            try:
                texts = codec.parse_v1({"texts": req.texts})
            except RequestError as err:
                return JSONResponse({"error": err.message}, status_code=err.status)
            return {"model": "m", **codec.v1_answer(codec.forward(texts))}
    else:

        @app.post("/v1/predict")
        def predict(req: PredictRequest):
            try:
                arr = codec.parse_v1({"inputs": req.inputs})
            except RequestError as err:
                return JSONResponse({"error": err.message}, status_code=err.status)
            return {"model": "m", **codec.v1_answer(codec.forward(arr))}

    uvicorn.run(app, host=HOST, port=port, log_level="warning", access_log=False)


def bench_plain(run_dir: Path, verb: str, bodies: list[bytes], levels: list[int], args, *, noop: bool = False) -> list[dict]:
    port = free_port()
    flag = "--noop-server" if noop else "--plain-server"
    proc = subprocess.Popen(
        [sys.executable, __file__, flag, "--run-dir", str(run_dir), "--port", str(port)], start_new_session=True,
    )
    try:
        wait_ready(f"http://{HOST}:{port}/healthz", 120)
        if noop:
            return load_levels("noop-plain", f"http://{HOST}:{port}/noop", bodies, levels, args)
        return load_levels("plain", f"http://{HOST}:{port}/v1/{verb}", bodies, levels, args)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def noop_app():
    """The no-op endpoint: read the body, answer its length (the HTTP stack's own cost, no model, no parsing)."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.post("/noop")
    async def noop(request: Request):
        return {"n": len(await request.body())}

    return app


def bench_noop_serve(bodies: list[bytes], levels: list[int], args) -> list[dict]:
    """The no-op endpoint inside Ray Serve behind its HTTP proxy (``@serve.ingress``), a Ray of its own."""
    import ray
    from ray import serve

    from slimray.runtime import init_ray

    init_ray(num_cpus=2)
    try:
        @serve.deployment(ray_actor_options={"num_cpus": 1}, logging_config={"enable_access_log": False})
        @serve.ingress(noop_app())
        class Noop:
            pass

        port = free_port()
        serve.start(http_options={"host": HOST, "port": port})
        serve.run(Noop.bind(), name="noop", route_prefix="/")
        wait_ready(f"http://{HOST}:{port}/healthz", 120)
        return load_levels("noop-serve", f"http://{HOST}:{port}/noop", bodies, levels, args)
    finally:
        serve.shutdown()
        ray.shutdown()


# ----------------------------------------------------------------------------------------- slimray on Serve


ENV_VARIANTS = {"slimray": {}, "slimray-grpc": {}, "slimray-proxy": {}, "slimray-haproxy": {HA_PROXY_ENV: "1"},
                "slimray-throughput": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}}
# the ingress each variant deploys with (None: the user's default, ServeConfig.ingress)
VARIANT_INGRESS = {"slimray-proxy": "proxy", "slimray-haproxy": "proxy", "slimray-throughput": "proxy"}


def bench_slimray(run_dir: Path, verb: str, bodies: list[bytes], binary: list | None, grpc_reqs: list, levels: list[int],
                  args) -> list[dict]:
    """Each variant on a fresh local Ray (Serve reads its ingress settings when it starts), deployed with the
    options `slimray serve` uses; the default variant is also loaded with binary bodies. ``slimray-grpc`` is the
    same deployment with Serve's gRPC proxy on (``serve.grpc_port``), loaded over gRPC only: the HTTP rows run
    exactly the user's defaults (no gRPC proxy)."""
    import ray
    from ray import serve

    from slimray.runtime import init_ray
    from slimray.serving.app import build_app, deploy

    from slimray.config import ServeConfig

    rows = []
    for name in args.variants:
        for key in {k for env in ENV_VARIANTS.values() for k in env}:
            os.environ.pop(key, None)
        os.environ.update(ENV_VARIANTS[name])
        if name == "slimray-haproxy" and not shutil.which("haproxy"):
            print("  slimray-haproxy: skipped (no haproxy binary on PATH)", flush=True)
            continue
        init_ray(num_cpus=2)
        try:
            opts = user_options(run_dir, name="bench")
            ingress = VARIANT_INGRESS.get(name, ServeConfig.model_fields["ingress"].default)
            grpc_port = free_port() if name == "slimray-grpc" else None
            url = deploy(build_app(opts), name="bench", port=free_port(), route_prefix="/", grpc_port=grpc_port, ingress=ingress)
            wait_ready(f"{url}/healthz", 120)
            if grpc_port is not None:
                rows += load_levels(name, f"{HOST}:{grpc_port}", grpc_reqs, levels, args, loop=grpc_closed_loop)
                continue
            rows += load_levels(name, f"{url}/v1/{verb}", bodies, levels, args)
            if binary and name in ("slimray", "slimray-proxy"):
                rows += load_levels(f"{name}-binary", f"{url}/v1/{verb}", binary, levels, args)
        finally:
            serve.shutdown()
            ray.shutdown()
    for key in {k for env in ENV_VARIANTS.values() for k in env}:  # later Rays (the no-op rows) start without them
        os.environ.pop(key, None)
    return rows


# ----------------------------------------------------------------------------------------- report


def table(rows: list[dict], levels: list[int]) -> str:
    by = {(r["system"], r["concurrency"]): r for r in rows}
    order = ("raw", "in-process", "plain", "slimray", "slimray-binary", "slimray-grpc", "slimray-proxy", "slimray-proxy-binary",
             "slimray-haproxy", "slimray-throughput", "noop-plain", "noop-serve")
    systems = [s for s in order if any(k[0] == s for k in by)]
    lines = ["| system | concurrency | items/s | p50 ms | p99 ms | errors | vs plain | vs raw |", "|---|---|---|---|---|---|---|---|"]
    for c in levels:
        plain, raw = by.get(("plain", c)), by.get(("raw", c))
        for s in systems:
            r = by.get((s, c))
            if r is None:
                continue
            base = by.get(("noop-plain", c)) if s.startswith("noop") else plain
            vs_plain = f"{r['examples_per_s'] / base['examples_per_s']:.2f}x" if base and s.startswith(("slimray", "noop")) and base["examples_per_s"] else ""
            vs_raw = f"{r['examples_per_s'] / raw['examples_per_s']:.2f}x" if raw and s != "raw" and raw["examples_per_s"] else ""
            lines.append(
                f"| {s} | {c} | {r['examples_per_s']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['errors']} | {vs_plain} | {vs_raw} |"
            )
    return "\n".join(lines)


def bench_run(run_dir: Path, levels: list[int], args) -> dict:
    """Every system on one run; returns its rows, table and what was sent."""
    from slimray.serving.model import ModelServer

    codec = ModelServer(user_options(run_dir)).codec
    items = sample_items(run_dir, codec)
    bodies = json_bodies(codec, items)
    binary = binary_bodies(codec, items) if codec.kind == "classifier" else None
    grpc_reqs = grpc_requests(codec, items, model="bench")
    verb = codec.v1_verb
    rows: list[dict] = []
    print(f"== {run_dir} ({codec.kind})", flush=True)
    if "raw" not in args.skip:
        print("raw forward and in-process request path", flush=True)
        rows += bench_raw(run_dir, items, levels, min(args.duration_s, 3.0))
    if "plain" not in args.skip:
        print("plain FastAPI + uvicorn", flush=True)
        rows += bench_plain(run_dir, verb, bodies, levels, args)
    if "slimray" not in args.skip:
        print("slimray on Ray Serve", flush=True)
        rows += bench_slimray(run_dir, verb, bodies, binary, grpc_reqs, levels, args)
    if "noop" not in args.skip:
        print("no-op endpoint: plain uvicorn, then Ray Serve behind its proxy (the same JSON bodies)", flush=True)
        rows += bench_plain(run_dir, verb, bodies, levels, args, noop=True)
        rows += bench_noop_serve(bodies, levels, args)
    return {"run_dir": str(run_dir), "kind": codec.kind, "request_bytes": [len(b) for b in bodies],
            "grpc_request_bytes": [r.ByteSize() for r in grpc_reqs], "options": user_options(run_dir).model_dump(),
            "rows": rows, "table": table(rows, levels)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", type=Path, nargs="+", help="finished runs with winner/ (e.g. /tmp/runs/mnist /tmp/runs/minilm)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--duration-s", type=float, default=6.0, help="measured seconds per level (bound)")
    p.add_argument("--max-requests", type=int, default=20_000, help="requests per level (bound)")
    p.add_argument("--warmup-s", type=float, default=1.0)
    p.add_argument("--variants", nargs="+", default=["slimray", "slimray-grpc", "slimray-proxy"], choices=list(ENV_VARIANTS))
    p.add_argument("--skip", nargs="*", default=[], choices=["raw", "plain", "slimray", "noop"])
    p.add_argument("--out", type=Path, default=Path("bench/results/serve_load.json"))
    # internal: the plain server's subprocess
    p.add_argument("--plain-server", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--noop-server", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.plain_server:
        plain_server_main(str(args.run_dir[0]), args.port)
        return 0
    if args.noop_server:
        import uvicorn

        uvicorn.run(noop_app(), host=HOST, port=args.port, log_level="warning", access_log=False)
        return 0
    if not args.run_dir or not all((d / "winner" / "spec.json").is_file() for d in args.run_dir):
        p.error("--run-dir must name finished runs, each with winner/spec.json")
    if any(c < 1 or c > 256 for c in args.concurrency):
        p.error("concurrency must lie in 1..256")

    levels = sorted(set(args.concurrency))
    runs: list[dict] = []
    t0 = time.time()
    load_at_start = os.getloadavg()
    print(f"load average at start: {load_at_start}", flush=True)
    try:
        for run_dir in args.run_dir:
            runs.append(bench_run(run_dir, levels, args))
            args.skip = [*args.skip, "noop"]  # the no-op rows once (they do not depend on the run)
    finally:
        try:
            import ray

            if ray.is_initialized():
                from ray import serve

                serve.shutdown()
                ray.shutdown()
        except Exception as err:  # noqa: BLE001 - report, still write what was measured
            print(f"shutdown: {err}", file=sys.stderr)

    load_at_end = os.getloadavg()
    for run in runs:
        print(f"\n{run['run_dir']} ({run['kind']})\n{run['table']}")
    print(f"\nload average at start {load_at_start}, at end {load_at_end}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "settings": {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if k == "run_dir" else v)
                     for k, v in vars(args).items() if k not in ("plain_server", "noop_server", "port")},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "loadavg_at_start": load_at_start,
                    "loadavg_at_end": load_at_end},
        "wall_s": round(time.time() - t0, 1),
    }
    args.out.write_text(json.dumps({"meta": meta, "runs": runs}, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
