"""The ``slimray`` command.

    slimray run [--recipe NAME | --config FILE] [--out DIR] [--address ADDR] [--no-serve] [--fresh]
    slimray serve RUN_DIR [--port N] [--replicas N] [--host HOST] [--address ADDR]
    slimray recipes

``run`` takes the teacher through distillation, the compression sweep and (unless ``--no-serve``) serves
the winner until Ctrl-C. ``--address`` / ``RAY_ADDRESS`` reaches a running cluster; without them Ray is
started in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from slimray.config import ServeConfig, load_config, recipe_names
from slimray.schema import ConfigError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slimray", description="Distil, compress and serve PyTorch models on Ray.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="the whole pipeline: distil -> sweep -> serve")
    src = run.add_mutually_exclusive_group()
    src.add_argument("--recipe", help=f"a recipe shipped with slimray (default mnist)")
    src.add_argument("--config", type=Path, help="a pipeline config file (YAML or JSON)")
    run.add_argument("--out", type=Path, default=Path("runs"), help="output folder (default ./runs)")
    run.add_argument("--name", help="run name (default: the config's name)")
    run.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    run.add_argument("--no-serve", action="store_true", help="stop after the report; do not deploy")
    run.add_argument("--fresh", action="store_true", help="discard an earlier run of the same name")
    run.add_argument("--port", type=int, help="HTTP port (default from the config, 8000)")

    srv = sub.add_parser("serve", help="serve the winner of a finished run")
    srv.add_argument("run_dir", type=Path)
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    srv.add_argument("--replicas", type=int, default=1)
    srv.add_argument("--address", help="Ray cluster address")

    sub.add_parser("recipes", help="list the recipes shipped with slimray")
    return p


def _post_json(url: str, body: dict, *, timeout: float = 30.0) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    key = os.environ.get("SLIMRAY_API_KEY")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def _serve_run_dir(run_dir: Path, serve_cfg: ServeConfig, *, name: str) -> str:
    from slimray.serving.app import ServeOptions, build_app, deploy

    fields = set(ServeOptions.model_fields) - {"model_dir", "name"}
    options = ServeOptions(model_dir=str(run_dir / "winner"), name=name, **serve_cfg.model_dump(include=fields))
    return deploy(build_app(options), name=name, host=serve_cfg.host, port=serve_cfg.port, route_prefix=serve_cfg.route_prefix)


def _check_and_wait(url: str, run_dir: Path) -> None:
    """Answer one real request, compare with the model in-process, then serve until Ctrl-C."""
    import torch

    from slimray.artifacts import load_artifact
    from slimray.data import load_dataset, normalize

    model, spec = load_artifact(run_dir / "winner")
    report = json.loads((run_dir / "report.json").read_text())
    ds = load_dataset(report["dataset"], seed=json.loads((run_dir / "config.json").read_text())["data"]["seed"])
    x = ds.test.x[:8]
    body = {"inputs": x.tolist()}
    sample = run_dir / "sample_request.json"
    sample.write_text(json.dumps(body))
    deadline = time.monotonic() + 60
    while True:
        try:
            answer = _post_json(f"{url}/v1/predict", body)
            break
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    with torch.inference_mode():
        local = model(normalize(torch.from_numpy(x), spec.input)).argmax(1).tolist()
    same = answer["predictions"] == local
    print(f"served predictions {answer['predictions']} (labels {ds.test.y[:8].tolist()}); in-process {local}: {'same' if same else 'DIFFERENT'}")
    print(f"\nServing {url}/v1/predict  (OpenAPI: {url}/docs, health: {url}/healthz)")
    print(f"  curl -s -X POST {url}/v1/predict -H 'Content-Type: application/json' -d @{sample}")
    print("Ctrl-C stops the server.", flush=True)
    while True:
        time.sleep(3600)


def _serve_until_interrupted(run_dir: Path, serve_cfg: ServeConfig, *, name: str) -> int:
    try:
        url = _serve_run_dir(run_dir, serve_cfg, name=name)
        _check_and_wait(url, run_dir)
    except KeyboardInterrupt:
        print("\nstopping the server", file=sys.stderr)
        from ray import serve

        serve.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "recipes":
            print("\n".join(recipe_names()))
            return 0
        if args.command == "run":
            cfg = load_config(recipe=args.recipe, config=args.config)  # fails here, before Ray starts
            if args.name:
                cfg = cfg.model_copy(update={"name": args.name})
                type(cfg).model_validate(cfg.model_dump())
            if args.port:
                cfg.serve.port = args.port
            from slimray.pipeline import run_pipeline

            run_pipeline(cfg, out_dir=args.out, address=args.address, fresh=args.fresh)
            if args.no_serve:
                return 0
            return _serve_until_interrupted((args.out / cfg.name).resolve(), cfg.serve, name=cfg.name)
        if args.command == "serve":
            from slimray.runtime import init_ray

            run_dir = args.run_dir.resolve()
            if not (run_dir / "winner" / "spec.json").exists():
                raise ConfigError(f"{run_dir} holds no finished run (no winner/spec.json)")
            cfg_path = run_dir / "config.json"
            from slimray.config import PipelineConfig

            cfg = PipelineConfig.from_file(cfg_path)
            serve_cfg = cfg.serve.model_copy(update={"port": args.port, "host": args.host, "num_replicas": args.replicas})
            init_ray(args.address)
            return _serve_until_interrupted(run_dir, serve_cfg, name=cfg.name)
    except ConfigError as err:
        print(f"slimray: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
