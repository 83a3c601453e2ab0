"""The same causal LMs in two engines, side by side in one invocation: HF eager (slimray's loader, the runtime the
search times) and vLLM's CPU build (the engine behind ``ray.serve.llm``; ``make install`` installs it in the
project's venv), at each thread count asked for.

Run from the repository root with the project's venv active::

    python bench/lm_engines.py --run-dir RUNS/smollm --threads 1 2 --rounds 3 --out bench/results/lm_engines.json

Rows: the teacher as given (``RUN/teacher``, fp32, HF eager), the winner (``RUN/winner``) in HF eager, the teacher
in vLLM in bf16 (the uncompressed teacher served by the standard engine: the baseline a compression must beat to be
worth more than the engine) and the winner in vLLM (its compressed-tensors weights as stored). Figures: prefill tok/s
of one 256-token prompt; decode tok/s at batch 1 (128 new tokens after a 16-token prompt, the one-token time
subtracted); 8 streams (HF: a batch of 8; vLLM: 8 prompts at once, continuous batching), total generated tok/s.
Prompts are random token ids (fixed seed), EOS ignored, vLLM's prefix cache off. Each vLLM configuration lives in
one persistent worker process (loaded once), so every round times every row in turn, order rotated per round; the
table gives the best round, the median and the spread (best - worst) / best. Machines here are shared and noisy: a
ratio inside the spread is a tie.

llama.cpp rows, when ``llama-cpp-python`` is installed (it builds from source, ~15 min on 2 cores; see
docs/llm-vllm.md): the packaged SmolLM2 GGUF as shipped (Q4_1: the starting point of a user who has this model)
and the winner exported by ``slimray export --format gguf`` in each ``--gguf-types`` (written once under
``RUN/gguf/``), each with ``n_threads`` = the row's threads. Prefill and decode b1 as above (greedy, EOS ignored);
llama-cpp-python runs one sequence at a time, so its 8-stream figure is not measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PREFILL, PROMPT, NEW, STREAMS = 256, 16, 128, 8

# runs in the vLLM venv; one line in ("go") -> one JSON line out with the three figures (median of 3 each)
WORKER = r"""
import json, statistics, sys, time, random
from vllm import LLM, SamplingParams
folder, dtype, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])
llm = LLM(model=folder, dtype=dtype, enforce_eager=True, max_model_len=1024, enable_prefix_caching=False, seed=0)
vocab = llm.get_tokenizer().vocab_size
rng = random.Random(0)
def ids(n): return [rng.randrange(100, vocab - 100) for _ in range(n)]
def run(prompts, n):
    t = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(max_tokens=n, ignore_eos=True, temperature=0),
                 use_tqdm=False)
    return time.perf_counter() - t
run([ids(PROMPT)], 8)  # warm-up
print("READY", flush=True)
for line in sys.stdin:
    pre = statistics.median(PREFILL / run([ids(PREFILL)], 1) for _ in range(repeats))
    dec = []
    for _ in range(repeats):
        p = ids(PROMPT)
        dec.append(NEW / max(run([p], NEW + 1) - run([p], 1), 1e-9))
    streams = statistics.median(STREAMS * NEW / run([ids(PROMPT) for _ in range(STREAMS)], NEW) for _ in range(repeats))
    print("RESULT " + json.dumps({"prefill_tokens_per_s": pre, "decode_tokens_per_s_b1": statistics.median(dec),
                      "streams8_tokens_per_s": streams}), flush=True)
""".replace("PREFILL", str(PREFILL)).replace("PROMPT", str(PROMPT)).replace("NEW", str(NEW)).replace("STREAMS", str(STREAMS))


class VllmRow:
    """One vLLM engine (folder, dtype, threads) in a worker process of the vLLM venv."""

    def __init__(self, python: Path, folder: Path, *, dtype: str, threads: int, repeats: int = 3):
        env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "0" if threads == 1 else f"0-{threads - 1}", "HF_HUB_OFFLINE": "1",
               "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "PYTHONPATH": ""}
        self.log = open(ROOT / "bench" / "results" / f"vllm-{folder.name}-{dtype}-{threads}t.log", "w")
        t = time.perf_counter()
        self.proc = subprocess.Popen([str(python), "-c", WORKER, str(folder), dtype, str(repeats)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        if self._line("READY") is None:
            raise RuntimeError(f"vLLM did not load {folder} ({dtype}): see {self.log.name}")
        self.load_s = time.perf_counter() - t

    def time(self) -> dict[str, float]:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        line = self._line("RESULT ")
        if line is None:
            raise RuntimeError(f"the vLLM worker ended: see {self.log.name}")
        return json.loads(line[len("RESULT "):])

    def _line(self, prefix: str) -> str | None:
        """The worker's next stdout line starting with ``prefix`` (vLLM logs to stdout too: those lines go to the log)."""
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line
            self.log.write(line)
        return None

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.log.close()


class HfRow:
    """A model loaded by slimray (``load_lm``), timed with the search's own functions."""

    def __init__(self, folder: Path, *, threads: int, repeats: int = 3):
        from slimray.families.causal_lm.artifacts import load_lm

        self.threads, self.repeats = threads, repeats
        t = time.perf_counter()
        self.model = load_lm(folder)[0]
        self.load_s = time.perf_counter() - t

    def time(self) -> dict[str, float]:
        import torch

        from slimray.families.causal_lm.evaluate import decode_tokens_per_s, prefill_tokens_per_s

        torch.set_num_threads(self.threads)
        n = self.repeats
        return {"prefill_tokens_per_s": prefill_tokens_per_s(self.model, prompt_len=PREFILL, num_repeats=n),
                "decode_tokens_per_s_b1": decode_tokens_per_s(self.model, batch_size=1, num_new_tokens=NEW, num_repeats=n),
                "streams8_tokens_per_s": decode_tokens_per_s(self.model, batch_size=STREAMS, num_new_tokens=NEW, num_repeats=n)}

    def close(self) -> None:
        pass


class LlamaCppRow:
    """A GGUF file in llama.cpp (``llama-cpp-python``), in this process."""

    def __init__(self, path: Path, *, threads: int, repeats: int = 3):
        from llama_cpp import Llama

        self.repeats = repeats
        t = time.perf_counter()
        self.llm = Llama(model_path=str(path), n_ctx=1024, n_batch=512, n_threads=threads, n_threads_batch=threads,
                         seed=0, verbose=False)
        self.load_s = time.perf_counter() - t
        self.vocab = self.llm.n_vocab()

    def _ids(self, rng, n: int) -> list[int]:
        return [rng.randrange(100, self.vocab - 100) for _ in range(n)]

    def _gen(self, prompt: list[int], n: int) -> float:
        t = time.perf_counter()
        for i, _ in enumerate(self.llm.generate(prompt, top_k=1, temp=0.0, reset=True), 1):
            if i == n:
                break
        return time.perf_counter() - t

    def time(self) -> dict[str, float]:
        import random
        import statistics

        rng = random.Random(0)
        pre = []
        for _ in range(self.repeats):
            ids = self._ids(rng, PREFILL)
            self.llm.reset()
            t = time.perf_counter()
            self.llm.eval(ids)
            pre.append(PREFILL / (time.perf_counter() - t))
        dec = []
        for _ in range(self.repeats):
            p = self._ids(rng, PROMPT)
            dec.append(NEW / max(self._gen(p, NEW + 1) - self._gen(p, 1), 1e-9))
        return {"prefill_tokens_per_s": statistics.median(pre), "decode_tokens_per_s_b1": statistics.median(dec)}

    def close(self) -> None:
        self.llm.close()


def llama_cpp_rows(run_dir: Path, *, threads: int, gguf_types: list[str], repeats: int) -> dict[str, LlamaCppRow]:
    """The packaged GGUF and the winner's exports in llama.cpp, or none when llama-cpp-python is missing."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama-cpp-python is not installed: no llama.cpp rows", file=sys.stderr)
        return {}
    from slimray.families.causal_lm.gguf_export import write_gguf
    from slimray.families.causal_lm.teacher import smollm2_gguf_path

    rows = {"teacher GGUF as packaged (Q4_1), llama.cpp": LlamaCppRow(smollm2_gguf_path(), threads=threads, repeats=repeats)}
    for qtype in gguf_types:
        path = run_dir / "gguf" / f"winner-{qtype}.gguf"
        if not path.exists():
            write_gguf(run_dir / "winner", path, qtype=qtype)
        rows[f"winner GGUF {qtype} (slimray export), llama.cpp"] = LlamaCppRow(path, threads=threads, repeats=repeats)
    return rows


def main(argv: list[str] | None = None) -> int:
    from slimray.sweep.select import rounds_summary

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", type=Path, required=True, help="a finished causal_lm run (teacher/ and winner/)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--vllm-python", type=Path, default=Path(sys.executable), help="a Python with vLLM (default: this one)")
    p.add_argument("--gguf-types", nargs="*", default=["q8_0", "q4_0"], help="llama.cpp rows: the winner exported in these")
    p.add_argument("--repeats", type=int, default=3, help="measurements per figure in a round (their median)")
    p.add_argument("--vllm-teacher-dtypes", nargs="+", default=["bfloat16"],
                   help="the uncompressed teacher in vLLM in these dtypes (float32 beats bfloat16 on CPUs without AVX512-BF16)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    teacher, winner = args.run_dir / "teacher", args.run_dir / "winner"
    results = {"load": os.getloadavg(), "rounds": args.rounds, "rows": {}}
    for threads in args.threads:
        n = args.repeats
        rows = {"teacher, HF eager (as given)": HfRow(teacher, threads=threads, repeats=n),
                "winner, HF eager": HfRow(winner, threads=threads, repeats=n)}
        if args.vllm_python.exists():
            for dtype in args.vllm_teacher_dtypes:
                rows[f"teacher {dtype}, vLLM"] = VllmRow(args.vllm_python, teacher, dtype=dtype, threads=threads, repeats=n)
            rows["winner, vLLM"] = VllmRow(args.vllm_python, winner, dtype="auto", threads=threads, repeats=n)
        else:
            print(f"no Python at {args.vllm_python}: HF rows only", file=sys.stderr)
        rows.update(llama_cpp_rows(args.run_dir, threads=threads, gguf_types=args.gguf_types, repeats=n))
        samples: dict[str, dict[str, list[float]]] = {k: {} for k in rows}
        keys = list(rows)
        for r in range(args.rounds):
            for key in keys[r % len(keys):] + keys[:r % len(keys)]:
                for metric, v in rows[key].time().items():
                    samples[key].setdefault(metric, []).append(v)
                print(f"{threads} thread(s), round {r + 1}: {key}: " + ", ".join(f"{m} {v[-1]:.1f}" for m, v in samples[key].items()),
                      flush=True)
        for key, row in rows.items():
            results["rows"][f"{key} [{threads}t]"] = {"load_s": row.load_s, **{m: rounds_summary(v) for m, v in samples[key].items()}}
            row.close()
    results["load_after"] = os.getloadavg()
    lines = ["| engine / model | threads | prefill tok/s | decode b1 tok/s | 8 streams tok/s | spread (decode) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for key, r in results["rows"].items():
        name, threads = key.rsplit(" [", 1)
        streams = f"{r['streams8_tokens_per_s']['best']:.1f}" if "streams8_tokens_per_s" in r else "-"
        lines.append(f"| {name} | {threads.rstrip('t]')} | {r['prefill_tokens_per_s']['best']:.0f} | "
                     f"{r['decode_tokens_per_s_b1']['best']:.1f} | {streams} | "
                     f"{100 * r['decode_tokens_per_s_b1']['spread']:.0f}% |")
    write_results(results, lines, args.out)
    return 0


def write_results(results: dict, lines: list[str], out: Path | None) -> None:
    """Print the table and the load averages around the run; write the JSON to ``out`` when given."""
    print("\n".join(lines))
    print(f"load average before {results['load'][0]:.1f}, after {results['load_after'][0]:.1f}")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
