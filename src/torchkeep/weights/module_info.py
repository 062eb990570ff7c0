"""What a live ``nn.Module`` holds: its tree, parameters, buffers, devices and gradients.

The counterpart of :class:`~torchkeep.CheckpointInfo` for a model in memory, so the same
questions (how many parameters, which are frozen, where they live, which have gradients) are
answered the same way for a file and for a model. Nothing is copied: only sizes and, for
gradients that exist, their norms are computed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from rich.text import Text

from torchkeep._facts import numel
from torchkeep._tensors import dtype_name
from torchkeep.weights.render import (
    Block,
    Columns,
    Heading,
    Line,
    Node,
    Pairs,
    Rendered,
    human_bytes,
    human_count,
    number,
    shape_text,
)


@dataclass(frozen=True)
class ParameterInfo:
    """One parameter or buffer of a module.

    Attributes:
        name: its name in ``state_dict()`` terms (``"encoder.0.weight"``).
        shape: its shape.
        dtype: its dtype (``"float32"``).
        device: where it lives (``"cpu"``, ``"cuda:0"``, ``"meta"``).
        nbytes: bytes of data.
        is_buffer: a buffer (running statistics, ...) rather than a parameter.
        trainable: ``requires_grad`` (always False for buffers).
        has_grad: ``.grad`` is set.
        grad_norm: the L2 norm of ``.grad`` (computed in float32), when it is set.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    device: str
    nbytes: int
    is_buffer: bool = False
    trainable: bool = False
    has_grad: bool = False
    grad_norm: float | None = None

    @property
    def numel(self) -> int:
        """Elements it holds."""
        return numel(self.shape)


@dataclass(frozen=True)
class ModuleNode:
    """One module of the tree, with totals over everything below it.

    Attributes:
        name: its path from the root (``""`` for the root, ``"encoder.0"``, ...).
        type: its class name (``"Linear"``).
        extra: its ``extra_repr()`` (``"in_features=16, out_features=3, bias=True"``).
        num_params: parameter elements in it and below (each shared parameter counted once).
        trainable_params: of those, elements with ``requires_grad``.
        children: its direct submodules.
    """

    name: str
    type: str
    extra: str
    num_params: int
    trainable_params: int
    children: tuple[ModuleNode, ...] = ()


@dataclass(frozen=True, repr=False)
class ModuleInfo(Rendered):
    """A live module, described.

    ``print(info)`` shows the summary line, then the module tree with trainable and frozen
    counts, devices, dtypes and gradient norms; in a notebook it displays as a table and a
    tree; ``repr(info)`` is one line.

    Attributes:
        type: the class name of the module described (inside any DataParallel, DDP or
            ``torch.compile`` wrapper, which are listed in ``wrappers``).
        wrappers: class names of the wrappers removed, outermost first.
        tree: the module tree.
        parameters: every parameter, once each (tied weights appear under their first name).
        buffers: every buffer.
        training: the module's ``training`` flag.
    """

    type: str
    wrappers: tuple[str, ...]
    tree: ModuleNode
    parameters: tuple[ParameterInfo, ...]
    buffers: tuple[ParameterInfo, ...]
    training: bool

    @property
    def num_params(self) -> int:
        """Parameter elements (buffers excluded)."""
        return sum(p.numel for p in self.parameters)

    @property
    def trainable_params(self) -> int:
        """Parameter elements with ``requires_grad``."""
        return sum(p.numel for p in self.parameters if p.trainable)

    @property
    def frozen_params(self) -> int:
        """Parameter elements without ``requires_grad``."""
        return self.num_params - self.trainable_params

    @property
    def nbytes(self) -> int:
        """Bytes of parameters and buffers together."""
        return sum(p.nbytes for p in (*self.parameters, *self.buffers))

    @property
    def devices(self) -> dict[str, int]:
        """How many parameters and buffers live on each device."""
        return _count(p.device for p in (*self.parameters, *self.buffers))

    @property
    def dtypes(self) -> dict[str, int]:
        """How many parameters and buffers have each dtype."""
        return _count(p.dtype for p in (*self.parameters, *self.buffers))

    @property
    def grad_norm(self) -> float | None:
        """The global L2 norm over every gradient that is set (what clipping would see)."""
        norms = [p.grad_norm for p in self.parameters if p.grad_norm is not None]
        return sum(n * n for n in norms) ** 0.5 if norms else None

    def summary(self) -> str:
        """One line: type, parameter counts, devices and dtypes."""
        wrapped = "".join(f"{w}(" for w in self.wrappers) + self.type + ")" * len(self.wrappers)
        devices = ", ".join(sorted(self.devices)) or "no tensors"
        dtypes = ", ".join(sorted(self.dtypes)) or "-"
        with_grad = sum(1 for p in self.parameters if p.has_grad)
        return (
            f"{wrapped}: {self.num_params:,} parameters ({self.trainable_params:,} trainable, "
            f"{self.frozen_params:,} frozen), {len(self.buffers)} buffers, on {devices}, "
            f"{dtypes}, {with_grad}/{len(self.parameters)} with gradients, "
            f"{'training' if self.training else 'eval'} mode"
        )

    def blocks(self) -> list[Block]:
        """The description ``str()``, ``rich.print()`` and notebooks show."""
        norm = self.grad_norm
        rows: list[tuple[str, str | Text]] = [
            ("parameters", f"{human_count(self.num_params)} ({self.num_params:,})"),
            ("trainable", f"{self.trainable_params:,}"),
            ("frozen", f"{self.frozen_params:,}"),
            ("buffers", f"{len(self.buffers):,}"),
            ("data", f"{human_bytes(self.nbytes)} ({self.nbytes:,} bytes)"),
            ("devices", _counts(self.devices)),
            ("dtypes", _counts(self.dtypes)),
            ("grad norm", "-" if norm is None else f"{number(norm)} (global L2)"),
        ]
        table: list[list[str | Text]] = [
            [
                p.name,
                shape_text(p.shape),
                p.dtype,
                p.device,
                "buffer" if p.is_buffer else "trainable" if p.trainable else "frozen",
                number(p.grad_norm),
            ]
            for p in (*self.parameters, *self.buffers)
        ]
        return [
            Line(Text(self.summary(), style="bold")),
            Pairs(rows),
            Heading("Modules"),
            _tree(self.tree),
            Heading("Parameters and buffers"),
            Columns(table, header=["name", "shape", "dtype", "device", "kind", "grad norm"]),
        ]

    def __repr__(self) -> str:
        return f"<ModuleInfo {self.summary()}>"


def _counts(counts: dict[str, int]) -> str:
    return " · ".join(f"{k} ({v})" for k, v in sorted(counts.items())) or "-"


def _tree(node: ModuleNode) -> Node:
    label = Text(node.name.rsplit(".", 1)[-1], style="bold")
    label.append(f" ({node.type})" if node.name else node.type, style="green")
    frozen = node.num_params - node.trainable_params
    counts = f"  {human_count(node.num_params)} params"
    if frozen:
        counts += f" ({human_count(node.trainable_params)} trainable, {human_count(frozen)} frozen)"
    label.append(counts, style="dim")
    if node.extra:
        label.append(f"  {node.extra}", style="cyan")
    return Node(label, [_tree(child) for child in node.children])


def _count(values: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


def _tensor_info(name: str, tensor: torch.Tensor, *, is_buffer: bool) -> ParameterInfo:
    grad = None if is_buffer else tensor.grad
    grad_norm: float | None = None
    if grad is not None:
        values = grad.coalesce().values() if grad.is_sparse else grad
        grad_norm = float(torch.linalg.vector_norm(values.detach().float()))
    return ParameterInfo(
        name=name,
        shape=tuple(tensor.shape),
        dtype=dtype_name(tensor.dtype),
        device=str(tensor.device),
        nbytes=tensor.numel() * tensor.element_size(),
        is_buffer=is_buffer,
        trainable=bool(tensor.requires_grad) and not is_buffer,
        has_grad=grad is not None,
        grad_norm=grad_norm,
    )


def _node(name: str, module: torch.nn.Module) -> ModuleNode:
    params = list(module.parameters())  # deduplicated: tied weights count once
    children = tuple(
        _node(f"{name}.{child_name}" if name else child_name, child)
        for child_name, child in module.named_children()
    )
    return ModuleNode(
        name=name,
        type=type(module).__name__,
        extra=module.extra_repr(),
        num_params=sum(p.numel() for p in params),
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        children=children,
    )


def inspect_module(module: torch.nn.Module) -> ModuleInfo:
    """Describe a live module: tree, parameters, buffers, devices, dtypes and gradients.

    Args:
        module: any ``nn.Module``; DataParallel, DistributedDataParallel and
            ``torch.compile`` wrappers are looked through (and named in ``wrappers``).

    Returns:
        A :class:`ModuleInfo`.

    Example:
        >>> info = inspect_module(model)
        >>> print(info)            # Net: 180 parameters (180 trainable, 0 frozen), ...
        >>> [p.name for p in info.parameters if not p.trainable]
    """
    wrappers: list[str] = []
    inner = module
    while True:
        unwrapped = unwrap_once(inner)
        if unwrapped is inner:
            break
        wrappers.append(type(inner).__name__)
        inner = unwrapped
    parameters = tuple(
        _tensor_info(name, p, is_buffer=False) for name, p in inner.named_parameters()
    )
    buffers = tuple(_tensor_info(name, b, is_buffer=True) for name, b in inner.named_buffers())
    return ModuleInfo(
        type=type(inner).__name__,
        wrappers=tuple(wrappers),
        tree=_node("", inner),
        parameters=parameters,
        buffers=buffers,
        training=inner.training,
    )


def unwrap_once(module: torch.nn.Module) -> torch.nn.Module:
    """The module one wrapper (DataParallel, DDP, ``torch.compile``) down, or ``module``."""
    if isinstance(module, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        inner: torch.nn.Module = module.module
        return inner
    orig = getattr(module, "_orig_mod", None)
    if isinstance(orig, torch.nn.Module):
        return orig
    return module


__all__ = ["ModuleInfo", "ModuleNode", "ParameterInfo", "inspect_module"]
