"""The layers of slimray, declared once, and the check that the source keeps to them (``tests/test_boundaries.py``).

Every module of the package belongs to one layer (the longest module prefix in ``LAYERS`` wins, a ``*`` standing for one
name; each prefix says why it is there). A layer may import its own modules and those of the layers it names in
``may_import``; ``ray`` says whether it may load Ray at all. The check reads the source with ``ast`` and follows every import, at module level
and inside functions alike, **transitively**: if A may not use C, A importing B (allowed) that imports C is a
violation too, reported with the chain. Importing ``a.b.c`` also runs ``a/__init__`` and ``a/b/__init__``: what
those import counts against the importer (the package itself is passed through, not placed).

Further rules: only ``slimray.raycompat`` touches a private Ray name (a module or attribute starting with ``_``
under ``ray``, or a ``_keyword`` passed to a Ray function); no module-level import cycle anywhere; no cycle of
imports (lazy ones included) that crosses a package; the layers themselves form no cycle.

    python -m slimray.layers [SRC_DIR]     # prints each violation; exit status 1 if any

The table of layers, and what moved to make the package keep to them, are in docs/layers.md.

What the check cannot see: hooks named as strings (the family registry, ``slimray.families``, resolves
``"module:attribute"`` on use; that is the point of a registry) and ``importlib`` calls.
"""

from __future__ import annotations

import ast
import sys
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "slimray"


@dataclass(frozen=True)
class Layer:
    name: str
    why: str
    may_import: tuple[str, ...]  # other layers; its own is always allowed
    ray: bool  # may load ray (directly or through what it imports)
    modules: dict[str, str] = field(hash=False)  # module prefix -> why it is in this layer


_ALL_BELOW_ENTRY = ("core", "families", "config", "raybase", "data", "training", "sweep", "serving")

LAYERS: tuple[Layer, ...] = (
    Layer("core", "shared by every layer: knows no family, no Ray, no stage", (), ray=False, modules={
        "slimray": "the package: its docstring and version",
        "slimray.schema": "the strict pydantic base and config errors",
        "slimray.storage": "artifact folders of every family: atomic writes, sha256 per file, state dicts without pickle",
        "slimray.codec": "the codec contract a family gives serving (and RequestError): below both",
        "slimray.compress": "pruning, quantization, runtimes and measurement of any torch model",
        "slimray.runs": "run folders and the log line (pure python; the Train loop and the sweeps log through it)",
        "slimray.runlock": "the run folder's lock (pure python)",
        "slimray.auth": "the Ray token a client sends (environment and files only)",
        "slimray.exposure": "whether an endpoint is reachable without a key (pure python)",
        "slimray.report": "report.json / report.md from rows (pure python)",
        "slimray.recipes": "the packaged recipe files",
        "slimray.layers": "this map and its check (stdlib only)",
    }),
    Layer("families", "model families: pure torch/transformers, no Ray, no serving, no stages", ("core",), ray=False,
          modules={
        "slimray.families": "one folder per family plus the registry, which names its hooks as import strings",
        "slimray.evaluation": "the classifier's quality metric: accuracy or the user's function, imported like the "
                              "user's model",
    }),
    Layer("config", "run documents: pure pydantic, checked in full before Ray starts", ("core", "families"), ray=False,
          modules={
        "slimray.config": "the classifier's run document",
        "slimray.configbase": "the base every run document shares and the one loader of recipes and config files",
        "slimray.families.*.config": "each family's run document (embeds the shared serve section), in its own folder",
        "slimray.sweep.space": "sweep space files and the compression search space (Ray Tune's form is built in the sweep)",
        "slimray.serving.options": "the serve schema a run document and `slimray serve` check",
        "slimray.data.files_config": "the `data: {source: files}` section",
    }),
    Layer("raybase", "the Ray glue every Ray-side layer shares", ("core",), ray=True, modules={
        "slimray.raycompat": "every private Ray API, checked against one Ray version",
        "slimray.console": "what the console shows, Ray's logs, SIGINT/SIGTERM on the driver",
    }),
    Layer("data", "built-in datasets and the user's files (Ray Data)", ("core", "families", "config", "raybase"),
          ray=True, modules={
        "slimray.data": "datasets, normalisation, the run's test sample, Ray Data readers",
    }),
    Layer("training", "the one Ray Train loop", ("core", "families", "config", "raybase", "data"), ray=True, modules={
        "slimray.training": "runs any family's TrainTask on Ray Train",
    }),
    Layer("sweep", "Ray Tune sweeps", ("core", "families", "config", "raybase", "data", "training"), ray=True,
          modules={"slimray.sweep": "the Tune engine, trials, selection (a distillation trial is a Train run)"}),
    Layer("serving", "Ray Serve: a replica loads an artifact, never stage code",
          ("core", "families", "config", "raybase", "data"), ray=True, modules={
        "slimray.serving": "the Serve builder, protocols, codecs and the checks around a deployment",
    }),
    Layer("entry", "commands and stages: what a person runs", _ALL_BELOW_ENTRY, ray=True, modules={
        "slimray.pipelines": "the stages of a run",
        "slimray.cli": "the `slimray` command",
        "slimray.jobs": "Ray Jobs submission",
        "slimray.runtime": "starting or joining Ray for a command",
        "slimray.runconfig": "loading a run's config for a command",
        "slimray.starter": "`slimray init` for the user's own model",
        "slimray.exports": "`slimray export`",
        "slimray.cluster_local": "`slimray cluster` on this machine",
    }),
)

PRIVATE_RAY_ALLOWED = ("slimray.raycompat",)


@dataclass(frozen=True)
class Import:
    target: str  # a module of the package, or an outside top-level package ("ray")
    line: int
    lazy: bool  # inside a function: runs when called, not when the importer is imported


@dataclass
class Graph:
    """What each module of the package imports, read from the source."""

    files: dict[str, Path]  # module -> its file (packages: their __init__.py)
    packages: set[str]
    imports: dict[str, list[Import]]
    private_ray: dict[str, list[tuple[int, str]]]  # module -> (line, the private Ray name it uses)


@dataclass(frozen=True)
class Violation:
    rule: str
    module: str
    path: tuple[str, ...]  # the import chain from ``module`` to what it may not use
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.module}:{self.line}: {self.message}"


# ------------------------------------------------------------------------------------------------- reading


def scan(root: str | Path, *, package: str = PACKAGE) -> Graph:
    """The import graph of the package whose folder is ``root`` (``.../src/slimray``)."""
    root = Path(root)
    files: dict[str, Path] = {}
    packages: set[str] = set()
    for f in sorted(root.rglob("*.py")):
        parts = (package, *f.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
            packages.add(".".join(parts))
        files[".".join(parts)] = f
    graph = Graph(files=files, packages=packages, imports={}, private_ray={})
    for module, f in files.items():
        reader = _Reader(module, is_package=module in packages, known=files, package=package)
        reader.visit(ast.parse(f.read_text(), filename=str(f)))
        graph.imports[module] = reader.imports
        by_line: dict[int, str] = {}
        for line, name in reader.private:  # one report per line: the longest private chain on it
            if len(name) > len(by_line.get(line, "")):
                by_line[line] = name
        graph.private_ray[module] = sorted(by_line.items())
    return graph


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


class _Reader(ast.NodeVisitor):
    def __init__(self, module: str, *, is_package: bool, known: dict[str, Path], package: str):
        self.module, self.known, self.package = module, known, package
        self.here = module if is_package else module.rpartition(".")[0]
        self.depth = 0  # > 0 inside a function
        self.imports: list[Import] = []
        self.private: list[tuple[int, str]] = []
        self.ray_names: set[str] = set()  # local names bound to Ray modules or objects

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def _add(self, name: str, line: int) -> None:
        top = name.partition(".")[0]
        if top != self.package:
            if top == "ray":
                self.imports.append(Import("ray", line, self.depth > 0))
                bad = next((p for p in name.split(".") if _private(p)), None)
                if bad:
                    self.private.append((line, name))
            return
        while name and name not in self.known:  # an attribute imported from a module: the module
            name = name.rpartition(".")[0]
        if name and name != self.module:
            self.imports.append(Import(name, line, self.depth > 0))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node.lineno)
            if alias.name.partition(".")[0] == "ray":
                self.ray_names.add(alias.asname or "ray")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            parts = self.here.split(".")
            parts = parts[: len(parts) - (node.level - 1)]
            base = ".".join(parts + ([node.module] if node.module else []))
        for alias in node.names:
            full = f"{base}.{alias.name}"
            self._add(full if full in self.known else base, node.lineno)
            if base.partition(".")[0] == "ray":
                self.ray_names.add(alias.asname or alias.name)
                if _private(alias.name):
                    self.private.append((node.lineno, full))

    def _root(self, node: ast.AST) -> str | None:
        while isinstance(node, (ast.Attribute, ast.Call, ast.Subscript)):
            node = node.func if isinstance(node, ast.Call) else node.value
        return node.id if isinstance(node, ast.Name) else None

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if _private(node.attr) and self._root(node) in self.ray_names:
            self.private.append((node.lineno, f"{ast.unparse(node)}"))
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        if self._root(node.func) in self.ray_names:
            for kw in node.keywords:
                if kw.arg and _private(kw.arg):
                    self.private.append((node.lineno, f"{ast.unparse(node.func)}({kw.arg}=...)"))
        self.generic_visit(node)


# ------------------------------------------------------------------------------------------------- checking


def _prefixes() -> dict[str, Layer]:
    out: dict[str, Layer] = {}
    for layer in LAYERS:
        for prefix in layer.modules:
            if prefix in out:
                raise ValueError(f"{prefix} is placed in two layers: {out[prefix].name} and {layer.name}")
            out[prefix] = layer
    return out


def layer_of(module: str) -> Layer | None:
    """The layer of ``module``: the one whose prefix is its longest match (None: not placed). The package itself
    (``slimray``) is an entry for its ``__init__`` only, not a prefix of everything."""
    best, best_len = None, -1
    for prefix, layer in _prefixes().items():
        if "*" in prefix:  # one name segment: ``slimray.families.*.config`` is every family's config module
            parts, pattern = module.split("."), prefix.split(".")
            if len(parts) >= len(pattern) and all(p == "*" or p == m for p, m in zip(pattern, parts)) \
                    and len(prefix) > best_len:
                best, best_len = layer, len(prefix)
            continue
        below = module.startswith(prefix + ".") and prefix != PACKAGE
        if (module == prefix or below) and len(prefix) > best_len:
            best, best_len = layer, len(prefix)
    return best


def _map_problems() -> list[Violation]:
    names = {layer.name: layer for layer in LAYERS}
    out = []
    for layer in LAYERS:
        for other in layer.may_import:
            if other not in names:
                out.append(Violation("map", layer.name, (), 0, f"layer {layer.name} names an unknown layer {other!r}"))
    # the layers form no cycle: depth-first over may_import
    state: dict[str, int] = {}

    def visit(name: str, trail: tuple[str, ...]) -> None:
        state[name] = 1
        for other in names[name].may_import:
            if other not in names:
                continue
            if state.get(other) == 1:
                cycle = " -> ".join((*trail[trail.index(other):], other)) if other in trail else f"{name} -> {other}"
                out.append(Violation("layer-cycle", name, (), 0, f"the layers form a cycle: {cycle}"))
            elif other not in state:
                visit(other, (*trail, other))
        state[name] = 2

    for name in names:
        if name not in state:
            visit(name, (name,))
    return out


def _allowed(layer: Layer, target: str) -> bool:
    if target == "ray":
        return layer.ray
    other = layer_of(target)
    return other is not None and (other.name == layer.name or other.name in layer.may_import)


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _layer_violations(graph: Graph, module: str, layer: Layer) -> list[Violation]:
    """Everything ``module`` loads, followed through allowed modules and passed-through packages, against its layer."""
    out: list[Violation] = []
    seen: set[tuple[str, bool]] = set()
    first_line: dict[str, int] = {}
    queue: deque[tuple[str, bool, tuple[str, ...], int]] = deque()  # (node, placed?, chain, line in `module`)

    def push(src_chain: tuple[str, ...], line: int, imports: Iterable[Import]) -> None:
        for imp in imports:
            ln = line or imp.line
            queue.append((imp.target, True, (*src_chain, imp.target), ln))
            if imp.target != "ray":
                for parent in _parents(imp.target):
                    if parent not in src_chain and parent != module:
                        queue.append((parent, False, (*src_chain, parent), ln))

    push((module,), 0, graph.imports.get(module, []))
    while queue:
        node, placed, chain, line = queue.popleft()
        if (node, placed) in seen or (not placed and (node, True) in seen):
            continue
        seen.add((node, placed))
        if placed and not _allowed(layer, node):
            if node in first_line:
                continue
            first_line[node] = line
            what = "ray" if node == "ray" else f"{node} ({layer_of(node).name if layer_of(node) else 'unplaced'})"
            via = f" through {' -> '.join(chain[1:-1])}" if len(chain) > 2 else ""
            allowed = ", ".join(layer.may_import) or "nothing else"
            rule = "no-ray" if node == "ray" else "layer"
            out.append(Violation(rule, module, chain, line, (
                f"{layer.name} may not import {what}{via} ({layer.why}; {layer.name} may import {allowed})")))
            continue
        if node != "ray" and node in graph.imports:
            push(chain, line, graph.imports[node])
    return out


def _cycles(graph: Graph, *, module_level_only: bool) -> list[list[str]]:
    """Strongly connected components (more than one module) of the package's own imports."""
    edges = {m: sorted({i.target for i in imps if i.target in graph.files and not (module_level_only and i.lazy)})
             for m, imps in graph.imports.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for start in sorted(edges):  # iterative Tarjan
        if start in index:
            continue
        work = [(start, iter(edges[start]))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(edges.get(w, []))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def check(graph: Graph) -> list[Violation]:
    """Every violation of the layer map and the rules above, in a stable order."""
    out = _map_problems()
    for module in sorted(graph.files):
        layer = layer_of(module)
        if layer is None:
            out.append(Violation("unplaced", module, (), 0, "is in no layer: add its prefix to slimray.layers.LAYERS"))
            continue
        out += _layer_violations(graph, module, layer)
        if module not in PRIVATE_RAY_ALLOWED:
            for line, name in graph.private_ray.get(module, []):
                out.append(Violation("private-ray", module, (), line,
                                     f"uses Ray's private {name}: move it into slimray.raycompat (one shim per use)"))
    for comp in _cycles(graph, module_level_only=True):
        out.append(Violation("cycle", comp[0], tuple(comp), 0, f"module-level import cycle: {', '.join(comp)}"))
    for comp in _cycles(graph, module_level_only=False):
        homes = {m if m in graph.packages else m.rpartition(".")[0] for m in comp}
        if len(homes) > 1:
            out.append(Violation("cycle", comp[0], tuple(comp), 0,
                                 f"import cycle across packages (lazy imports included): {', '.join(comp)}"))
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    root = Path(args[0]) / PACKAGE if args else Path(__file__).parent
    problems = check(scan(root))
    for p in problems:
        print(p)
    print(f"{len(problems)} boundary violation(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
