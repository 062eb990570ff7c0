"""torchkeep against torch.load(weights_only=True) on many generated pickles.

Whatever torch refuses, torchkeep refuses too (the one allowed difference: an unknown user
class may become an inert stub). Whatever both accept, they read the same values.
"""

from __future__ import annotations

import pickle
import random
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from adversarial.containers import replace_data_pkl
from adversarial.opcodes import Asm, finish

import torchkeep as tk
from torchkeep.errors import TorchkeepError, UnsafeFileError
from torchkeep.safety.stubs import StubObject
from torchkeep.safety.unpickle import safe_pickle_load

SAFE_GLOBALS = [
    ("collections", "OrderedDict"),
    ("collections", "Counter"),
    ("torch", "Size"),
    ("torch", "device"),
    ("torch", "float32"),
    ("torch", "int64"),
    ("torch", "bfloat16"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("builtins", "set"),
    ("builtins", "complex"),
    ("builtins", "bytearray"),
    ("torch", "Tensor"),
    ("torch.nn.parameter", "Parameter"),
    ("_codecs", "encode"),
]
DANGEROUS_GLOBALS = [
    ("os", "system"),
    ("posix", "system"),
    ("subprocess", "Popen"),
    ("subprocess", "check_output"),
    ("builtins", "eval"),
    ("builtins", "exec"),
    ("builtins", "getattr"),
    ("builtins", "__import__"),
    ("builtins", "open"),
    ("builtins", "compile"),
    ("runpy", "run_path"),
    ("importlib", "import_module"),
    ("pickle", "loads"),
    ("torch.storage", "_load_from_bytes"),
    ("torch", "load"),
    ("torch", "save"),
    ("torch.jit", "load"),
    ("numpy", "load"),
    ("functools", "partial"),
    ("operator", "attrgetter"),
    ("operator", "methodcaller"),
    ("shutil", "rmtree"),
    ("socket", "socket"),
    ("ctypes", "CDLL"),
    ("sys", "exit"),
    ("types", "FunctionType"),
    ("marshal", "loads"),
    ("codecs", "open"),
    ("webbrowser", "open"),
    ("torch", "os.system"),
    ("argparse", "_os.system"),
    ("collections", "OrderedDict.__init__"),
]
UNKNOWN_GLOBALS = [
    ("mypkg.models", "Net"),
    ("__main__", "Config"),
    ("trainer.callbacks", "EarlyStopping"),
    ("unknown_module_xyz", "Thing"),
    ("torch.nn.modules.linear", "Linear"),
    ("torch.optim.adam", "Adam"),
    ("numpy", "random"),
    ("torch.utils.data", "DataLoader"),
    ("collections", "namedtuple"),
    ("enum", "Enum"),
    ("dataclasses", "make_dataclass"),
    ("typing", "NamedTuple"),
]
ALL_GLOBALS = SAFE_GLOBALS + DANGEROUS_GLOBALS + UNKNOWN_GLOBALS
CASES = 300


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 3 else 5)
    if kind == 0:
        return rng.randrange(-(2**40), 2**40)
    if kind == 1:
        return rng.random()
    if kind == 2:
        return "".join(rng.choice("abc_.") for _ in range(rng.randrange(6)))
    if kind == 3:
        return None
    if kind == 4:
        dtype = rng.choice([torch.float32, torch.float16, torch.int64, torch.bfloat16, torch.bool])
        shape = [rng.randrange(4) for _ in range(rng.randrange(3))]
        return torch.randn(shape).to(dtype)
    if kind == 5:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 6:
        return tuple(_random_value(rng, depth + 1) for _ in range(rng.randrange(4)))
    if kind == 7:
        return {f"k{i}": _random_value(rng, depth + 1) for i in range(rng.randrange(4))}
    from collections import OrderedDict

    return OrderedDict((f"t{i}", torch.randn(2)) for i in range(rng.randrange(3)))


def _inject(rng: random.Random, data: bytes) -> tuple[bytes, tuple[str, str]]:
    """Call a chosen global on no arguments and keep the result beside the real object."""
    module, name = rng.choice(ALL_GLOBALS)
    proto = 4 if "." in name else 2
    asm = Asm(proto).raw(pickle.EMPTY_DICT).str("real")
    body = data[2:-1] if data[:1] == pickle.PROTO else data[:-1]
    asm.raw(body).raw(pickle.SETITEM).str("injected")
    how = rng.randrange(3)
    if how == 0:
        asm.global_(module, name)
    elif how == 1:
        asm.global_(module, name).tuple().reduce()
    else:
        asm.global_(module, name).mark().none().value({"a": 1}).raw(pickle.TUPLE).build()
    asm.raw(pickle.SETITEM)
    return finish(asm), (module, name)


def _generate(seed: int, tmp: Path) -> tuple[Path, bytes | None, tuple[str, str] | None]:
    rng = random.Random(seed)
    obj = {f"w{i}": _random_value(rng) for i in range(rng.randrange(1, 4))}
    path = tmp / f"case{seed}.pt"
    torch.save(obj, path)
    injected = None
    if rng.random() < 0.6:
        with __import__("zipfile").ZipFile(path) as archive:
            name = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
            data = archive.read(name)
        new, injected = _inject(rng, data)
        path.write_bytes(replace_data_pkl(path.read_bytes(), new))
    plain = None
    if not any(isinstance(v, torch.Tensor) for v in _flatten(obj)):
        plain = pickle.dumps(obj, protocol=2)
    return path, plain, injected


def _flatten(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [x for v in value.values() for x in _flatten(v)]
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _flatten(v)]
    return [value]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, float) and a != a:
        return b != b
    return bool(a == b) and type(a) is type(b)


def _torch_verdict(path: Path) -> tuple[str, Any]:
    """("refused", None), ("failed", None) for a malformed pickle, or ("ok", the object)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return "ok", torch.load(path, weights_only=True)
    except pickle.UnpicklingError:
        return "refused", None
    except Exception:
        return "failed", None


@pytest.mark.parametrize("seed", range(CASES))
def test_torchkeep_refuses_what_torch_refuses(tmp_path: Path, seed: int) -> None:
    marker = tmp_path / "MARKER"
    path, plain, injected = _generate(seed, tmp_path)
    verdict, expected = _torch_verdict(path)
    try:
        ours = safe_pickle_load(_data_pkl(path), path=str(path), stubs=True)
        raw_error = None
    except TorchkeepError as exc:
        ours, raw_error = None, exc
    try:
        state = tk.load_state_dict(path)
        tk_error = None
    except TorchkeepError as exc:
        state, tk_error = None, exc
    assert not marker.exists()
    if verdict == "failed":
        # torch tripped over the file (calling a dtype, say): torchkeep must refuse it, typed.
        assert raw_error is not None or injected in UNKNOWN_GLOBALS, injected
        assert tk_error is not None, injected
        return
    if verdict == "refused":
        if raw_error is None:
            # The one allowed difference: an unknown class became an inert stub.
            assert injected is not None and injected in UNKNOWN_GLOBALS, injected
            assert isinstance(ours["injected"], (StubObject, type)), type(ours["injected"])
        else:
            assert isinstance(raw_error, UnsafeFileError), (injected, raw_error)
        if tk_error is not None:
            assert isinstance(tk_error, TorchkeepError)
        return
    if raw_error is None:
        assert _same(expected, _with_real_tensors(ours, path)), injected
    if state is not None:
        for name, tensor in state.items():
            found = _lookup(expected, name)
            if isinstance(found, torch.Tensor):
                assert _same(found, tensor), name
    if plain is not None:
        plain_ours = safe_pickle_load(plain, path="plain.pkl")
        assert _same(pickle.loads(plain), plain_ours)


def _data_pkl(path: Path) -> bytes:
    import zipfile

    with zipfile.ZipFile(path) as archive:
        return archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))


def _with_real_tensors(value: Any, path: Path) -> Any:
    """The raw unpickler has no storages; compare through the file's own load instead."""
    return torch.load(path, weights_only=True) if _has_tensor(value) else value


def _has_tensor(value: Any) -> bool:
    return any(isinstance(v, torch.Tensor) or v is None for v in _flatten(value))


def _lookup(tree: Any, dotted: str) -> Any:
    node = tree
    for part in dotted.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node
