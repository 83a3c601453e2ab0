"""Peak memory of serving one artifact, measured in a fresh process.

A trial's own process has already fine-tuned and quantized models, and the allocator keeps what they
freed, so its resident-set growth under-counts a later load. This probe starts clean: it imports torch
and ONNX Runtime, builds the input batch, records the resident set, then loads the artifact in its
runtime and runs one batch; the growth of the peak resident set (Linux ``VmHWM``) is the figure.

    python -m slimray.compress.memprobe ARTIFACT_DIR --loader slimray.families.classifier.artifacts:load_runnable --input-shape 1,8,8 \
        --batch-size 64 --num-threads 1

prints one JSON line: ``{"peak_memory_bytes": N}`` (``null`` where the peak cannot be read). The family that
wrote the artifact names its loader (``module:function``, called as ``function(path, num_threads=N)`` and
returning ``(runnable, spec)``) and one example's shape: this module knows no artifact format.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path


def probe(path: str | Path, *, loader: str, input_shape: Sequence[int], batch_size: int, num_threads: int = 1,
          timeout_s: float = 300.0) -> int | None:
    """Run the probe in a child process; returns the bytes (``None`` if it could not measure). ``loader`` is the
    artifact's ``module:function`` (see the module docstring), ``input_shape`` one example's shape."""
    out = subprocess.run(
        [sys.executable, "-m", "slimray.compress.memprobe", str(path), "--loader", loader,
         "--input-shape", ",".join(str(int(d)) for d in input_shape), "--batch-size", str(batch_size),
         "--num-threads", str(num_threads)],
        capture_output=True, text=True, timeout=timeout_s, check=False,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"loading and running {Path(path).name} in a fresh process failed: {failure_cause(out.stderr, out.returncode)}")
    return json.loads(lines[-1])["peak_memory_bytes"]


def failure_cause(stderr: str, returncode: int) -> str:
    """The child's exception line (``Type: message``) first, then the frame that raised it; the exit status
    (and the signal, for a negative one) when it printed no exception."""
    lines = [line.rstrip() for line in stderr.splitlines() if line.strip()]
    exc = next((i for i in range(len(lines) - 1, -1, -1) if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b", lines[i])), None)
    if exc is None:
        status = f"killed by signal {-returncode}" if returncode < 0 else f"exit status {returncode}"
        tail = " | ".join(lines[-3:])
        return f"{status}, no exception printed" + (f" ({tail[-400:]})" if tail else "")
    frame = next((lines[i].strip() for i in range(exc - 1, -1, -1) if lines[i].lstrip().startswith("File ")), None)
    return lines[exc][:500] + (f" (raised at {frame})" if frame else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="peak memory of loading an artifact and running one batch")
    p.add_argument("path", type=Path)
    p.add_argument("--loader", required=True, help="module:function loading the artifact, (path, num_threads=N) -> (runnable, spec)")
    p.add_argument("--input-shape", required=True, help="one example's shape, comma-separated")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-threads", type=int, default=1)
    args = p.parse_args(argv)

    import onnxruntime  # noqa: F401  (imported before the baseline: its import is not the model's memory)
    import torch

    from slimray.compress.measure import peak_memory_bytes

    module, _, attr = args.loader.partition(":")
    load = getattr(importlib.import_module(module), attr)  # imported before the baseline, like torch
    torch.set_num_threads(args.num_threads)
    x = torch.zeros(args.batch_size, *(int(d) for d in args.input_shape.split(",")))

    def load_and_run() -> None:
        model, _ = load(args.path, num_threads=args.num_threads)
        with torch.inference_mode():
            model(x)

    peak, _ = peak_memory_bytes(load_and_run)
    print(json.dumps({"peak_memory_bytes": peak}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
