"""Artifact folders on disk, for every model family: written atomically, hashed, loaded without pickle.

A model folder holds its weights (``model.safetensors``), ``spec.json`` and whatever else the family adds
(``model.onnx``, a tokenizer). ``spec.json`` records the sha256 of every other file of the folder (``files``),
written in the same atomic step; ``verify_artifact`` checks them (and that the spec parses) and raises
``DamagedArtifactError`` naming the file; folders written before hashes existed (no ``files``) still load.
A full disk during a write raises ``DiskFullError`` naming the artifact; the temporary folder is removed and
the previous version stays.

State dicts are stored as safetensors: quantized tensors as their int representation plus scales and zero
points, non-tensor state (packed-parameter tuples, dtypes) described in the JSON (``encode_state`` /
``decode_state``), so nothing is ever unpickled. A family's own spec (``slimray.families.classifier.artifacts.ArtifactSpec`` for
the classifier, ``TextArtifactSpec`` for the sentence encoder) says what the tensors build. Core: no family,
no ray.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors.torch import save_file

from slimray.schema import ConfigError, StrictModel

WEIGHTS = "model.safetensors"
SPEC = "spec.json"


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


# the one subfolder an artifact may hold: a user module's carried code (families/classifier/carried.py)
CODE_FOLDER = "code"


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


def reusable(path: str | Path, *, spec_cls: type[StrictModel], log=None) -> bool:
    """True when ``path`` holds an intact artifact of the family spec ``spec_cls`` that a rerun may reuse. A damaged
    one is moved aside (so it is rebuilt) with one line through ``log`` naming the file; False also when there is
    nothing there."""
    path = Path(path)
    if not (path / SPEC).exists():
        return False
    try:
        verify_artifact(path, spec_cls)
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


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str))


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a reader sees the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC and not isinstance(err, DiskFullError):
            raise DiskFullError(path) from None
        raise
