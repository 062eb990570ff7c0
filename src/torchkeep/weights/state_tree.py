"""The module tree of a flat state dict: names split at dots, with totals per module.

Repeated blocks (``layers.0`` ... ``layers.31`` with identical tensors) are drawn once, as
``layers.[0-31] x32``, so a large model's tree stays a screenful. Needs no torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from rich.text import Text

from torchkeep._facts import TensorInfo, numel
from torchkeep.weights.render import Node, human_bytes, human_count, shape_text


@dataclass
class Prefix:
    """A module prefix: the tensors directly under it and its child prefixes."""

    name: str
    path: str
    tensors: list[TensorInfo] = field(default_factory=list)
    children: dict[str, Prefix] = field(default_factory=dict)
    num_params: int = 0
    nbytes: int = 0
    type: str = ""  # the class recorded in a whole-model pickle, when known

    def signature(self) -> tuple[object, ...]:
        """Relative names, shapes and dtypes of everything below: equal for repeated blocks."""
        start = len(self.path) + 1 if self.path else 0
        return tuple((t.name[start:], t.shape, t.dtype) for t in self.all_tensors())

    def all_tensors(self) -> Iterable[TensorInfo]:
        """The tensors under this prefix, depth first."""
        yield from self.tensors
        for child in self.children.values():
            yield from child.all_tensors()


def build_tree(
    tensors: Iterable[TensorInfo], root_name: str = "", classes: dict[str, str] | None = None
) -> Prefix:
    """Group tensors by their dotted module prefix, naming each module's class when known."""
    known = classes or {}
    root = Prefix(root_name, "", type=known.get("", ""))
    for info in tensors:
        parts = info.name.split(".")
        node = root
        node.num_params += numel(info.shape)
        node.nbytes += info.nbytes
        for depth, part in enumerate(parts[:-1]):
            if part not in node.children:
                path = ".".join(parts[: depth + 1])
                node.children[part] = Prefix(part, path, type=known.get(path, ""))
            node = node.children[part]
            node.num_params += numel(info.shape)
            node.nbytes += info.nbytes
        node.tensors.append(info)
    return root


def _runs(children: list[Prefix]) -> list[list[Prefix]]:
    """Consecutive integer-named siblings with identical contents, grouped."""
    runs: list[list[Prefix]] = []
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


def _label(name: str, node: Prefix, main_dtype: str, *, each: int = 1, width: int = 0) -> Text:
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


def tree_node(root: Prefix, main_dtype: str, depth: int | None = None) -> Node:
    """The tree of ``root`` as a render node; below ``depth`` levels only counts are shown."""

    def build(label: Text, node: Prefix, level: int) -> Node:
        if depth is not None and level >= depth:
            if node.children:
                label.append(f"  (+{len(node.children)} submodules)", style="dim")
            return Node(label)
        runs = [
            (run[0], run[0].name if len(run) == 1 else f"[{run[0].name}-{run[-1].name}]", len(run))
            for run in _runs(list(node.children.values()))
        ]
        width = max((len(name) + (len(f" x{n}") if n > 1 else 0) for _, name, n in runs), default=0)
        children = [
            build(_label(name, first, main_dtype, each=count, width=width), first, level + 1)
            for first, name, count in runs
        ]
        return Node(label, children)

    return build(_label(root.name or "(root)", root, main_dtype), root, 0)


def tree_json(node: Prefix) -> dict[str, Any]:
    """The tree as nested dicts (every module, nothing collapsed)."""
    return {
        "name": node.path,
        "class": node.type or None,
        "params": node.num_params,
        "bytes": node.nbytes,
        "tensors": [t.name for t in node.tensors],
        "children": [tree_json(child) for child in node.children.values()],
    }
