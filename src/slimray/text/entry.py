"""What ``slimray.cli`` needs for text runs: recognise a ``kind: text`` recipe or config, and serve a finished run.

``maybe_text_config(recipe=..., config=...)`` returns a ``TextPipelineConfig`` when the document declares
``kind: text`` (else None, and the caller goes on with its own ``PipelineConfig``); ``is_text_run(run_dir)``
tells a finished text run by its winner's spec; ``serve_text_run`` deploys its winner and returns the URL.
"""

from __future__ import annotations

from pathlib import Path

from slimray.text.config import TextPipelineConfig, is_text_document, text_recipe_path


def maybe_text_config(*, recipe: str | None = None, config: str | Path | None = None, name: str | None = None,
                      port: int | None = None) -> TextPipelineConfig | None:
    """The text config named by ``recipe`` / ``config`` (with CLI overrides), or None if it is not ``kind: text``."""
    path = Path(config) if config is not None else (text_recipe_path(recipe) if recipe else None)
    if path is None or not path.is_file() or not is_text_document(path):
        return None
    cfg = TextPipelineConfig.from_file(path)
    data = cfg.model_dump()
    if name:
        data["name"] = name
    if port:
        data["serve"]["port"] = port
    return TextPipelineConfig.from_dict(data, source="the command line")


def is_text_run(run_dir: str | Path) -> bool:
    from slimray.text.models import is_text_artifact

    return is_text_artifact(Path(run_dir) / "winner")


def serve_text_run(run_dir: str | Path, *, host: str | None = None, port: int | None = None, num_replicas: int | None = None) -> str:
    """Deploy the winner of a finished text run on Ray Serve (Ray must be initialised); returns the URL.
    Arguments left None keep the run's config."""
    from slimray.serving.app import build_app, deploy
    from slimray.serving.options import options_for_run

    run_dir = Path(run_dir).resolve()
    cfg = TextPipelineConfig.from_file(run_dir / "config.json")
    opts = options_for_run(run_dir, serve_config=cfg.serve, name=cfg.name, num_replicas=num_replicas)
    return deploy(build_app(opts), name=cfg.name, host=host or cfg.serve.host, port=port or cfg.serve.port, route_prefix="/")
