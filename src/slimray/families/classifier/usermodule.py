"""The user's own model: a factory found by import path, weights from safetensors, rebuilt without pickle.

A teacher is ``factory(**kwargs)`` (``"my_models.net:build"``, its folder given as ``code_dir``) with a
safetensors state dict loaded into it; an artifact carries the factory's module itself (``carried``) and is
rebuilt from that, never from ``code_dir``. A structurally pruned copy (torch-pruning removes channels and
neurons) is described by what changed: the integer attributes of each module that pruning rewrote
(``in_channels``, ``out_features``, ``num_features``, ...) and the new shapes of its tensors. Rebuilding calls
the same factory, applies those changes and loads the weights, so an artifact of a derived student is the
factory's import path + a JSON record + safetensors, never a pickled module. Pure torch, no ray.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimray.schema import ConfigError

FACTORY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
PICKLED_SUFFIXES = {".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt"}
MAX_LISTED = 5


def check_factory_path(value: str) -> str:
    if not FACTORY_RE.match(value):
        raise ValueError(f"factory {value!r} must look like 'package.module:function' (an import path, a colon, a name)")
    return value


def _add_code_dir(code_dir: str | None) -> bool:
    """Put ``code_dir`` on sys.path; False when it is not a folder here (on a cluster node the code arrives
    with the job's ``py_modules`` instead, so the import is still tried)."""
    if code_dir is None:
        return True
    path = str(Path(code_dir).resolve())
    if not Path(path).is_dir():
        return False
    if path not in sys.path:
        sys.path.insert(0, path)
    return True


def import_factory(factory: str, *, code_dir: str | None = None, field: str = "teacher.factory"):
    """The callable named by ``factory`` (``module:attr``), importing ``module`` with ``code_dir`` on the path."""
    check_factory_path(factory)
    found = _add_code_dir(code_dir)
    module_name = factory.partition(":")[0]
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        if not found:
            raise ConfigError(f"teacher.code_dir {code_dir!r} is not a folder (and {module_name!r} is not importable without it)") from None
        where = f" (code_dir {code_dir})" if code_dir else " (set teacher.code_dir to the folder holding it)"
        raise ConfigError(f"{field} {factory!r}: cannot import module {module_name!r}{where}: {err}") from None
    except Exception as err:  # the user's module failed while importing
        raise ConfigError(f"{field} {factory!r}: importing {module_name!r} raised {type(err).__name__}: {err}") from None
    from slimray.families.classifier.carried import factory_attribute

    return factory_attribute(obj, factory, field=field, what=f"module {module_name!r}")


def build_from_factory(factory: str, kwargs: dict[str, Any], *, code_dir: str | None = None, field: str = "teacher.factory") -> nn.Module:
    return _call(import_factory(factory, code_dir=code_dir, field=field), factory, kwargs, field=field)


def build_from_spec(spec: Any, *, field: str = "model.factory") -> nn.Module:
    """``factory(**kwargs)`` of a ``ModuleSpec``: from the code the artifact carries (``spec.code``, imported under a
    private name, see ``carried``), else the factory imported as installed or from ``code_dir`` (a teacher's config, or
    an artifact written before the code was carried: while that folder still exists it is used; once it is gone the
    error asks for a re-run, which writes the code into the artifact)."""
    if spec.code:
        from slimray.families.classifier.carried import import_carried

        return _call(import_carried(spec.factory, spec.code, field=field), spec.factory, spec.kwargs, field=field)
    if spec.code_dir is not None and not Path(spec.code_dir).is_dir():
        try:
            fn = import_factory(spec.factory, code_dir=spec.code_dir, field=field)
        except ConfigError:
            raise ConfigError(
                f"{field} {spec.factory!r}: this model's spec names code_dir {spec.code_dir}, which is not a folder here (moved or "
                "deleted), and carries no code of its own (it was written before slimray carried the model's code inside the "
                "artifact): re-run `slimray run` (or `slimray sweep`) to rewrite it self-contained, or put the folder back"
            ) from None
        return _call(fn, spec.factory, spec.kwargs, field=field)
    return build_from_factory(spec.factory, spec.kwargs, code_dir=spec.code_dir, field=field)


def _call(fn: Any, factory: str, kwargs: dict[str, Any], *, field: str) -> nn.Module:
    try:
        model = fn(**kwargs)
    except Exception as err:
        raise ConfigError(f"{field} {factory!r} raised {type(err).__name__} when called with {kwargs}: {err}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{field} {factory!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def check_weights_file(path: str | Path, *, field: str = "teacher.weights") -> Path:
    """A safetensors file that exists; pickled checkpoints are refused with how to convert them."""
    path = Path(path)
    if path.suffix.lower() in PICKLED_SUFFIXES:
        raise ConfigError(
            f"{field} {str(path)!r} looks like a pickled torch file; slimray loads no pickle. Save the weights with "
            "safetensors instead: `from safetensors.torch import save_file; save_file(model.state_dict(), 'teacher.safetensors')`"
        )
    if not path.is_file():
        raise ConfigError(f"{field}: file not found: {path}")
    if path.suffix.lower() != ".safetensors":
        raise ConfigError(f"{field} {str(path)!r}: expected a .safetensors file")
    return path


def read_safetensors(path: Path, *, field: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ConfigError(f"{field} {str(path)!r} is not a readable safetensors file: {err}") from None


def state_mismatches(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Human-readable differences between ``model``'s state dict and ``state`` (missing, unexpected, shape)."""
    own = model.state_dict()
    out = [f"missing key {k!r} (shape {list(v.shape)})" for k, v in own.items() if k not in state]
    out += [f"unexpected key {k!r} (shape {list(v.shape)})" for k, v in state.items() if k not in own]
    out += [
        f"shape of {k!r}: file {list(state[k].shape)}, module {list(v.shape)}"
        for k, v in own.items() if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    return out


def load_weights(model: nn.Module, path: str | Path, *, field: str = "teacher.weights") -> nn.Module:
    """Load a safetensors state dict into ``model``; a mismatch names the file and lists the first differences."""
    path = check_weights_file(path, field=field)
    state = read_safetensors(path, field=field)
    bad = state_mismatches(model, state)
    if bad:
        more = f" (and {len(bad) - MAX_LISTED} more)" if len(bad) > MAX_LISTED else ""
        raise ConfigError(
            f"{field} {str(path)!r} does not match the factory's module: " + "; ".join(bad[:MAX_LISTED]) + more
        )
    model.load_state_dict(state, strict=True)
    return model


# --- structural changes (pruning) recorded as data ------------------------------------------------------

def _int_attrs(module: nn.Module) -> dict[str, Any]:
    """A module's plain integer (or tuple-of-int) attributes: the widths pruning rewrites."""
    out = {}
    for k, v in vars(module).items():
        if k.startswith("_") or isinstance(v, bool):
            continue
        if isinstance(v, int) or (isinstance(v, tuple) and v and all(isinstance(i, int) and not isinstance(i, bool) for i in v)):
            out[k] = list(v) if isinstance(v, tuple) else v
    return out


def structure_changes(original: nn.Module, changed: nn.Module) -> tuple[dict[str, dict[str, Any]], dict[str, list[int]]]:
    """(module attributes that differ, tensor shapes that differ) of ``changed`` relative to ``original``."""
    before = dict(original.named_modules())
    attrs: dict[str, dict[str, Any]] = {}
    for name, mod in changed.named_modules():
        if isinstance(mod, nn.Identity):  # a dropped block (recorded by removed_modules)
            continue
        ref = before.get(name)
        if ref is None:
            raise ValueError(f"module {name!r} is not in the original model: structural changes beyond resizing are not recorded")
        old, new = _int_attrs(ref), _int_attrs(mod)
        diff = {k: v for k, v in new.items() if old.get(k) != v}
        if diff:
            attrs[name] = diff
    ref_state = original.state_dict()
    shapes = {k: list(v.shape) for k, v in changed.state_dict().items() if k in ref_state and tuple(ref_state[k].shape) != tuple(v.shape)}
    return attrs, shapes


def apply_structure(model: nn.Module, attrs: dict[str, dict[str, Any]], shapes: dict[str, list[int]]) -> nn.Module:
    """Resize a freshly built ``model`` in place to a recorded pruned structure (values are loaded afterwards)."""
    modules = dict(model.named_modules())
    for name, changes in attrs.items():
        mod = modules.get(name)
        if mod is None:
            raise ValueError(f"recorded module {name!r} is not in the factory's model (was the factory changed?)")
        for k, v in changes.items():
            setattr(mod, k, tuple(v) if isinstance(v, list) else v)
    for key, shape in shapes.items():
        owner_name, _, leaf = key.rpartition(".")
        owner = modules.get(owner_name)
        if owner is None:
            raise ValueError(f"recorded tensor {key!r} has no owner module in the factory's model")
        current = getattr(owner, leaf)
        empty = torch.zeros(shape, dtype=current.dtype)  # zeros, not empty: a quantizer calibrates on it before the load
        if isinstance(current, nn.Parameter):
            setattr(owner, leaf, nn.Parameter(empty, requires_grad=current.requires_grad))
        elif leaf in owner._buffers:
            owner._buffers[leaf] = empty
        else:
            raise ValueError(f"recorded tensor {key!r} is neither a parameter nor a buffer")
    return model


# --- depth: repeated blocks dropped (replaced by identity) ----------------------------------------------

def repeated_blocks(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Blocks that can be dropped: children of an ``nn.Sequential`` / ``nn.ModuleList`` holding two or more
    modules of the same class, whose output has the shape of their input (a residual block, a transformer
    layer), so that replacing one with the identity leaves a working network."""
    candidates: list[str] = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Sequential, nn.ModuleList)):
            kids = list(mod.named_children())
            counts: dict[type, int] = {}
            for _, k in kids:
                counts[type(k)] = counts.get(type(k), 0) + 1
            candidates += [f"{name}.{n}" if name else n for n, k in kids  # composite modules only, not a lone norm
                           if counts[type(k)] >= 2 and any(True for _ in k.children()) and any(True for _ in k.parameters())]
    shapes: dict[str, bool] = {}
    modules = dict(model.named_modules())
    hooks = []
    for n in candidates:
        def hook(mod, args, out, n=n):
            x = args[0] if args else None
            shapes[n] = isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor) and x.shape == out.shape
        hooks.append(modules[n].register_forward_hook(hook))
    try:
        was = model.training
        model.eval()
        with torch.no_grad():
            model(example)
        model.train(was)
    finally:
        for h in hooks:
            h.remove()
    return [n for n in candidates if shapes.get(n)]


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.ModuleList):
        parent[int(leaf)] = new
    else:
        setattr(parent, leaf, new)


def drop_modules(model: nn.Module, names: list[str]) -> nn.Module:
    """Replace each named block by ``nn.Identity`` in place (the block's parameters go with it)."""
    for name in names:
        _set_module(model, name, nn.Identity())
    return model


def block_importance(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, float]:
    """How much the model's output distribution moves (KL to the full model's softmax on ``x``) when each block
    alone is replaced by the identity: the blocks that matter least are dropped first."""
    import copy

    model = model.eval()
    with torch.no_grad():
        ref = torch.log_softmax(model(x).float(), dim=1)
        out = {}
        for n in names:
            trial = drop_modules(copy.deepcopy(model), [n])
            got = torch.log_softmax(trial(x).float(), dim=1)
            out[n] = float(torch.nn.functional.kl_div(got, ref, log_target=True, reduction="batchmean"))
    return out


def removed_modules(original: nn.Module, changed: nn.Module) -> list[str]:
    """Modules of ``original`` that are an ``nn.Identity`` in ``changed`` (dropped blocks)."""
    now = dict(changed.named_modules())
    return [n for n, m in original.named_modules()
            if n and not isinstance(m, nn.Identity) and isinstance(now.get(n), nn.Identity)]
