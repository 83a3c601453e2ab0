"""Model artifacts: ``model.safetensors`` + ``spec.json``, written atomically, loaded without pickle.

The spec names the architecture (``ModelSpec``), the input transform (``InputSpec``) and how the model
was compressed (``PruneSpec``, ``QuantSpec``). Loading rebuilds the float architecture from the spec,
re-applies the same quantization to get the same module structure, then loads the tensors.
Quantized tensors are stored as their int representation plus scales and zero points; non-tensor
state (packed-parameter tuples, dtypes) is described in the JSON, so nothing is ever unpickled.

The spec also names the runtime (``RuntimeSpec``). An ``onnxruntime`` artifact holds the float torch
weights it was exported from plus ``model.onnx`` (the graph the runtime runs, int8 QDQ when quantized);
``load_runnable`` returns what serving and timing call: the ONNX Runtime session, the compiled module, or
the torch model.

A user module's artifact carries the factory's module or package under ``code/`` (``carried``): listed with
relative paths and sha256s in the spec, hashed in ``files`` like the weights, and loaded from there under a
private module name, so the folder serves after the user's code folder moved or is gone (no absolute path is
written). An artifact is code: load only artifacts you made (docs/artifacts.md).

Integrity: ``spec.json`` records the sha256 of every other file of the folder (``files``), written in the
same atomic step. ``verify_artifact`` checks them (and that the spec parses) and raises ``DamagedArtifactError``
naming the file; artifacts written before hashes existed (no ``files``) still load. A full disk during a write
raises ``DiskFullError`` naming the artifact; the temporary folder is removed and the previous version stays.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from pydantic import Field
from safetensors.torch import load_file, save_file
from torch import nn

from slimray.compress.prune import PruneSpec
from slimray.compress.quantize import QUANTIZE_AT_LOAD, QuantSpec, quantize
from slimray.compress.runtime import ONNX_FILE, OrtModel, RuntimeSpec, compile_model
from slimray.families.classifier.carried import CODE_FOLDER, files_for, pack_code, read_code, remember
from slimray.families.classifier.spec import InputSpec, ModelSpec, ModuleSpec, build_model
from slimray.schema import ConfigError, StrictModel

FORMAT = "slimray.model/1"
WEIGHTS = "model.safetensors"
SPEC = "spec.json"


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


class DamagedArtifactError(ValueError):
    """An artifact folder whose spec does not parse or whose files do not match their recorded sha256."""

    def __init__(self, path: Path, why: str):
        super().__init__(f"{path}: {why}")
        self.path = path
        self.why = why


class DiskFullError(OSError):
    """No space left while writing an artifact; the message names it, the previous version is intact."""

    def __init__(self, path: Path, filename: str | None = None):
        super().__init__(errno.ENOSPC, f"no space left on device while writing {path} (the previous version, if any, is kept)")
        self.filename = filename or str(path)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every regular file in ``folder`` except the spec itself, and of every file under its ``code/``
    folder (a user module's carried code), named by their relative POSIX path."""
    folder = Path(folder)
    out = {f.name: sha256_file(f) for f in sorted(folder.iterdir()) if f.is_file() and f.name != SPEC}
    code = folder / CODE_FOLDER
    if code.is_dir():
        out.update({f.relative_to(folder).as_posix(): sha256_file(f) for f in sorted(code.rglob("*")) if f.is_file()})
    return out


def member(folder: Path, name: str) -> Path:
    """``folder / name`` for a file name recorded in a spec: a relative path that stays inside the folder and goes
    through no symlink (``DamagedArtifactError`` naming it otherwise)."""
    parts = PurePosixPath(name).parts
    if not parts or "\\" in name or PurePosixPath(name).is_absolute() or any(p in ("", ".", "..") for p in parts):
        raise DamagedArtifactError(Path(folder) / SPEC, f"names the file {name!r}, which is not inside the artifact folder")
    p = Path(folder)
    for part in parts:
        p = p / part
        if p.is_symlink():
            raise DamagedArtifactError(p, "is a symlink; an artifact holds regular files only")
    return p


def write_spec_with_hashes(folder: Path, spec: Any) -> Any:
    """Write ``spec.json`` into ``folder`` (a temporary artifact folder) with the sha256 of the files already there.
    ``spec`` is any spec model with a ``files`` field; returns the spec as written."""
    spec = spec.model_copy(update={"files": file_hashes(folder)})
    (Path(folder) / SPEC).write_text(spec.model_dump_json(indent=2))
    return spec


def verify_artifact(path: str | Path, spec_cls: type[StrictModel] | None = None) -> None:
    """Raise ``DamagedArtifactError`` naming the file when the spec does not parse or a file is missing, truncated
    or changed. Without recorded hashes (older artifacts) only the spec and the presence of the weights are checked."""
    path = Path(path)
    spec_file = path / SPEC
    if not spec_file.is_file():
        raise DamagedArtifactError(spec_file, "missing")
    try:
        data = json.loads(spec_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DamagedArtifactError(spec_file, f"unreadable ({type(err).__name__})") from None
    if not isinstance(data, dict):
        raise DamagedArtifactError(spec_file, "not a JSON object")
    if spec_cls is not None:
        try:
            spec_cls.from_dict(data, source=str(spec_file))
        except ConfigError:
            raise DamagedArtifactError(spec_file, f"does not match the {spec_cls.__name__} schema") from None
    files = data.get("files") or {}
    if not files and not (path / WEIGHTS).is_file():
        raise DamagedArtifactError(path / WEIGHTS, "missing")
    for name, digest in sorted(files.items()):
        f = member(path, name)
        if not f.is_file():
            raise DamagedArtifactError(f, "missing")
        if sha256_file(f) != digest:
            raise DamagedArtifactError(f, "does not match its sha256 in spec.json (truncated or changed)")


def check_winner(path: str | Path) -> None:
    """Verify a model folder before serving it, image or text model alike (``DamagedArtifactError`` names the file)."""
    path = Path(path)
    if not (path / SPEC).exists() and (path / "slimray_lm.json").exists():  # a causal LM: an HF folder + its meta
        _check_lm_winner(path)
        return
    verify_artifact(path)  # the spec parses as JSON and every recorded sha256 matches
    fmt = json.loads((path / SPEC).read_text()).get("format")
    if fmt == FORMAT:
        verify_artifact(path, ArtifactSpec)
    else:
        from slimray.families.sentence_encoder.models import FORMAT as TEXT_FORMAT, TextArtifactSpec

        if fmt != TEXT_FORMAT:
            raise DamagedArtifactError(path / SPEC, f"unknown format {fmt!r} (expected {FORMAT!r} or {TEXT_FORMAT!r})")
        verify_artifact(path, TextArtifactSpec)


def _check_lm_winner(path: Path) -> None:
    """A causal-LM folder: ``slimray_lm.json`` parses, and the HF folder passes the family's folder checks."""
    from slimray.families.causal_lm.artifacts import META_FILE, WEIGHT_FILES, WEIGHTS, load_meta
    from slimray.families.causal_lm.teacher import check_causal_lm_folder
    from slimray.schema import ConfigError

    try:
        meta = load_meta(path)
    except (ValueError, ConfigError) as err:
        raise DamagedArtifactError(path / META_FILE, str(err).splitlines()[0]) from None
    try:
        check_causal_lm_folder(path, field="winner", weights=WEIGHT_FILES.get(meta.storage, WEIGHTS))
    except ConfigError as err:
        raise DamagedArtifactError(path / "config.json", str(err)) from None


def reusable(path: str | Path, *, spec_cls: type[StrictModel] | None = None, log=None) -> bool:
    """True when ``path`` holds an intact artifact a rerun may reuse. A damaged one is moved aside (so it is rebuilt)
    with one line through ``log`` naming the file; False also when there is nothing there."""
    path = Path(path)
    if not (path / SPEC).exists():
        return False
    try:
        verify_artifact(path, spec_cls or ArtifactSpec)
        return True
    except DamagedArtifactError as err:
        if log is not None:
            log(f"{path.name}: {err.path} is damaged ({err.why}): rebuilding this stage")
        aside = path.with_name(f".{path.name}.old.{os.getpid()}")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(path, aside)
        shutil.rmtree(aside, ignore_errors=True)
        return False


_QDTYPES = {"torch.qint8": torch.qint8, "torch.quint8": torch.quint8, "torch.qint32": torch.qint32}
_DTYPES = {**_QDTYPES, "torch.float16": torch.float16, "torch.bfloat16": torch.bfloat16, "torch.float32": torch.float32}


def _encode(key: str, value: Any, tensors: dict[str, torch.Tensor], meta: dict[str, dict[str, Any]]) -> None:
    if value is None:
        meta[key] = {"type": "none"}
    elif isinstance(value, torch.dtype):
        meta[key] = {"type": "dtype", "value": str(value)}
    elif isinstance(value, (tuple, list)):
        meta[key] = {"type": "tuple", "len": len(value)}
        for i, item in enumerate(value):
            _encode(f"{key}::{i}", item, tensors, meta)
    elif isinstance(value, torch.Tensor) and value.is_quantized:
        tensors[f"{key}::int"] = value.int_repr().contiguous()
        if value.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            tensors[f"{key}::scales"] = value.q_per_channel_scales().contiguous()
            tensors[f"{key}::zero_points"] = value.q_per_channel_zero_points().contiguous()
            meta[key] = {"type": "qtensor_per_channel", "dtype": str(value.dtype), "axis": value.q_per_channel_axis()}
        else:
            meta[key] = {"type": "qtensor", "dtype": str(value.dtype), "scale": value.q_scale(), "zero_point": value.q_zero_point()}
    elif isinstance(value, torch.Tensor):
        tensors[key] = value.detach().contiguous().clone()
    else:
        raise TypeError(f"cannot serialise state entry {key!r} of type {type(value).__name__}")


def _decode(key: str, meta: dict[str, dict[str, Any]], tensors: dict[str, torch.Tensor]) -> Any:
    if key not in meta:
        return tensors[key]
    m = meta[key]
    kind = m["type"]
    if kind == "none":
        return None
    if kind == "dtype":
        return _DTYPES[m["value"]]
    if kind == "tuple":
        return tuple(_decode(f"{key}::{i}", meta, tensors) for i in range(m["len"]))
    if kind == "qtensor":
        return torch._make_per_tensor_quantized_tensor(tensors[f"{key}::int"], m["scale"], m["zero_point"])
    if kind == "qtensor_per_channel":
        return torch._make_per_channel_quantized_tensor(
            tensors[f"{key}::int"], tensors[f"{key}::scales"], tensors[f"{key}::zero_points"], m["axis"]
        )
    raise ValueError(f"unknown state entry type {kind!r} for {key!r}")


def encode_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, dict[str, Any]] = {}
    for key, value in state.items():
        _encode(key, value, tensors, meta)
    return tensors, meta


def decode_state(tensors: dict[str, torch.Tensor], meta: dict[str, dict[str, Any]]) -> dict[str, Any]:
    top = {k.split("::", 1)[0] for k in tensors} | {k.split("::", 1)[0] for k in meta}
    return {k: _decode(k, meta, tensors) for k in sorted(top)}


def _atomic_dir_write(path: Path, write) -> None:
    """Write into a temporary sibling folder, then swap it in: readers never see half an artifact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        write(tmp)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old.{os.getpid()}")
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:  # put the previous version back
                os.replace(old, path)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as err:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC and not isinstance(err, DiskFullError):
            raise DiskFullError(path, getattr(err, "filename", None)) from None
        raise


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


def write_state_artifact(path: str | Path, state: dict[str, Any], spec: Any, *, extra=None) -> Any:
    """Encode ``state`` into safetensors, record its layout and module versions in ``spec`` (any spec with
    ``state`` and ``module_versions`` fields) and write both, plus what ``extra(tmp)`` adds, atomically."""
    tensors, meta = encode_state(state)
    versions = {k: dict(v) for k, v in getattr(state, "_metadata", {}).items()}
    spec = spec.model_copy(update={"state": meta, "module_versions": versions})

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": spec.format})
        if extra is not None:
            extra(tmp)
        written["spec"] = write_spec_with_hashes(tmp, spec)  # last: hashes of every file above

    written: dict[str, Any] = {}
    _atomic_dir_write(Path(path), write)
    return written["spec"]


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


def write_json_atomic(path: str | Path, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2, default=str))
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC and not isinstance(err, DiskFullError):
            raise DiskFullError(path) from None
        raise


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
