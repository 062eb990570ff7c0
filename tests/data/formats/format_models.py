"""What the format-stability golden files were written from, and how their content is described.

Shared by ``generate.py`` (which writes the golden files and their manifest) and
``tests/test_format_stability.py`` (which reads them back). The files record this module's
name (``format_models``) for the class that ``save_model`` stored and the dataclass a
checkpoint holds, so the module keeps its name, and nothing here that an existing golden
folder was written from may change: classes, builders and :func:`describe` stay as they are.
A new format version that needs other objects adds new ones beside them.

:func:`describe` turns a value into JSON that says exactly what it is: every number with its
type, floats as their ``repr`` (so ``nan``, ``-0.0`` and the last bit count), tensors as dtype,
shape, layout and a SHA-256 of their bytes, containers with their type and order. Two values
are the same for these tests when their descriptions are equal.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MODEL_SEED = 1234
TRAIN_SEED = 5678
GENERATOR_SEED = 7
NUMPY_SEED = 11
# The global RNG states saved with a checkpoint are these seeds' states.
PYTHON_RNG_SEED = 21
NUMPY_RNG_SEED = 22
TORCH_RNG_SEED = 23


class TiedNet(nn.Module):
    """An embedding whose output head shares its weight, with an int buffer and a LayerNorm."""

    def __init__(self, vocab: int = 10, width: int = 4, hidden: tuple[int, ...] = (4,)) -> None:
        super().__init__()
        self.vocab = vocab
        self.width = width
        self.hidden = tuple(hidden)
        self.emb = nn.Embedding(vocab, width)
        layers: list[nn.Module] = []
        size = width
        for h in hidden:
            layers += [nn.Linear(size, h), nn.ReLU()]
            size = h
        layers.append(nn.Linear(size, width))
        self.body = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("positions", torch.arange(5, dtype=torch.int64))
        self.register_buffer("scratch", torch.zeros(3), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.body(self.emb(ids))))


TIED_INIT: dict[str, Any] = {"vocab": 12, "width": 6, "hidden": (8, 8)}


def tied_net(seed: int = MODEL_SEED) -> TiedNet:
    """The tied model of the weights files, its weights drawn from ``seed``."""
    torch.manual_seed(seed)
    return TiedNet(**TIED_INIT)


class Net(nn.Module):
    """The model of the training checkpoints: Linear, BatchNorm (with its counter), Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.bn = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


@dataclasses.dataclass
class Config:
    lr: float = 0.1
    layers: tuple[int, ...] = (2, 3)
    name: str = "base"
    tags: frozenset[str] = frozenset()


class Counter:
    """A user object with ``state_dict``/``load_state_dict`` (a "stateful" entry)."""

    def __init__(self) -> None:
        self.count = 0
        self.history: list[float] = []

    def tick(self, value: float) -> None:
        self.count += 1
        self.history.append(value)

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "history": list(self.history)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.count = int(state["count"])
        self.history = list(state["history"])


@dataclasses.dataclass
class Training:
    model: Net
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


def training(seed: int = MODEL_SEED) -> Training:
    """A model, an AdamW with two parameter groups and a StepLR, none of them trained yet."""
    torch.manual_seed(seed)
    model = Net()
    first = [*model.fc1.parameters(), *model.bn.parameters()]
    optimizer = torch.optim.AdamW(
        [{"params": first}, {"params": model.fc2.parameters(), "lr": 5e-3}],
        lr=1e-2,
        weight_decay=0.01,
    )
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return Training(model, optimizer, scheduler)


def train(state: Training, steps: int, seed: int = TRAIN_SEED) -> list[float]:
    """Run ``steps`` optimizer and scheduler steps on data drawn from ``seed``; the losses."""
    data = torch.Generator().manual_seed(seed)
    losses = []
    state.model.train()
    for _ in range(steps):
        x = torch.randn(6, 4, generator=data)
        y = torch.randint(0, 3, (6,), generator=data)
        loss = F.cross_entropy(state.model(x), y)
        state.optimizer.zero_grad()
        loss.backward()
        state.optimizer.step()
        state.scheduler.step()
        losses.append(float(loss.detach()))
    return losses


def generator() -> torch.Generator:
    """A torch generator seeded and drawn from (its state is no longer the seed's)."""
    g = torch.Generator().manual_seed(GENERATOR_SEED)
    torch.rand(10, generator=g)
    return g


def numpy_generator() -> np.random.Generator:
    """A numpy generator seeded and drawn from."""
    rng = np.random.default_rng(NUMPY_SEED)
    rng.random(10)
    return rng


def counter() -> Counter:
    made = Counter()
    for value in (0.5, 0.25, 0.125):
        made.tick(value)
    return made


def config() -> Config:
    return Config(lr=0.03, layers=(16, 8, 4), name="golden", tags=frozenset({"a", "b"}))


def args() -> argparse.Namespace:
    return argparse.Namespace(
        lr=0.01, epochs=3, sched=argparse.Namespace(name="step", gamma=0.5), dirs=["a", "b"]
    )


def special_tensors(*, jagged: bool) -> dict[str, torch.Tensor]:
    """Tensors of every kind a training checkpoint stores, small and drawn from a fixed seed."""
    g = torch.Generator().manual_seed(99)
    dense = torch.randn(4, 5, generator=g)
    dense[dense.abs() < 0.6] = 0
    x = torch.randn(3, 4, generator=g)
    tensors: dict[str, torch.Tensor] = {
        "sparse_coo": dense.to_sparse().coalesce(),
        "sparse_csr": dense.to_sparse_csr(),
        "quantized": torch.quantize_per_tensor(x, 0.05, 3, torch.quint8),
        "quantized_channel": torch.quantize_per_channel(
            x,
            torch.tensor([0.1, 0.05, 0.2], dtype=torch.float64),
            torch.tensor([0, 1, -1]),
            0,
            torch.qint8,
        ),
        "nested": torch.nested.nested_tensor(
            [torch.randn(2, 3, generator=g), torch.randn(4, 3, generator=g)]
        ),
        "complex128": torch.randn(3, dtype=torch.complex128, generator=g),
        "bfloat16": torch.randn(2, 3, generator=g).to(torch.bfloat16),
        "float8": torch.randn(4, generator=g).to(torch.float8_e4m3fn),
        "uint16": torch.arange(5).to(torch.uint16),
        "bool": torch.tensor([True, False, True]),
        "requires_grad": torch.randn(3, generator=g).requires_grad_(True),
        "transposed": torch.randn(3, 2, generator=g).t(),
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
    }
    if jagged:
        tensors["jagged"] = torch.nested.nested_tensor(
            [torch.randn(2, 3, generator=g), torch.randn(5, 3, generator=g)], layout=torch.jagged
        )
    return tensors


def plain_values(*, bytearrays: bool) -> dict[str, Any]:
    """Values of every kind a checkpoint stores besides tensors."""
    values: dict[str, Any] = {
        "none": None,
        "true": True,
        "int": -3,
        "big_int": 2**70 + 1,
        "float": 0.1,
        "floats": [math.nan, math.inf, -math.inf, -0.0, 1e-300, 2.5e300],
        "complex": complex(1.5, -2.0),
        "text": "ünïcode ✓",
        "bytes": b"\x00\xffbytes",
        "tuple": (1, "a", 2.5, None, (2, 3)),
        "set": {3, 1, 2},
        "frozenset": frozenset({"x", "y"}),
        "int_keys": {1: "one", 2: [1, 2], (3, 4): "tuple key"},
        "dtype": torch.bfloat16,
        "device": torch.device("cuda", 1),
        "cpu": torch.device("cpu"),
        "path": pathlib.Path("runs/exp1/config.yaml"),
        "empty_list": [],
        "empty_dict": {},
        "nested": {"a": {"b": {"c": [1, {"d": (4.0,)}]}}},
        "ndarray": np.arange(6, dtype=np.float32).reshape(2, 3),
        "ndarray_big_endian": np.arange(4, dtype=">i4"),
        "ndarray_int16": np.array([[-1, 2], [3, -4]], dtype=np.int16),
        "ndarray_complex128": np.array([1 + 2j, 3 - 4j]),
        "ndarray_bool": np.array([True, False]),
        "np_float32": np.float32(1.5),
        "np_float64_nan": np.float64(math.nan),
        "np_int64": np.int64(-7),
        "np_uint8": np.uint8(200),
        "np_bool": np.bool_(True),
    }
    if bytearrays:
        values["bytearray"] = bytearray(b"ba")
    return values


# ------------------------------------------------------------------------------ describe


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The bytes of a dense tensor in C order, as the platform (little-endian) holds them."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def float_text(value: float) -> str:
    return repr(float(value))


def describe_tensor(tensor: torch.Tensor) -> dict[str, Any]:
    """Dtype, shape, layout, requires_grad and the SHA-256 of the tensor's data."""
    out: dict[str, Any] = {
        "dtype": str(tensor.dtype).removeprefix("torch."),
        "requires_grad": bool(tensor.requires_grad),
    }
    t = tensor.detach()
    if t.is_nested:
        out["layout"] = "jagged" if t.layout == torch.jagged else "nested"
        out["items"] = [describe_tensor(item) for item in t.unbind()]
        return {"tensor": out}
    out["shape"] = list(t.shape)
    out["layout"] = str(t.layout).removeprefix("torch.")
    if t.layout == torch.sparse_coo:
        out["coalesced"] = bool(t.is_coalesced())
        out["indices"] = describe_tensor(t._indices())
        out["values"] = describe_tensor(t._values())
    elif t.layout in (torch.sparse_csr, torch.sparse_bsr):
        out["crow_indices"] = describe_tensor(t.crow_indices())
        out["col_indices"] = describe_tensor(t.col_indices())
        out["values"] = describe_tensor(t.values())
    elif t.layout in (torch.sparse_csc, torch.sparse_bsc):
        out["ccol_indices"] = describe_tensor(t.ccol_indices())
        out["row_indices"] = describe_tensor(t.row_indices())
        out["values"] = describe_tensor(t.values())
    elif t.is_quantized:
        out["qscheme"] = str(t.qscheme()).removeprefix("torch.")
        out["int_repr"] = describe_tensor(t.int_repr())
        if t.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            out["axis"] = int(t.q_per_channel_axis())
            out["scales"] = describe_tensor(t.q_per_channel_scales())
            out["zero_points"] = describe_tensor(t.q_per_channel_zero_points())
        else:
            out["scale"] = float_text(t.q_scale())
            out["zero_point"] = int(t.q_zero_point())
    else:
        out["sha256"] = sha256(tensor_bytes(t))
    return {"tensor": out}


def _sorted(items: list[Any]) -> list[Any]:
    return sorted(items, key=lambda d: json.dumps(d, sort_keys=True))


def describe(value: Any) -> Any:
    """An exact JSON description of ``value`` (see the module docstring).

    Raises:
        TypeError: a value of a type these tests do not store.
    """
    if value is None:
        return None
    kind = type(value)
    if kind is str:
        return value
    if kind is bool:
        return {"bool": value}
    if kind is int:
        return {"int": value}
    if kind is float:
        return {"float": float_text(value)}
    if kind is complex:
        return {"complex": [float_text(value.real), float_text(value.imag)]}
    if kind is bytes:
        return {"bytes": value.hex()}
    if kind is bytearray:
        return {"bytearray": bytes(value).hex()}
    if isinstance(value, torch.Tensor):
        return describe_tensor(value)
    if isinstance(value, np.ndarray):
        return {
            "ndarray": {
                "dtype": value.dtype.str,
                "shape": list(value.shape),
                "sha256": sha256(np.ascontiguousarray(value).tobytes()),
            }
        }
    if isinstance(value, np.generic):
        return {"numpy": value.dtype.str, "value": describe(value.item())}
    if isinstance(value, torch.dtype):
        return {"torch_dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"torch_device": str(value)}
    if isinstance(value, pathlib.PurePath):
        return {"path": value.as_posix()}
    if isinstance(value, argparse.Namespace):
        return {"namespace": describe(vars(value))}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return {"dataclass": f"{kind.__module__}:{kind.__qualname__}", "fields": describe(fields)}
    if kind is tuple:
        return {"tuple": [describe(v) for v in value]}
    if kind is list:
        return {"list": [describe(v) for v in value]}
    if kind is set:
        return {"set": _sorted([describe(v) for v in value])}
    if kind is frozenset:
        return {"frozenset": _sorted([describe(v) for v in value])}
    if isinstance(value, dict):
        return {"dict": [[describe(k), describe(v)] for k, v in value.items()]}
    raise TypeError(f"cannot describe a {kind.__module__}.{kind.__qualname__}")


def describe_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """``{name: tensor description}`` of a flat state dict, in its order."""
    return {name: describe_tensor(t) for name, t in tensors.items()}


def python_rng_state(state: tuple[Any, ...]) -> dict[str, Any]:
    """``random.getstate()`` described: version, SHA-256 of the internal words, gauss_next."""
    version, internal, gauss_next = state
    words = np.asarray(internal, dtype="<u8").tobytes()
    return {"version": version, "sha256": sha256(words), "gauss_next": describe(gauss_next)}


def numpy_rng_state(state: tuple[Any, ...]) -> dict[str, Any]:
    """``np.random.get_state()`` described: algorithm, SHA-256 of the key words, the rest."""
    algorithm, keys, pos, has_gauss, cached = state
    return {
        "algorithm": str(algorithm),
        "sha256": sha256(np.asarray(keys, dtype="<u4").tobytes()),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float_text(cached),
    }
