"""Streaming throughput of slimray's OpenAI-compatible causal-LM endpoint on Ray Serve: generated tokens/s for 1 vs N
concurrent streaming requests (continuous batching shares each decode step among the requests in flight).

Run from the repository root with the virtual environment active::

    python bench/lm_serve.py --tiny                       # a random 2-layer Llama (hidden 64), seconds
    python bench/lm_serve.py --smollm                     # the SmolLM2-135M teacher (GGUF converted once)
    python bench/lm_serve.py --model-dir RUN/winner       # any causal_lm artifact / HF folder

For each concurrency (default 1 and 8) it runs ``--rounds`` rounds; in a round each of the ``concurrency`` clients
sends one streaming ``/v1/completions`` request (greedy, ``--max-tokens``, ``stream_options.include_usage``) with
its own prompt, all at once; tokens are the servers' ``usage.completion_tokens``, time is from the first request's
start to the last stream's end. Also prints the time to first token and the engine's step counts (mean step batch)
from ``GET /v1/replica``. One local Ray (2 CPUs), one replica; only 127.0.0.1 is contacted. ``--out`` writes JSON.
``--in-process`` runs the same rounds on the engine alone (``BatchEngine``, no Serve, no HTTP): the request path's
limit on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

HOST = "127.0.0.1"
PROMPTS = ["The history of music", "Rivers flow from the mountains", "A computer program is", "Paris is the capital of",
           "Bees collect nectar from", "The cat sat on the mat and", "In the early twentieth century,", "Mathematics is the study of"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def tiny_model_dir(out: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.serving.test_openai_lm import make_tiny_lm

    return make_tiny_lm(out / "tiny-lm")


def smollm_dir(out: Path) -> Path:
    from slimray.families.causal_lm.teacher import ensure_smollm2_teacher

    return ensure_smollm2_teacher(out)


async def one_stream(client, url: str, body: dict) -> tuple[int, float, float]:
    """(completion tokens, seconds to the first token, seconds to the end) of one streaming request."""
    start, first, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("choices") and first is None:
                first = time.perf_counter() - start
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return tokens, first or 0.0, time.perf_counter() - start


async def level(url: str, *, model: str, concurrency: int, rounds: int, max_tokens: int) -> dict:
    import httpx

    rates, ttfts, tokens_total = [], [], 0
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        await one_stream(client, url, {"model": model, "prompt": "warm up", "max_tokens": 4, "stream": True})
        for r in range(rounds):
            bodies = [{"model": model, "prompt": PROMPTS[(r + i) % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}} for i in range(concurrency)]
            start = time.perf_counter()
            results = await asyncio.gather(*(one_stream(client, url, b) for b in bodies))
            wall = time.perf_counter() - start
            n = sum(t for t, _, _ in results)
            tokens_total += n
            rates.append(n / wall)
            ttfts += [f for _, f, _ in results]
    return {"concurrency": concurrency, "rounds": rounds, "tokens": tokens_total, "tokens_per_s_median": statistics.median(rates),
            "tokens_per_s_rounds": [round(x, 1) for x in rates], "ttft_ms_median": 1000 * statistics.median(ttfts)}


def in_process(model_dir: Path, args) -> int:
    """The rounds of ``level`` on a ``BatchEngine`` in this process (one torch thread per ``--num-threads``)."""
    import torch

    from slimray.families.causal_lm import openai as oa
    from slimray.families.causal_lm.artifacts import load_lm
    from slimray.families.causal_lm.engine import BatchEngine
    from slimray.families.causal_lm.serving import eos_ids

    torch.set_num_threads(args.num_threads)
    model, tok, _ = load_lm(model_dir)
    limits = oa.Limits(context_len=int(model.config.max_position_embeddings), max_tokens_limit=args.max_tokens)
    results: dict = {"model_dir": str(model_dir), "mode": "in-process engine", "max_tokens": args.max_tokens,
                     "num_threads": args.num_threads, "loadavg_before": os.getloadavg(), "levels": []}

    async def run(engine, bodies):
        async def one(body):
            n = 0
            async for _ in engine.generate(oa.prepare(oa.parse_request("completion", body), tok, limits=limits)):
                n += 1
            return n

        return await asyncio.gather(*(one(b) for b in bodies))

    for c in args.concurrency:
        engine = BatchEngine(model, tok, eos_token_ids=eos_ids(model, tok), max_num_seqs=max(args.concurrency))
        asyncio.run(run(engine, [{"prompt": "warm up", "max_tokens": 4}]))
        rates = []
        for r in range(args.rounds):
            bodies = [{"prompt": PROMPTS[(r + i) % len(PROMPTS)], "max_tokens": args.max_tokens, "temperature": 0} for i in range(c)]
            start = time.perf_counter()
            n = sum(asyncio.run(run(engine, bodies)))
            rates.append(n / (time.perf_counter() - start))
        info = engine.info()
        engine.close()
        row = {"concurrency": c, "tokens_per_s_median": statistics.median(rates), "tokens_per_s_rounds": [round(x, 1) for x in rates],
               "mean_step_batch": info["mean_step_batch"]}
        results["levels"].append(row)
        print(f"in-process concurrency {c}: {row['tokens_per_s_median']:.1f} tok/s (rounds {row['tokens_per_s_rounds']}), "
              f"mean step batch {row['mean_step_batch']}", flush=True)
    base = results["levels"][0]["tokens_per_s_median"]
    for row in results["levels"][1:]:
        print(f"ratio c={row['concurrency']} / c={results['levels'][0]['concurrency']}: {row['tokens_per_s_median'] / base:.2f}x")
    results["loadavg_after"] = os.getloadavg()
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--tiny", action="store_true")
    src.add_argument("--smollm", action="store_true")
    src.add_argument("--model-dir", type=Path)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--num-threads", type=int, default=1, help="torch threads in the replica")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "slimray-bench-lm")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--in-process", action="store_true", help="the engine alone, no Serve (see the module docstring)")
    args = ap.parse_args()

    import ray
    from ray import serve

    from slimray.serving.app import ServeOptions, build_app, deploy

    args.cache.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        model_dir = args.cache / "tiny-lm" if (args.cache / "tiny-lm").exists() else tiny_model_dir(args.cache)
    elif args.smollm:
        model_dir = smollm_dir(args.cache / "smollm2-teacher")
    else:
        model_dir = args.model_dir
    if args.in_process:
        return in_process(model_dir, args)
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    results: dict = {"model_dir": str(model_dir), "max_tokens": args.max_tokens, "num_threads": args.num_threads,
                     "loadavg_before": os.getloadavg(), "levels": []}
    try:
        port = free_port()
        options = ServeOptions(model_dir=str(model_dir), name="bench-lm", kind="causal_lm", num_cpus_per_replica=1,
                               num_threads=args.num_threads, max_num_seqs=max(args.concurrency), max_tokens_limit=max(args.max_tokens, 16),
                               max_ongoing_requests=max(16, max(args.concurrency) + 2))
        url = deploy(build_app(options), name="bench-lm", port=port)
        import httpx

        for _ in range(600):
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        for c in args.concurrency:
            before = httpx.get(f"{url}/v1/replica", timeout=30).json()["engine"]
            row = asyncio.run(level(url, model="bench-lm", concurrency=c, rounds=args.rounds, max_tokens=args.max_tokens))
            after = httpx.get(f"{url}/v1/replica", timeout=30).json()["engine"]
            steps = after["num_steps"] - before["num_steps"]
            row["mean_step_batch"] = round((after["num_step_rows"] - before["num_step_rows"]) / steps, 2) if steps else 0.0
            row["largest_step_batch"] = after["largest_step_batch"]
            results["levels"].append(row)
            print(f"concurrency {c}: {row['tokens_per_s_median']:.1f} tok/s (median of {args.rounds} rounds {row['tokens_per_s_rounds']}), "
                  f"TTFT p50 {row['ttft_ms_median']:.0f} ms, mean step batch {row['mean_step_batch']}", flush=True)
        base = results["levels"][0]["tokens_per_s_median"]
        for row in results["levels"][1:]:
            print(f"ratio c={row['concurrency']} / c={results['levels'][0]['concurrency']}: {row['tokens_per_s_median'] / base:.2f}x")
        results["loadavg_after"] = os.getloadavg()
        if args.out:
            args.out.write_text(json.dumps(results, indent=2) + "\n")
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
