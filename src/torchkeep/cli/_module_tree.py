"""The module tree of a flat state dict: names split at dots, with totals per module.

Repeated blocks (``layers.0`` ... ``layers.31`` with identical tensors) are drawn once, as
``layers.[0-31] x32``, so a large model's tree stays a screenful.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from rich.text import Text
from rich.tree import Tree

from torchkeep._facts import TensorInfo, numel
from torchkeep.cli._output import human_bytes, human_count, shape_text


@dataclass
class Node:
    """A module prefix: the tensors directly under it and its child prefixes."""

    name: str
    path: str
    tensors: list[TensorInfo] = field(default_factory=list)
    children: dict[str, Node] = field(default_factory=dict)
    num_params: int = 0
    nbytes: int = 0
    type: str = ""  # the class recorded in a whole-model pickle, when known

    def signature(self) -> tuple[object, ...]:
        """Relative names, shapes and dtypes of everything below: equal for repeated blocks."""
        start = len(self.path) + 1 if self.path else 0
        return tuple((t.name[start:], t.shape, t.dtype) for t in self.all_tensors())

    def all_tensors(self) -> Iterable[TensorInfo]:
        yield from self.tensors
        for child in self.children.values():
            yield from child.all_tensors()


def build_tree(
    tensors: Iterable[TensorInfo], root_name: str = "", classes: dict[str, str] | None = None
) -> Node:
    """Group tensors by their dotted module prefix, naming each module's class when known."""
    known = classes or {}
    root = Node(root_name, "", type=known.get("", ""))
    for info in tensors:
        parts = info.name.split(".")
        node = root
        node.num_params += numel(info.shape)
        node.nbytes += info.nbytes
        for depth, part in enumerate(parts[:-1]):
            if part not in node.children:
                path = ".".join(parts[: depth + 1])
                node.children[part] = Node(part, path, type=known.get(path, ""))
            node = node.children[part]
            node.num_params += numel(info.shape)
            node.nbytes += info.nbytes
        node.tensors.append(info)
    return root


def _runs(children: list[Node]) -> list[list[Node]]:
    """Consecutive integer-named siblings with identical contents, grouped."""
    runs: list[list[Node]] = []
    for child in children:
        last = runs[-1] if runs else None
        if (
            last is not None
            and child.name.isdigit()
            and last[-1].name.isdigit()
            and int(child.name) == int(last[-1].name) + 1
            and child.signature() == last[0].signature()
        ):
            last.append(child)
        else:
            runs.append([child])
    return runs


def _label(name: str, node: Node, main_dtype: str, *, each: int = 1, width: int = 0) -> Text:
    counts = f"{human_count(node.num_params)} params · {human_bytes(node.nbytes)}"
    text = Text(name, style="bold")
    if node.type:
        text.append(f" ({node.type.rsplit('.', 1)[-1]})", style="green")
    if each > 1:
        text.append(f" x{each}", style="magenta")
        counts = f"each {counts}"
    text.pad_right(width - len(text))
    text.append(f"  {counts}", style="dim")
    if node.tensors:
        parts = []
        for info in node.tensors:
            suffix = "" if info.dtype == main_dtype else f" {info.dtype}"
            parts.append(f"{info.name.rsplit('.', 1)[-1]} {shape_text(info.shape)}{suffix}")
        text.append("  " + " · ".join(parts), style="cyan")
    return text


def render_tree(root: Node, main_dtype: str, depth: int | None = None) -> Tree:
    """A rich tree of ``root``; below ``depth`` levels only counts are shown."""
    label = _label(root.name or "(root)", root, main_dtype)
    tree = Tree(label)

    def add(parent: Tree, parent_label: Text, node: Node, level: int) -> None:
        if depth is not None and level >= depth:
            if node.children:
                parent_label.append(f"  (+{len(node.children)} submodules)", style="dim")
            return
        runs = [
            (run[0], run[0].name if len(run) == 1 else f"[{run[0].name}-{run[-1].name}]", len(run))
            for run in _runs(list(node.children.values()))
        ]
        width = max((len(name) + (len(f" x{n}") if n > 1 else 0) for _, name, n in runs), default=0)
        for first, name, count in runs:
            child_label = _label(name, first, main_dtype, each=count, width=width)
            add(parent.add(child_label), child_label, first, level + 1)

    add(tree, label, root, 0)
    return tree


def tree_json(node: Node) -> dict[str, Any]:
    """The tree as nested dicts (every module, nothing collapsed)."""
    return {
        "name": node.path,
        "class": node.type or None,
        "params": node.num_params,
        "bytes": node.nbytes,
        "tensors": [t.name for t in node.tensors],
        "children": [tree_json(child) for child in node.children.values()],
    }
