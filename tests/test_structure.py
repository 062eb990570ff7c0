"""The package's import graph: no cycles, and function-local imports only to stay lazy.

A function-local import of a torchkeep module is how a cycle hides; the only ones allowed keep
a slow import off the paths that do not need it: ``torch.distributed.checkpoint`` (most of a
second) off every other verb, and torch itself off the command line where it can answer
without it.
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

import torchkeep

ROOT = Path(torchkeep.__file__).parent
# (module, imported module): function-local imports kept lazy on purpose.
LAZY = {
    ("torchkeep.formats.dcp", "torchkeep.formats.dcp_io"),
    ("torchkeep.training.manager", "torchkeep.distributed.dcp"),
    # The command line answers without torch where it can (safetensors headers, verify of a
    # safetensors file): the modules that need torch are imported only where they are used.
    ("torchkeep.tools.verify", "torchkeep.tools.verify_formats"),
    ("torchkeep.cli.inspect_cmd", "torchkeep.formats._base"),
    ("torchkeep.cli.inspect_cmd", "torchkeep.formats.registry"),
    ("torchkeep.cli.inspect_cmd", "torchkeep.tools.stats"),
    ("torchkeep.cli.manager_cmds", "torchkeep.training.manager"),
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(tree: ast.AST, modules: dict[str, Path]) -> set[str]:
    """torchkeep modules a syntax tree imports (``from torchkeep import _json`` is the
    submodule, not the package)."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = [f"{node.module}.{alias.name}" for alias in node.names]
            out.update(s for s in subs if s in modules)
            if not all(s in modules for s in subs) and node.module in modules:
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names if alias.name in modules)
    return out


def _type_checking_only(tree: ast.AST, modules: dict[str, Path]) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out |= _imports(node, modules)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        graph[name] = _imports(tree, modules) - _type_checking_only(tree, modules) - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_package_has_no_import_cycle() -> None:
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# The layers, lowest first: a module imports only from its own layer or lower ones.
LAYERS = [
    {
        "errors",
        "_common",
        "_facts",
        "_progress",
        "_device",
        "_tensors",
        "_tensor_parts",
        "__version__",
    },
    {"safety"},  # the security boundary: needs nothing but the leaves
    {"io"},  # the byte engine
    {"storage"},  # local and fsspec storage, the commit protocol, downloads
    {"formats"},  # one module per on-disk format, the registry
    {"weights"},  # save / load / load_state_dict / inspect
    {"training"},  # training state, save/load_checkpoint, the manager
    {"distributed"},  # DCP saves and restores, built on training state
    {"models"},  # whole models: save_model / load_model / export
    {"tools"},  # convert, diff, stats, verify
    {"", "api", "checkpoint", "manager", "retention"},  # the public package and its shims
    {"cli", "__main__"},  # a client of the public package: rendering only
    {"integrations"},  # trainer plugins, clients of the public package too
]
# The one import against the layers: the manager saves through DCP in a distributed run,
# imported only then (function-local; torch.distributed.checkpoint is slow to import).
UPWARD = {("torchkeep.training.manager", "torchkeep.distributed.dcp")}


def layer_of(module: str) -> int:
    part = module.split(".")[1] if "." in module else ""
    return next(i for i, names in enumerate(LAYERS) if part in names)


def test_imports_point_down_the_layers() -> None:
    upward = {
        (name, target)
        for name, targets in import_graph().items()
        for target in targets
        if layer_of(target) > layer_of(name)
    }
    assert upward == UPWARD


def test_the_layer_check_sees_an_upward_import() -> None:
    assert layer_of("torchkeep.io.read") < layer_of("torchkeep.formats.safetensors")
    assert layer_of("torchkeep") < layer_of("torchkeep.cli.main")


def test_function_local_imports_are_only_the_lazy_ones() -> None:
    modules = _modules()
    local: set[tuple[str, str]] = set()
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                body = ast.Module(body=node.body, type_ignores=[])
                local |= {(name, target) for target in _imports(body, modules)}
    assert local == LAZY


@pytest.mark.parametrize(
    ("old", "new", "name"),
    [
        ("api", "torchkeep.weights.api", "load"),
        ("checkpoint", "torchkeep.training.checkpoint", "read_manifest"),
        ("manager", "torchkeep.training.manager", "CheckpointManager"),
        ("retention", "torchkeep.training.retention", "KeepLast"),
    ],
)
def test_moved_modules_still_import_with_a_deprecation_warning(
    old: str, new: str, name: str
) -> None:
    sys.modules.pop(f"torchkeep.{old}", None)
    with pytest.warns(DeprecationWarning, match=new):
        module = importlib.import_module(f"torchkeep.{old}")
    assert getattr(module, name) is getattr(importlib.import_module(new), name)
    assert getattr(torchkeep, old) is module
