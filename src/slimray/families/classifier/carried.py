"""The user's model code carried inside an artifact, so that a model folder is self-contained.

A user-module artifact (``ModuleSpec``) holds the factory's top-level module (``user_models.py``) or package
(``user_pkg/...``) under ``code/`` in the artifact folder. ``ModuleSpec.code`` lists each file by its path
relative to ``code/`` with its sha256 (the artifact's ``files`` hashes them too, like the weights), so the
JSON spec names no absolute path. Which code is carried: the top-level module or package of ``teacher.factory``
when the teacher names a ``teacher.code_dir`` (packed from there, or, where that folder is not on this machine,
from wherever the module was imported: a submitted job's ``py_modules``). A factory installed as a package
(no ``code_dir``; e.g. the Hugging Face adapter) is not carried: the serving machine must have it installed.

Loading never imports from the folder the user once had. The carried files' bytes are checked against their
sha256, kept in a per-process store keyed by hash (``remember``), written into a private temporary folder and
imported as a submodule of a synthetic package named after the code's digest (``_slimray_code_<digest>``), so
two versions of ``user_models`` in one process never collide, and nothing on ``sys.path`` (or the user's
folder, moved or deleted) is consulted. A package must import its own modules relatively (``from . import x``):
an absolute self-import would look for the package by its own name; ``pack_code`` refuses it, and refuses a
module that imports a sibling module of ``code_dir`` the artifact would not carry.

Trust: this is the user's own Python code, run when the artifact is loaded. An artifact is code: load and serve
only artifacts you made (docs/artifacts.md). Pure Python, no torch, no ray.
"""

from __future__ import annotations

import ast
import atexit
import hashlib
import importlib
import importlib.util
import json
import re
import shutil
import sys
import tempfile
import types
from pathlib import Path, PurePosixPath
from typing import Any

from slimray.schema import ConfigError
from slimray.storage import CODE_FOLDER  # noqa: F401 - the artifact's sub-folder holding the carried files

PACKAGE_PREFIX = "_slimray_code_"
MAX_CODE_BYTES = 32 * 1024 * 1024  # a package bigger than this holds data, not code: the message says so
SKIPPED_DIRS = {"__pycache__"}
SKIPPED_SUFFIXES = {".pyc", ".pyo"}
PART_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")
SHA_RE = re.compile(r"^[0-9a-f]{64}$")

_BLOBS: dict[str, bytes] = {}  # sha256 -> bytes of every carried file this process has verified
_ROOT: list[Path] = []  # the private folder carried code is written into (one per process, removed at exit)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def top_name(factory: str) -> str:
    """The factory's top-level module name: ``user_pkg`` for ``user_pkg.models:build``."""
    return factory.split(":", 1)[0].split(".", 1)[0]


def check_code_listing(code: dict[str, str], factory: str) -> dict[str, str]:
    """``ModuleSpec.code``: relative POSIX paths (no ``..``, no absolute path, plain file names) under the factory's
    top-level module or package, each with a sha256. Raises ValueError naming the bad entry."""
    top = top_name(factory)
    for rel, digest in code.items():
        p = PurePosixPath(rel)
        if "\\" in rel or p.is_absolute() or not p.parts or any(not PART_RE.match(part) for part in p.parts) or ".." in p.parts:
            raise ValueError(f"code entry {rel!r}: must be a relative path of plain names inside the artifact's {CODE_FOLDER}/ folder")
        if not (rel == f"{top}.py" or p.parts[0] == top and len(p.parts) > 1):
            raise ValueError(f"code entry {rel!r} is not part of the factory's module {top!r} ({top}.py or {top}/...)")
        if not SHA_RE.match(digest):
            raise ValueError(f"code entry {rel!r}: {digest!r} is not a sha256 (64 lowercase hex digits)")
    if f"{top}.py" in code and len(code) > 1:
        raise ValueError(f"code: a single module {top}.py carries no other file")
    return code


def code_digest(code: dict[str, str]) -> str:
    return sha256_bytes(json.dumps(sorted(code.items())).encode())


# --- packing: the user's module or package as files ----------------------------------------------------

def _module_location(top: str, code_dir: str | None) -> Path:
    """Where the top-level module lives: ``code_dir/top.py`` or ``code_dir/top/``, else where Python finds it."""
    if code_dir is not None and Path(code_dir).is_dir():
        root = Path(code_dir)
        if (root / top).is_dir():
            return root / top
        if (root / f"{top}.py").is_file():
            return root / f"{top}.py"
        raise ConfigError(f"teacher.code_dir {code_dir}: neither {top}/ nor {top}.py is there (teacher.factory imports {top!r})")
    spec = importlib.util.find_spec(top)  # a submitted job: the code arrived with the job (py_modules)
    if spec is None or spec.origin in (None, "built-in", "frozen"):
        raise ConfigError(f"teacher.code_dir {code_dir!r} is not a folder here and module {top!r} is not importable: "
                          "the artifact cannot carry the model's code")
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(spec.origin)


def _imports(source: bytes, rel: str) -> list[str]:
    """Top-level names of the absolute imports in one Python file."""
    try:
        tree = ast.parse(source, filename=rel)
    except SyntaxError as err:
        raise ConfigError(f"teacher.code_dir: {rel} does not parse: {err}") from None
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name.split(".", 1)[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module.split(".", 1)[0])
    return names


def _check_imports(files: dict[str, bytes], *, top: str, code_dir: str | None) -> None:
    siblings: set[str] = set()
    if code_dir is not None and Path(code_dir).is_dir():
        for f in Path(code_dir).iterdir():
            name = f.stem if f.suffix == ".py" else f.name if f.is_dir() else None
            if name and name != top and name.isidentifier():
                siblings.add(name)
    package = not (len(files) == 1 and f"{top}.py" in files)
    for rel, data in files.items():
        if not rel.endswith(".py"):
            continue
        for name in _imports(data, rel):
            if package and name == top:
                raise ConfigError(
                    f"teacher.code_dir: {rel} imports its own package {top!r} by its absolute name; the artifact loads the "
                    f"package under a private name, so import its modules relatively (from . import ..., from .x import ...)"
                )
            if name in siblings:
                raise ConfigError(
                    f"teacher.code_dir: {rel} imports {name!r} from {code_dir}, which the artifact would not carry (it carries "
                    f"the factory's module {top!r} only): move {name!r} into a package with the factory"
                )


def pack_code(factory: str, code_dir: str | None) -> dict[str, bytes]:
    """The files of the factory's top-level module or package (relative path -> bytes), checked: regular files
    only, no symlink, plain names, at most ``MAX_CODE_BYTES``; ``__pycache__`` and compiled files left out."""
    top = top_name(factory)
    where = _module_location(top, code_dir)
    files: dict[str, bytes] = {}
    if where.is_file():
        files[f"{top}.py"] = where.read_bytes()
    else:
        for f in sorted(where.rglob("*")):
            rel = f.relative_to(where)
            if any(part in SKIPPED_DIRS or part.startswith(".") for part in rel.parts) or f.suffix in SKIPPED_SUFFIXES:
                continue
            if f.is_symlink():
                raise ConfigError(f"teacher.code_dir: {top}/{rel.as_posix()} is a symlink; the artifact carries regular files only")
            if f.is_dir():
                continue
            name = f"{top}/{rel.as_posix()}"
            if any(not PART_RE.match(part) for part in PurePosixPath(name).parts):
                raise ConfigError(f"teacher.code_dir: {name!r}: file names the artifact carries are letters, digits, '_', '-', '.', '+'")
            files[name] = f.read_bytes()
        if f"{top}/__init__.py" not in files:
            raise ConfigError(f"teacher.code_dir: {where} has no __init__.py; the artifact carries a module or a regular package")
    total = sum(len(b) for b in files.values())
    if total > MAX_CODE_BYTES:
        biggest = sorted(files, key=lambda k: -len(files[k]))[:3]
        raise ConfigError(f"teacher.code_dir: module {top!r} is {total / 2**20:.0f} MiB (largest files {biggest}); the artifact "
                          f"carries code (at most {MAX_CODE_BYTES // 2**20} MiB): keep data and weights out of the package")
    _check_imports(files, top=top, code_dir=code_dir)
    return files


# --- the per-process store and the private import ------------------------------------------------------

def remember(files: dict[str, bytes], code: dict[str, str] | None = None, *, where: str = "artifact") -> dict[str, str]:
    """Keep ``files`` (relative path -> bytes) in this process's store; with ``code`` (the spec's listing) every
    listed file must be there with its sha256 (``ValueError`` naming the file otherwise). Returns the listing."""
    listing = {rel: sha256_bytes(data) for rel, data in files.items()}
    if code is not None:
        for rel, digest in code.items():
            if rel not in listing:
                raise ValueError(f"{where}: {CODE_FOLDER}/{rel} is missing")
            if listing[rel] != digest:
                raise ValueError(f"{where}: {CODE_FOLDER}/{rel} does not match its sha256 in spec.json (changed after it was written)")
        listing = {rel: listing[rel] for rel in code}
    for rel, digest in listing.items():
        _BLOBS[digest] = files[rel]
    return listing


def files_for(code: dict[str, str], *, search: tuple[str | Path, ...] = ()) -> dict[str, bytes]:
    """The bytes of every file ``code`` lists: from the store, else read (and checked) from the artifact folders
    in ``search``. ``ConfigError`` when this process has never seen them."""
    missing = [rel for rel, digest in code.items() if digest not in _BLOBS]
    for folder in search if missing else ():
        try:
            remember(read_code(Path(folder), code), code, where=str(folder))
        except (ValueError, OSError):
            continue
        missing = []
        break
    if missing:
        raise ConfigError(f"the model's carried code ({', '.join(missing)}) is not loaded in this process: load the artifact "
                          "that carries it first (slimray.families.classifier.artifacts.load_artifact)")
    return {rel: _BLOBS[digest] for rel, digest in code.items()}


def read_code(folder: Path, code: dict[str, str]) -> dict[str, bytes]:
    """The listed files from ``folder/code/``, refusing symlinks and paths that leave the folder (ValueError)."""
    base = folder / CODE_FOLDER
    if base.is_symlink():
        raise ValueError(f"{folder}: {CODE_FOLDER}/ is a symlink; an artifact holds regular files only")
    out = {}
    for rel in code:
        p = base
        for part in PurePosixPath(rel).parts:
            if part in ("", ".", ".."):
                raise ValueError(f"{folder}: {CODE_FOLDER}/{rel} leaves the artifact folder")
            p = p / part
            if p.is_symlink():
                raise ValueError(f"{folder}: {CODE_FOLDER}/{rel} is (or goes through) a symlink; an artifact holds regular files only")
        if not p.is_file():
            raise ValueError(f"{folder}: {CODE_FOLDER}/{rel} is missing")
        out[rel] = p.read_bytes()
    return out


def _root() -> Path:
    if not _ROOT:
        root = Path(tempfile.mkdtemp(prefix="slimray-code-"))
        atexit.register(shutil.rmtree, root, True)
        _ROOT.append(root)
    return _ROOT[0]


def carried_package(code: dict[str, str]) -> str:
    """The private package holding this code (written out and registered once per process); its name is the
    code's digest, so different code never shares a module."""
    name = PACKAGE_PREFIX + code_digest(code)[:24]
    if name in sys.modules:
        return name
    files = files_for(code)
    folder = _root() / name
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=_root()))
    for rel, data in files.items():
        target = tmp.joinpath(*PurePosixPath(rel).parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    package = types.ModuleType(name, "slimray: a model's carried code (see slimray.families.classifier.carried)")
    package.__path__ = [str(folder)]  # type: ignore[attr-defined]
    package.__package__ = name
    sys.modules[name] = package
    return name


def import_carried(factory: str, code: dict[str, str], *, field: str = "model.factory") -> Any:
    """The callable ``factory`` names, imported from the carried code under its private package."""
    package = carried_package(code)
    module_name = factory.partition(":")[0]
    try:
        obj: Any = importlib.import_module(f"{package}.{module_name}")
    except ImportError as err:
        raise ConfigError(f"{field} {factory!r}: importing the artifact's carried module {module_name!r} failed: {err}") from None
    except Exception as err:  # the user's module failed while importing
        raise ConfigError(f"{field} {factory!r}: importing the artifact's carried {module_name!r} raised {type(err).__name__}: {err}") from None
    return factory_attribute(obj, factory, field=field, what=f"the carried module {module_name!r}")


def factory_attribute(module: Any, factory: str, *, field: str, what: str) -> Any:
    """The callable after the colon of ``factory`` (``module:attr.sub``) in the imported ``module``."""
    attr = factory.partition(":")[2]
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{field} {factory!r}: {what} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{field} {factory!r} is not callable")
    return obj
