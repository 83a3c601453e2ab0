"""The classifier family's model artifact (``slimray.model/1``): ``model.safetensors`` + ``spec.json``.

The spec names the architecture (``ModelSpec``), the input transform (``InputSpec``) and how the model
was compressed (``PruneSpec``, ``QuantSpec``). Loading rebuilds the float architecture from the spec,
re-applies the same quantization to get the same module structure, then loads the tensors.

The spec also names the runtime (``RuntimeSpec``). An ``onnxruntime`` artifact holds the float torch
weights it was exported from plus ``model.onnx`` (the graph the runtime runs, int8 QDQ when quantized);
``load_runnable`` returns what serving and timing call: the ONNX Runtime session, the compiled module, or
the torch model.

A user module's artifact carries the factory's module or package under ``code/`` (``carried``): listed with
relative paths and sha256s in the spec, hashed in ``files`` like the weights, and loaded from there under a
private module name, so the folder serves after the user's code folder moved or is gone (no absolute path is
written). An artifact is code: load only artifacts you made (docs/artifacts.md).

Writing, hashing and verifying the folder, and storing state dicts without pickle, are every family's
(``slimray.storage``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from pydantic import Field
from safetensors.torch import load_file
from torch import nn

from slimray.compress.prune import PruneSpec
from slimray.compress.quantize import QUANTIZE_AT_LOAD, QuantSpec, quantize
from slimray.compress.runtime import ONNX_FILE, OrtModel, RuntimeSpec, compile_model
from slimray.families.classifier.carried import CODE_FOLDER, files_for, pack_code, read_code, remember
from slimray.families.classifier.spec import InputSpec, ModelSpec, ModuleSpec, build_model
from slimray.schema import ConfigError, StrictModel
from slimray.storage import (
    SPEC, WEIGHTS, DamagedArtifactError, _atomic_dir_write, decode_state, member, write_spec_with_hashes, write_state_artifact,
)

FORMAT = "slimray.model/1"


class ArtifactSpec(StrictModel):
    format: str = FORMAT
    name: str
    model: ModelSpec
    input: InputSpec
    prune: PruneSpec = Field(default_factory=PruneSpec)
    quantization: QuantSpec = Field(default_factory=QuantSpec)
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    state: dict[str, dict[str, Any]] = Field(default_factory=dict, description="non-plain state entries")
    module_versions: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="state-dict metadata (module versions) quantized modules need to load"
    )
    metadata: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, str] = Field(default_factory=dict, description="sha256 of every other file in the folder")


def stores_float(spec: ArtifactSpec) -> bool:
    """Artifacts whose weights file holds the float model (quantization happens at load or in ONNX)."""
    return spec.runtime.name == "onnxruntime" or spec.quantization.method in QUANTIZE_AT_LOAD


def save_artifact(path: str | Path, model: nn.Module, spec: ArtifactSpec, *, extra_files: dict[str, bytes] | None = None) -> ArtifactSpec:
    """Save ``model`` and its spec to folder ``path`` atomically.

    ``model`` is the quantized torch model, or the float one where ``stores_float(spec)``;
    ``extra_files`` (e.g. ``model.onnx``) are written into the same folder in the same atomic step.
    """
    if spec.runtime.name == "onnxruntime" and ONNX_FILE not in (extra_files or {}):
        raise ValueError(f"an onnxruntime artifact needs its {ONNX_FILE}")
    for name in extra_files or {}:
        if Path(name).name != name or name in (WEIGHTS, SPEC, CODE_FOLDER) or name.startswith("."):
            raise ValueError(f"bad artifact file name {name!r}")
    spec, code_files = carry_code(spec)

    def extra(tmp: Path) -> None:
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        write_code(tmp, code_files)

    return write_state_artifact(path, model.state_dict(), spec, extra=extra)


def carry_code(spec: ArtifactSpec) -> tuple[ArtifactSpec, dict[str, bytes]]:
    """A user module's spec made self-contained: the factory's module or package (already carried, or packed from
    ``code_dir``) listed in ``model.code``, ``code_dir`` dropped (no absolute path in the artifact); with the files
    to write under ``code/``. Other specs, and factories installed as packages (no ``code_dir``), are unchanged."""
    m = spec.model
    if not isinstance(m, ModuleSpec) or not (m.code or m.code_dir):
        return spec, {}
    if m.code:
        files = files_for(m.code)
        code = m.code
    else:
        files = pack_code(m.factory, m.code_dir)
        code = remember(files)
    return spec.model_copy(update={"model": m.model_copy(update={"code": code, "code_dir": None})}), files


def write_code(folder: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        target = Path(folder, CODE_FOLDER, *PurePosixPath(rel).parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def load_code(path: Path, spec: ArtifactSpec) -> None:
    """Read a user module's carried code from the artifact folder into this process (symlinks, paths leaving the
    folder and changed files refused with ``DamagedArtifactError`` naming the file)."""
    m = spec.model
    if isinstance(m, ModuleSpec) and m.code:
        try:
            remember(read_code(path, m.code), m.code, where=str(path))
        except ValueError as err:
            raise DamagedArtifactError(path / CODE_FOLDER, str(err).removeprefix(f"{path}: ")) from None


def load_spec(path: str | Path) -> ArtifactSpec:
    """The spec in folder ``path``; a damaged file raises ``DamagedArtifactError`` naming it (a ``ConfigError``
    for a spec of another kind, e.g. a text model, names the file too)."""
    path = Path(path)
    try:
        json.loads((path / SPEC).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path / SPEC}: not found (expected a slimray model folder)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DamagedArtifactError(path / SPEC, f"unreadable ({type(err).__name__}); rerun the stage that wrote it") from None
    return ArtifactSpec.from_file(path / SPEC)


def load_artifact(path: str | Path) -> tuple[nn.Module, ArtifactSpec]:
    """Rebuild the model in ``path`` from its spec and tensors (no pickle); returns it in eval mode."""
    path = Path(path)
    spec = load_spec(path)
    if spec.format != FORMAT:
        raise ValueError(f"{path}: unsupported artifact format {spec.format!r} (expected {FORMAT!r})")
    load_code(path, spec)
    model = build_model(spec.model).eval()
    example = torch.zeros(1, *spec.input.shape)
    if not stores_float(spec):
        model = quantize(model, spec.quantization, calibration=[example])
    state = OrderedDict(decode_state(load_file(str(path / WEIGHTS)), spec.state))
    state._metadata = OrderedDict((k, dict(v)) for k, v in spec.module_versions.items())  # type: ignore[attr-defined]
    model.load_state_dict(state, strict=True)
    if spec.quantization.method in QUANTIZE_AT_LOAD and spec.runtime.name != "onnxruntime":
        model = quantize(model, spec.quantization)
    return model.eval(), spec


def load_runnable(path: str | Path, *, num_threads: int = 1, device: str = "cpu") -> tuple[nn.Module, ArtifactSpec]:
    """What the artifact's runtime runs: an ONNX Runtime session, a compiled module, or the torch model.

    ONNX files are protobuf, read without pickle. For ``torch`` and ``torch_compile`` the module is moved
    to ``device``; an ``onnxruntime`` session takes the CUDA provider when ``device`` is ``cuda``.
    """
    path = Path(path)
    spec = load_spec(path)
    if spec.runtime.name == "onnxruntime":
        return OrtModel(path / ONNX_FILE, num_threads=num_threads, device=device).eval(), spec
    model, spec = load_artifact(path)
    model = model.to(device)
    if spec.runtime.name == "torch_compile":
        model = compile_model(model)
    return model, spec


def artifact_bytes(path: str | Path) -> int:
    """Bytes on disk of what the runtime loads: the weights file, or ``model.onnx`` for ONNX Runtime."""
    path = Path(path)
    onnx = path / ONNX_FILE
    if onnx.exists() and load_spec(path).runtime.name == "onnxruntime":
        return onnx.stat().st_size
    return (path / WEIGHTS).stat().st_size


def copy_artifact(src: str | Path, dst: str | Path, *, update: dict[str, Any] | None = None) -> ArtifactSpec:
    """Copy an artifact folder (weights, spec, runtime files) to ``dst`` atomically, updating spec fields."""
    src = Path(src)
    spec = load_spec(src).model_copy(update=update or {})

    load_code(src, spec)
    code_files: dict[str, bytes] = {}
    m = spec.model
    if isinstance(m, ModuleSpec) and (m.code or (m.code_dir and Path(m.code_dir).is_dir())):
        spec, code_files = carry_code(spec)  # an older artifact whose code folder still exists: carried from now on

    def write(tmp: Path) -> None:
        for f in src.iterdir():
            if f.is_file() and f.name != SPEC and not f.name.startswith("."):
                shutil.copyfile(f, tmp / f.name)
        write_code(tmp, code_files)
        written["spec"] = write_spec_with_hashes(tmp, spec)

    written: dict[str, Any] = {}
    _atomic_dir_write(Path(dst), write)
    return written["spec"]


def artifact_files(path: str | Path) -> dict[str, bytes]:
    """An artifact's spec, weights and carried code (``code/...``) as bytes, to travel through the object store as
    data (no shared disk needed); ``load_artifact_bytes`` rebuilds the module from them."""
    d = Path(path)
    if not (d / SPEC).is_file() or not (d / WEIGHTS).is_file():
        raise FileNotFoundError(f"no model artifact ({SPEC} + {WEIGHTS}) in {d}")
    spec = load_spec(d)
    out = {SPEC: (d / SPEC).read_bytes(), WEIGHTS: (d / WEIGHTS).read_bytes()}
    if isinstance(spec.model, ModuleSpec) and spec.model.code:
        load_code(d, spec)
        out.update({f"{CODE_FOLDER}/{rel}": data for rel, data in files_for(spec.model.code).items()})
    return out


def load_artifact_bytes(files: dict[str, bytes]) -> tuple[nn.Module, ArtifactSpec]:
    """``load_artifact`` on files given as bytes (see ``artifact_files``): no pickled module."""
    with tempfile.TemporaryDirectory() as d:
        for name, blob in files.items():
            if name not in (SPEC, WEIGHTS) and not name.startswith(f"{CODE_FOLDER}/"):
                raise ValueError(f"bad artifact file name {name!r}")
            target = member(Path(d), name)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(blob)
        return load_artifact(d)
