"""The README and docs/ against the code: the two commands, every CLI subcommand, the shortest configs (validated
by the real schemas), the module map (every package and module of ``src/slimray`` named, every name real),
every repository path and every relative link (file and heading) resolving, every config field documented.

Text and schemas only: no Ray, no model is built."""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
PKG = REPO / "src" / "slimray"
REPO_ROOTS = ("src/", "docs/", "tests/", "bench/", "cluster/", "serve/", "tune/", "jobs/", ".ci/")


def _prose(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return out


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


def _section(text: str, heading: str) -> str:
    """The text under ``## heading`` up to the next ``## `` heading."""
    start = text.index(f"\n## {heading}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(m.group(1)) for line in _prose(path.read_text()) if (m := re.match(r"#{1,6} (.+)", line))}


def test_the_two_commands_are_the_makefile_and_ci_ones():
    text = README.read_text()
    two = _blocks(_section(text, "Two commands"), "bash")[0]
    assert [line.split("#")[0].strip() for line in two.strip().splitlines()] == ["make demo", "make test"]
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^demo: install$", makefile, flags=re.M) and re.search(r"^test: install$", makefile, flags=re.M)
    assert "make test\n" in (REPO / ".ci" / "run").read_text()


def test_the_cli_table_lists_every_subcommand_once():
    from slimray.cli import _parser

    sub = next(a for a in _parser()._actions if a.dest == "command")
    table = _section(README.read_text(), "The CLI")
    listed = re.findall(r"^\| `slimray ([a-z]+)", table, flags=re.M)
    assert sorted(listed) == sorted(sub.choices), "README 'The CLI' must list each `slimray` subcommand once"


def _write_hf_folder(folder: Path, config: dict, files: tuple[str, ...]) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    for name in files:
        (folder / name).write_bytes(b"")  # the config check looks for the files; nothing here loads them


def test_the_shortest_configs_validate_against_the_real_schemas(tmp_path, monkeypatch):
    """Each YAML block of "Bring your own model", as written, through the loader `slimray run --config` uses.
    The folders it names are made with what the config check reads (config.json, the file names); the user-module
    teacher is really imported from its `code_dir` and its weights loaded, both relative to the config file."""
    import sys

    import torch
    from safetensors.torch import save_file

    from slimray.families.classifier.usermodule import build_from_factory, load_weights
    from slimray.runconfig import load_run_config

    (tmp_path / "my_models").mkdir()
    (tmp_path / "my_models" / "__init__.py").write_text("")
    (tmp_path / "my_models" / "net.py").write_text(
        "from torch import nn\n\ndef build(num_classes):\n    return nn.Sequential(nn.Flatten(), nn.Linear(16, num_classes))\n")
    save_file({k: torch.zeros_like(v) for k, v in torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 10)).state_dict().items()},
              str(tmp_path / "teacher.safetensors"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "modules", dict(sys.modules))

    configs = _blocks(_section(README.read_text(), "Bring your own model"), "yaml")
    assert len(configs) == 4
    _write_hf_folder(tmp_path / "my-lm", {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 4,
                                          "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64},
                     ("model.safetensors", "tokenizer.json"))
    _write_hf_folder(tmp_path / "my-encoder", {"model_type": "bert", "num_hidden_layers": 6}, ("model.safetensors", "tokenizer.json"))
    families = []
    for i, text in enumerate(configs):
        path = tmp_path / f"config{i}.yaml"
        path.write_text(text)
        family, cfg = load_run_config(config=path)
        families.append(family.name)
        assert cfg.name
        if family.name == "classifier" and cfg.teacher.source == "module":
            module = build_from_factory(cfg.teacher.factory, cfg.teacher.kwargs, code_dir=cfg.teacher.code_dir)
            load_weights(module, cfg.teacher.weights)
    assert families == ["classifier", "classifier", "causal_lm", "sentence_encoder"]


def test_the_module_map_names_every_package_and_module_and_nothing_else():
    table = "\n".join(line for line in _section(README.read_text(), "Module map").splitlines() if line.startswith("| `"))
    named = set(re.findall(r"`([\w]+(?:\.py|/))`", table))
    top = {p.name + "/" for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    top |= {p.name for p in PKG.glob("*.py") if p.name != "__init__.py"}
    assert top - named == set(), "README 'Module map' lacks these parts of src/slimray"
    missing = [n for n in named if not (PKG / n).exists() and not any(PKG.rglob(n.rstrip("/")))]
    assert missing == [], "README 'Module map' names what src/slimray does not have"


@pytest.mark.parametrize("doc", [README, *DOCS], ids=lambda p: p.name)
def test_repository_paths_and_links_resolve(doc):
    text = doc.read_text()
    ignored = [line.strip("/") + "/" for line in (REPO / ".gitignore").read_text().split() if "*" not in line]
    bad = []
    for path in set(re.findall(r"`([.\w/-]+)`", text)):
        if path.startswith(REPO_ROOTS) and not (REPO / path.rstrip("/")).exists() and not path.startswith(tuple(ignored)):
            bad.append(path)  # outputs git ignores (e.g. bench/results/) are written by the commands that name them
    for line in _prose(text):
        for target in re.findall(r"\]\(([^)\s]+)\)", line):
            if re.match(r"[a-z]+://", target):
                continue
            file, _, anchor = target.partition("#")
            dest = (doc.parent / file).resolve() if file else doc
            if not dest.exists():
                bad.append(target)
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                bad.append(target)
    assert sorted(bad) == [], f"{doc.name}: paths or links that do not resolve"


def _fields(model: type[BaseModel], seen: set[type]) -> set[str]:
    """Every field name of ``model`` and of the models its fields hold (unions, lists, optionals)."""
    if model in seen:
        return set()
    seen.add(model)
    names = set(model.model_fields)
    for info in model.model_fields.values():
        stack = [info.annotation]
        while stack:
            t = stack.pop()
            if isinstance(t, type) and issubclass(t, BaseModel):
                names |= _fields(t, seen)
            stack.extend(typing.get_args(t))
    return names


def test_configuration_md_names_every_config_field():
    from slimray.config import PipelineConfig
    from slimray.families.causal_lm.config import LMPipelineConfig
    from slimray.families.sentence_encoder.config import TextPipelineConfig

    doc = (REPO / "docs" / "configuration.md").read_text()
    fields = set()
    for model in (PipelineConfig, TextPipelineConfig, LMPipelineConfig):
        fields |= _fields(model, set())
    # what pruning records in a user-module spec (written by slimray into spec.json, never in a config by hand)
    fields -= {"resized_modules", "resized_tensors", "removed_modules", "note"}
    missing = sorted(f for f in fields if f"`{f}`" not in doc)
    assert missing == [], "docs/configuration.md does not name these config fields"
