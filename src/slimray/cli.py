"""The ``slimray`` command.

    slimray run [--recipe NAME | --config FILE] [--space FILE] [--out DIR] [--address ADDR] [--no-serve] [--fresh] [--port N] [--grpc-port N]
    slimray distill [--recipe NAME | --config FILE] [--num-workers N]
    slimray sweep [--recipe NAME | --config FILE] [--space FILE] [--student DIR] [--resume]
    slimray serve RUN_DIR [--port N] [--replicas N] [--host HOST] [--grpc-port N] [--ingress direct|proxy] [--address ADDR]
    slimray export RUN_DIR --format onnx|torch-export [--trial KEY] --out FILE
    slimray recipes
    slimray init --model PKG.MODULE:FACTORY --weights W.safetensors --data PATH [--test PATH] [--code-dir DIR] [--out slimray.yaml]

``run`` takes the teacher through distillation, the compression sweep and (unless ``--no-serve``) serves
the winner until Ctrl-C; with ``--space`` a distillation sweep (Tune trials, each a Ray Train run) picks
the student first. ``sweep --space`` runs what the space file ranges over: distillation settings, then
compression settings on the best student. ``--address`` / ``RAY_ADDRESS`` reaches a running cluster; without them Ray is
started in this process.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
from pathlib import Path

from slimray.auth import AuthError
from slimray.config import PipelineConfig, ServeConfig, recipe_names
from slimray.jobs import DEFAULT_DASHBOARD
from slimray.schema import ClusterTooSmallError, ConfigError, DeploymentFailedError


def _source_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--recipe", help="a recipe shipped with slimray (default mnist)")
    src.add_argument("--config", type=Path, help="a pipeline config file (YAML or JSON)")
    src.add_argument("--config-env", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=Path("runs"), help="output folder (default ./runs)")
    p.add_argument("--run-name", "--name", dest="name", help="run name (default: the config's name)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--fresh", action="store_true", help="discard an earlier run of the same name")
    p.add_argument("--verbose", action="store_true", help="Ray worker output and Tune's tables on the console too")


def _load_any(args):
    """(family, config) named on the command line, any model family, with --name/--port applied; fails before Ray starts."""
    from slimray.runconfig import config_from_json, load_run_config, with_overrides

    if args.config_env:
        family, cfg = config_from_json(os.environ.get(args.config_env, ""), source=f"${args.config_env}")
    else:
        family, cfg = load_run_config(recipe=args.recipe, config=args.config)
    if family.name != "classifier":
        if getattr(args, "space", None) or getattr(args, "space_env", None):
            raise ConfigError(f"--space: sweep-space files apply to the classifier family; {family.name} runs take their search from the config")
        return family, with_overrides(family, cfg, name=args.name, port=getattr(args, "port", None),
                                      grpc_port=getattr(args, "grpc_port", None), num_workers=getattr(args, "num_workers", None),
                                      use_gpu=getattr(args, "use_gpu", False))
    return family, _load(args, cfg)


def _load(args, cfg: PipelineConfig | None = None) -> PipelineConfig:
    """The classifier config named on the command line, with its overrides applied; fails before Ray starts."""
    if cfg is None:
        family, cfg = _load_any(args)
        if family.name != "classifier":
            raise ConfigError(f"slimray {args.command} runs classifier configs; for a {family.name} config use `slimray run`")
        return cfg
    data = cfg.model_dump()
    if args.name:
        data["name"] = args.name
    if getattr(args, "num_workers", None):
        data["distill"]["num_workers"] = args.num_workers
    if getattr(args, "use_gpu", False):
        data["distill"]["use_gpu"] = True
    if getattr(args, "port", None):
        data["serve"]["port"] = args.port
    if getattr(args, "grpc_port", None):
        data["serve"]["grpc_port"] = args.grpc_port
    if getattr(args, "space", None):
        from slimray.sweep.space import load_space_file

        data["distill_sweep"] = load_space_file(args.space).model_dump(exclude_none=True)
    elif getattr(args, "space_env", None):  # a space shipped inside a Ray Job's environment (slimray.jobs)
        from slimray.sweep.space import SweepSpaceFile

        space = SweepSpaceFile.from_json(os.environ.get(args.space_env, ""), source=f"${args.space_env}")
        data["distill_sweep"] = space.model_dump(exclude_none=True)
    data["search"]["space_file"] = None  # already expanded into search.space
    return PipelineConfig.from_dict(data, source="the command line")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slimray", description="Distil, compress and serve PyTorch models on Ray.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="the whole pipeline: distil -> sweep -> serve")
    _source_args(run)
    run.add_argument("--no-serve", action="store_true", help="stop after the report; do not deploy")
    run.add_argument("--port", type=int, help="HTTP port (default from the config, 8000)")
    run.add_argument("--grpc-port", type=int, help="also serve OIP v2 over gRPC on this port (binds every interface; "
                                                   "default from the config: off)")
    run.add_argument("--space", type=Path, help="a sweep space (tune/*.yaml): distil-sweep -> compress-sweep -> serve")
    run.add_argument("--space-env", help=argparse.SUPPRESS)

    dis = sub.add_parser("distill", help="distillation alone: teacher -> student on Ray Train")
    _source_args(dis)
    dis.add_argument("--num-workers", type=int, help="data-parallel Ray Train workers (overrides the config)")
    dis.add_argument("--use-gpu", action="store_true", help="one GPU per worker, nccl, bf16 autocast")

    swp = sub.add_parser("sweep", help="a sweep on Ray Tune: distillation hyperparameters and/or compression settings")
    _source_args(swp)
    swp.add_argument("--space", type=Path, help="sweep space file (tune/*.yaml): distill and/or compress parts")
    swp.add_argument("--space-env", help=argparse.SUPPRESS)
    swp.add_argument("--student", type=Path, help="artifact folder to compress (default: the run's student, else its teacher)")
    swp.add_argument("--resume", action="store_true", help="continue an interrupted sweep of this run; finished trials are kept")

    srv = sub.add_parser("serve", help="serve the winner of a finished run")
    srv.add_argument("run_dir", type=Path)
    # no defaults here: a flag overrides the run's config only when given
    srv.add_argument("--port", type=int, help="HTTP port (default: the run's config, 8000)")
    srv.add_argument("--host", help="bind address (default: the run's config, loopback)")
    srv.add_argument("--replicas", type=int, help="replica count (default: the run's config)")
    srv.add_argument("--grpc-port", type=int, help="also serve OIP v2 over gRPC on this port (on --host with the direct "
                                                   "ingress; Serve's gRPC proxy binds every interface; default: the run's config, off)")
    srv.add_argument("--ingress", choices=["direct", "proxy"], help="direct: the replicas serve HTTP themselves (one node); "
                                                                   "proxy: Ray Serve's proxy (default: the run's config, direct)")
    srv.add_argument("--address", help="Ray cluster address")

    exp = sub.add_parser("export", help="export the winner (or a trial) to ONNX or a torch.export program (classifier "
                                        "runs) or GGUF for llama.cpp (causal-LM runs), checked against the source")
    exp.add_argument("run_dir", type=Path)
    exp.add_argument("--format", choices=["onnx", "torch-export", "gguf"], required=True)
    exp.add_argument("--trial", help="classifier: a trial key, e.g. student-prune0.50-none; causal LM: teacher or a student's "
                                     "name (default: the winner)")
    exp.add_argument("--gguf-type", choices=["q8_0", "q4_0", "f16", "bf16", "f32"],
                     help="gguf: the type of the 2-D weights (default q8_0; norms stay f32)")
    exp.add_argument("--out", type=Path, required=True, help="file to write (.onnx, .pt2 or .gguf)")

    sub.add_parser("recipes", help="list the recipes shipped with slimray")

    ini = sub.add_parser("init", help="write a starter config for your own model and data (checked first)")
    ini.add_argument("--model", required=True, help="factory of your nn.Module, e.g. my_models.net:build")
    ini.add_argument("--weights", required=True, help="the trained weights as a .safetensors file")
    ini.add_argument("--data", required=True, help="training data: .parquet/.csv/.jsonl/.npz file, or an image folder")
    ini.add_argument("--test", help="held-out examples your teacher never trained on (same format as --data): the teacher's "
                     "accuracy there is the reference of the accuracy budget; without it the teacher is scored on a split "
                     "carved out of --data")
    ini.add_argument("--code-dir", help="folder holding the factory's module (default: the current folder if it holds it)")
    ini.add_argument("--kwargs", default="{}", help="keyword arguments for the factory as JSON, e.g. '{\"num_classes\": 10}'")
    ini.add_argument("--name", help="run name (default: from the data path)")
    ini.add_argument("--out", type=Path, default=Path("slimray.yaml"), help="config file to write (default slimray.yaml)")
    ini.add_argument("--force", action="store_true", help="overwrite --out")

    sbm = sub.add_parser("submit", help="submit `run` to a Ray cluster as a Ray Job")
    sbm.add_argument("--address", default=None, help=f"Ray dashboard address (default RAY_ADDRESS or {DEFAULT_DASHBOARD})")
    sbm.add_argument("--follow", action="store_true", help="stream the logs until the job ends; exit with its status")
    sbm.add_argument("job_args", nargs=argparse.REMAINDER, help="the slimray command to run there, e.g. run --recipe digits")

    jobs = sub.add_parser("jobs", help="list, inspect, follow or stop slimray jobs on a cluster")
    jobs.add_argument("action", choices=["list", "status", "logs", "stop"])
    jobs.add_argument("job_id", nargs="?")
    jobs.add_argument("--address", default=None)
    jobs.add_argument("--follow", action="store_true", help="with logs: stream until the job ends")

    clu = sub.add_parser("cluster", help="a multi-node Ray cluster on 127.0.0.1 (token auth on)")
    clu.add_argument("action", choices=["up", "down", "status"])
    clu.add_argument("--local", action="store_true", help="start it on this machine (the only kind slimray starts)")
    clu.add_argument("--workers", type=int, default=1, help="worker raylets besides the head (default 1)")
    clu.add_argument("--cpus-per-node", type=float, default=1)
    clu.add_argument("--gpus-per-worker", type=float, default=0, help="GPUs each worker declares (fake ones are fine for placement)")
    clu.add_argument("--state-dir", type=Path, default=None)
    return p


def _serve_flags(args) -> dict:
    """The `slimray serve` flags the user gave (None = keep the run's config)."""
    given = {"port": args.port, "host": args.host, "num_replicas": args.replicas, "grpc_port": args.grpc_port,
             "ingress": args.ingress}
    return {k: v for k, v in given.items() if v is not None}


def _serve_run_dir(run_dir: Path, serve_cfg: ServeConfig, *, name: str) -> str:
    from slimray.serving.app import build_app, deploy
    from slimray.serving.options import options_for_run

    options = options_for_run(run_dir, serve_config=serve_cfg, name=name)
    from slimray.serving.llm import vllm_runtime_of

    quant = vllm_runtime_of(options.model_dir)
    if quant is not None:  # a causal-LM winner whose runtime is vLLM: Ray Serve LLM (its own OpenAI ingress, Serve's proxy)
        from slimray.serving.llm import build_vllm_app

        if serve_cfg.grpc_port is not None:
            raise ConfigError("serve.grpc_port: a vLLM-served LLM speaks the OpenAI API over HTTP only; leave grpc_port unset")
        print(f"serving {options.model_dir} with vLLM through Ray Serve LLM (the engine loads in about a minute or two on CPU)",
              flush=True)
        return deploy(build_vllm_app(options, quant_method=quant), name=name, host=serve_cfg.host, port=serve_cfg.port,
                      route_prefix=serve_cfg.route_prefix, ingress="proxy")
    return deploy(build_app(options), name=name, host=serve_cfg.host, port=serve_cfg.port, route_prefix=serve_cfg.route_prefix,
                  grpc_port=serve_cfg.grpc_port, ingress=getattr(serve_cfg, "ingress", "proxy"))


class _Terminated(Exception):
    """SIGTERM while serving: stop like Ctrl-C, exit 0."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def _stop_signals() -> None:
    """Ctrl-C raises KeyboardInterrupt again (Tune installs its own SIGINT handler during a sweep and leaves it),
    and SIGTERM stops the server cleanly instead of Ray's exit path."""
    import signal

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _on_sigterm)


def _serving(name: str, start) -> int:
    """Run ``start()`` (deploy, check, wait) until Ctrl-C (exit 130) or SIGTERM (exit 0); then delete only this
    Serve application — never ``serve.shutdown()``, which removes every application of a shared cluster."""
    import ray

    from slimray.serving.app import undeploy

    _stop_signals()
    code = 0
    try:
        start()
    except KeyboardInterrupt:
        code = 130
    except _Terminated:
        code = 0
    finally:
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not break the clean-up
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(f"\nstopping: deleting the Serve application {name!r}", file=sys.stderr, flush=True)
        undeploy(name)
        ray.shutdown()
    return code


def _export(args) -> int:
    """``slimray export``: the run's family writes the format and checks it against the model it came from."""
    from slimray import families

    run_dir = args.run_dir.resolve()
    try:
        family = families.for_document(json.loads((run_dir / "config.json").read_text()), source=str(run_dir / "config.json"))
    except (OSError, ValueError):
        family = families.for_artifact(run_dir / "winner")
    if args.format not in family.export_formats:
        raise ConfigError(f"--format {args.format}: a {family.name} run exports "
                          f"{', '.join(family.export_formats) or 'nothing yet (serve its winner folder)'}")
    if args.gguf_type and args.format != "gguf":
        raise ConfigError("--gguf-type is for --format gguf")
    options = {"gguf_type": args.gguf_type or "q8_0"} if args.format == "gguf" else {}
    check = family.load("export")(run_dir, fmt=args.format, out=args.out, trial=args.trial, **options)
    print(f"wrote {args.out} ({check['bytes']} bytes) from {check['source']}")
    print(f"{check['summary']}  ({args.out}.check.json)")
    return 0


def _check_and_wait(url: str, run_dir: Path, serve_cfg, family) -> None:
    """The family's check (one real request compared with the model in-process), then serve until Ctrl-C."""
    family.load("serve_check")(url, run_dir, serve_cfg)
    if getattr(serve_cfg, "grpc_port", None) is not None:
        print(f"OIP v2 over gRPC (inference.GRPCInferenceService, e.g. tritonclient.grpc): 127.0.0.1:{serve_cfg.grpc_port}")
    print("Ctrl-C stops the server.", flush=True)
    while True:
        time.sleep(3600)


def _note_grpc_bind(serve_cfg) -> None:
    """One line: Serve's gRPC proxy (Ray 2.60; ingress proxy) has no host option and binds every interface."""
    keyed = bool(os.environ.get(serve_cfg.api_key_env) or serve_cfg.api_key_file)
    print(f"slimray: {'note' if keyed else 'WARNING'}: Serve's gRPC proxy binds every interface ([::]:{serve_cfg.grpc_port}), "
          f"not {serve_cfg.host}" + ("" if keyed else f", and no API key is set (${serve_cfg.api_key_env}): anyone who can reach "
                                     "this host can call it; set the key or firewall the port"), file=sys.stderr, flush=True)


def _serve_until_interrupted(run_dir: Path, serve_cfg, *, name: str, family) -> int:
    from slimray.exposure import warn_if_exposed

    warn_if_exposed(host=serve_cfg.host, api_key_env=serve_cfg.api_key_env, api_key_file=serve_cfg.api_key_file)
    if serve_cfg.grpc_port is not None and getattr(serve_cfg, "ingress", "proxy") == "proxy":
        _note_grpc_bind(serve_cfg)
    return _serving(name, lambda: _check_and_wait(_serve_run_dir(run_dir, serve_cfg, name=name), run_dir, serve_cfg, family))


def _init(args) -> int:
    from slimray.starter import write_starter

    try:
        kwargs = json.loads(args.kwargs)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--kwargs is not JSON: {err}") from None
    if not isinstance(kwargs, dict):
        raise ConfigError("--kwargs must be a JSON object")
    code_dir = args.code_dir
    top = args.model.split(":", 1)[0].split(".", 1)[0]
    if code_dir is None and (Path(top).is_dir() or Path(f"{top}.py").is_file()):
        code_dir = "."
    out = write_starter(args.out, model=args.model, weights=args.weights, data=args.data, code_dir=code_dir,
                        name=args.name, kwargs=kwargs, force=args.force, test=args.test)
    print(f"wrote {out}; check the data columns in it, then: slimray run --config {out}")
    return 0


def _dashboard_address(address: str | None) -> str:
    address = address or os.environ.get("RAY_ADDRESS") or DEFAULT_DASHBOARD
    if not address.startswith(("http://", "https://")):
        raise ValueError(f"--address must be the dashboard's http(s) URL (like {DEFAULT_DASHBOARD}), got {address!r}")
    return address


def _token_files() -> tuple[Path, ...]:
    from slimray.cluster_local import DEFAULT_STATE_DIR

    return (DEFAULT_STATE_DIR / "auth_token",)


def _submit(args) -> int:
    from slimray import jobs

    job_args = [a for a in args.job_args if a != "--"]
    address = _dashboard_address(args.address)
    client = jobs.connect(address, token_files=_token_files())
    job_id = jobs.submit(client, job_args)
    print(f"submitted {job_id} to {address}", flush=True)
    if not args.follow:
        print(f"follow it with: slimray jobs logs {job_id} --follow --address {address}")
        return 0
    status = jobs.follow(client, job_id)
    print(f"\njob {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def _jobs(args) -> int:
    from slimray import jobs

    address = _dashboard_address(args.address)
    client = jobs.connect(address, token_files=_token_files())
    if args.action == "list":
        for j in sorted(client.list_jobs(), key=lambda j: j.start_time or 0):
            print(f"{j.submission_id or j.job_id}\t{j.status.value}\t{j.entrypoint}")
        return 0
    if not args.job_id:
        raise ValueError(f"slimray jobs {args.action} needs a JOB_ID")
    if args.action == "status":
        info = client.get_job_info(args.job_id)
        print(f"{args.job_id}\t{info.status.value}\t{info.message or ''}")
        return 0
    if args.action == "logs":
        if args.follow:
            status = jobs.follow(client, args.job_id)
            return 0 if status == "SUCCEEDED" else 1
        print(client.get_job_logs(args.job_id), end="")
        return 0
    stopped = client.stop_job(args.job_id)
    print(f"{args.job_id}: {'stop requested' if stopped else 'already finished'}")
    return 0


def _cluster(args) -> int:
    from slimray import cluster_local

    state_dir = args.state_dir or cluster_local.DEFAULT_STATE_DIR
    if args.action == "up":
        if not args.local:
            raise ValueError("slimray starts only local clusters: `slimray cluster up --local`; for clouds see cluster/ (ray up, KubeRay)")
        c = cluster_local.up(num_workers=args.workers, cpus_per_node=args.cpus_per_node, gpus_per_worker=args.gpus_per_worker, state_dir=state_dir)
        print(f"local Ray cluster up: head + {c.num_workers} worker(s), token auth on, PIDs {c.pids}")
        print(f"  dashboard / jobs: {c.dashboard_url}   GCS: {c.gcs_address}")
        print(f"  token: {c.token_file}  (export RAY_AUTH_TOKEN_PATH={c.token_file} RAY_AUTH_MODE=token for ray's own tools)")
        print(f"  slimray submit --address {c.dashboard_url} --follow run --recipe digits")
        return 0
    if args.action == "status":
        c = cluster_local.load_state(state_dir)
        if c is None:
            print("no local cluster")
            return 1
        print(json.dumps({**c.__dict__, "alive": [r["pid"] for r in c.procs if cluster_local.is_ours(r)]}, indent=2))
        return 0
    pids = cluster_local.down(state_dir=state_dir)
    print(f"stopped {len(pids)} ray process groups {pids}" if pids else "no local cluster to stop")
    return 0


def main(argv: list[str] | None = None) -> int:
    from slimray import console
    from slimray.storage import DiskFullError
    from slimray.runlock import RunLockedError

    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    console.set_verbose(getattr(args, "verbose", False) or console.verbose())
    console.install_signal_handlers()
    try:
        if args.command == "recipes":
            print("\n".join(recipe_names()))
            return 0
        if args.command == "run":
            family, cfg = _load_any(args)
            from slimray.pipelines import run_pipeline

            run_pipeline(cfg, out_dir=args.out, address=args.address, fresh=args.fresh)
            if args.no_serve:
                return 0
            from slimray.runtime import init_ray

            init_ray(args.address)
            return _serve_until_interrupted((args.out / cfg.name).resolve(), cfg.serve, name=cfg.name, family=family)
        if args.command == "distill":  # the stages up to distillation, for every family; the run folder holds the students
            family, cfg = _load_any(args)
            from slimray.pipelines import run_pipeline

            run_pipeline(cfg, out_dir=args.out, address=args.address, fresh=args.fresh, until="distil")
            print(f"students: {(args.out / cfg.name).resolve()} (their Train metrics under logs/ and *_metrics.jsonl)")
            return 0
        if args.command == "sweep":  # the search (and, with a space's distill part, the distillation sweep) on the stages
            from slimray.pipelines import run_pipeline

            cfg = _load(args)
            student = args.student.resolve() if args.student else None
            if student is not None and not (student / "spec.json").exists():
                raise ConfigError(f"--student {args.student}: no spec.json there (expected a slimray model folder)")
            sweeps = cfg.distill_sweep is not None and cfg.distill_sweep.distill is not None
            only_distil = sweeps and cfg.distill_sweep.compress is None
            try:
                run_pipeline(cfg, out_dir=args.out, address=args.address, fresh=args.fresh, student=student,
                                      train_students=False, resume=args.resume, until="distil" if only_distil else None)
            except FileExistsError as err:
                raise ConfigError(str(err)) from None
            run_dir = (args.out / cfg.name).resolve()
            if sweeps:
                import json

                from slimray.families.classifier.report import best_vs_default_table, distill_sweep_table

                summary = json.loads((run_dir / "distill_sweep.json").read_text())
                print(best_vs_default_table(summary) + "\n\n" + distill_sweep_table(summary))
                print(f"best student: {run_dir / 'students' / 'student-best'}  report: {run_dir / 'distill_sweep.md'}")
            return 0
        if args.command == "serve":
            from slimray.runtime import init_ray

            run_dir = args.run_dir.resolve()
            if not any((run_dir / "winner" / f).exists() for f in ("spec.json", "slimray_lm.json")):
                raise ConfigError(f"{run_dir} holds no finished run (no winner/spec.json, nor winner/slimray_lm.json for a causal LM)")
            from slimray.serving.checks import check_winner

            check_winner(run_dir / "winner")  # a damaged spec.json or weights file: one line naming it
            from slimray import families

            family = families.for_artifact(run_dir / "winner")
            cfg = family.load("config").from_file(run_dir / "config.json")
            serve_cfg = type(cfg.serve).from_dict({**cfg.serve.model_dump(), **_serve_flags(args)}, source="the command line")
            init_ray(args.address)
            return _serve_until_interrupted(run_dir, serve_cfg, name=cfg.name, family=family)
        if args.command == "export":
            return _export(args)
        if args.command == "init":
            return _init(args)
        if args.command == "submit":
            return _submit(args)
        if args.command == "jobs":
            return _jobs(args)
        if args.command == "cluster":
            return _cluster(args)
    except (ConfigError, AuthError, ConnectionError, ValueError, ClusterTooSmallError, FileExistsError, RunLockedError) as err:
        print(f"slimray: {err}", file=sys.stderr)
        return 2
    except DeploymentFailedError as err:  # the replicas' own exception, read from Serve's status (not only "failed")
        print(f"slimray: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        # one line naming the path (DiskFullError names the artifact; its previous version is intact)
        what = err.strerror if isinstance(err, DiskFullError) or not err.filename else f"no space left on device writing {err.filename}"
        print(f"slimray: {what}; free space, then resume with: {console.resume_command(argv)}", file=sys.stderr)
        return 28
    except KeyboardInterrupt as err:
        return console.interrupted(argv, getattr(err, "signame", None))
    return 1


if __name__ == "__main__":
    sys.exit(main())
