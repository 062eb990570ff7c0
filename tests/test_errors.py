"""Every error a public verb raises is a TorchkeepError that is also the nearest builtin.

Two halves: a static scan of the package for ``raise`` statements that raise a bare builtin
exception, and calls of the public verbs with bad arguments that check the error's type, its
builtin base (so ``except ValueError`` keeps working) and that its message says what to fix.
"""

from __future__ import annotations

import ast
import builtins
import re
import sys
import types
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import GOLDEN, Net

import torchkeep as tk
from torchkeep._device import check_device
from torchkeep.tools.convert import convert

SRC = Path(tk.__file__).parent

BUILTIN_ERRORS = frozenset(
    name
    for name, value in vars(builtins).items()
    if isinstance(value, type) and issubclass(value, BaseException)
)

# (file under src/torchkeep, function, exception): the only bare builtins the package may raise.
ALLOWED: frozenset[tuple[str, str, str]] = frozenset(
    {
        # An abstract method of the Source base class; every format implements it.
        ("formats/_base.py", "Source.get", "NotImplementedError"),
        # __getattr__ must raise AttributeError, or getattr() and hasattr() break on the
        # attribute dicts that trainers pickle hyperparameters in.
        ("safety/checks.py", "AttributeDict.__getattr__", "AttributeError"),
        # The package's own __getattr__ (modules that moved): the same protocol.
        ("__init__.py", "__getattr__", "AttributeError"),
        # A wrapper that reads like the loader it wraps: the same protocol.
        ("training/data.py", "ResumableLoader.__getattr__", "AttributeError"),
        # A write that makes no progress, reported as the OS reports a failed write, so it is
        # handled wherever any other OSError from os.write is (save_checkpoint turns both
        # into CheckpointWriteError).
        ("io/write.py", "write_all", "OSError"),
        ("io/write.py", "pwrite_all", "OSError"),
        # fallocate(2) finding no space, reported as the OS reports a full disk: the same.
        ("io/_sys.py", "_load_fallocate.reserve", "OSError"),
        # The swap of two folders fails as the OS reports it; atomic_dir, its only caller,
        # turns it into a CheckpointWriteError naming the path.
        ("storage/local.py", "exchange", "OSError"),
        # Invariants of torchkeep's own planning, like assert: no argument can reach them.
        ("io/write.py", "FilePlan.header", "AssertionError"),
        ("tools/convert.py", "_Writer.safetensors", "AssertionError"),
    }
)


def _raised_builtin(node: ast.Raise) -> str | None:
    """The builtin exception a ``raise`` names (``ValueError``, ``builtins.KeyError``), if any."""
    target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
    if isinstance(target, ast.Name) and target.id in BUILTIN_ERRORS:
        return target.id
    if (
        isinstance(target, ast.Attribute)
        and isinstance(target.value, ast.Name)
        and target.value.id == "builtins"
        and target.attr in BUILTIN_ERRORS
    ):
        return target.attr
    return None


class _RaiseFinder(ast.NodeVisitor):
    def __init__(self, file: str) -> None:
        self.file = file
        self.scope: list[str] = []
        self.found: dict[tuple[str, str, str], int] = {}

    def _enter(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _enter

    def visit_Raise(self, node: ast.Raise) -> None:
        name = _raised_builtin(node)
        if name is not None:
            key = (self.file, ".".join(self.scope) or "<module>", name)
            self.found.setdefault(key, node.lineno)
        self.generic_visit(node)


def builtin_raises() -> dict[tuple[str, str, str], int]:
    """Every ``(file, function, builtin)`` raised in the package, with its first line."""
    found: dict[tuple[str, str, str], int] = {}
    for path in sorted(SRC.rglob("*.py")):
        finder = _RaiseFinder(path.relative_to(SRC).as_posix())
        finder.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        found.update(finder.found)
    return found


def test_the_scan_sees_every_form_of_raise() -> None:
    source = (
        "def f():\n"
        "    raise ValueError('x')\n"
        "class C:\n"
        "    def g(self):\n"
        "        raise builtins.KeyError\n"
        "        raise InvalidArgumentError('fine')\n"
        "        raise exc\n"
    )
    finder = _RaiseFinder("m.py")
    finder.visit(ast.parse(source))
    assert set(finder.found) == {("m.py", "f", "ValueError"), ("m.py", "C.g", "KeyError")}


def test_no_public_code_raises_a_bare_builtin() -> None:
    found = builtin_raises()
    bare = sorted(set(found) - ALLOWED)
    assert not bare, (
        "raise a TorchkeepError subclass (see torchkeep.errors) instead:\n"
        + "\n".join(
            f"  src/torchkeep/{file}:{found[(file, func, name)]} in {func}: {name}"
            for file, func, name in bare
        )
    )


def test_the_allowlists_hold_nothing_stale() -> None:
    found = builtin_raises()
    stale = sorted(ALLOWED - set(found))
    assert not stale, "fixed or moved; remove from ALLOWED: " + repr(stale)


# ------------------------------------------------------------------------------ behaviour


CHECKPOINT = GOLDEN / "net_checkpoint.pt"  # entries: model_state_dict, optimizer_state_dict
WEIGHTS = GOLDEN / "net.safetensors"

Call = Callable[[Path], object]
Case = tuple[Call, type[tk.TorchkeepError], type[Exception], str]


def _closed_manager_save(tmp: Path) -> object:
    manager = tk.CheckpointManager(tmp / "run")
    manager.close()
    return manager.save(1, model=Net())


def _restore(which: object) -> Call:
    def call(tmp: Path) -> object:
        with tk.CheckpointManager(tmp / "run") as manager:
            manager.save(1, model=Net())
            return manager.restore(which)  # type: ignore[arg-type]

    return call


CASES: dict[str, Case] = {
    # unknown entry=
    "load-entry": (
        lambda tmp: tk.load(Net(), CHECKPOINT, entry="nope"),
        tk.EntryNotFoundError,
        KeyError,
        "no tensor dict 'nope'.*model_state_dict",
    ),
    "load_state_dict-entry": (
        lambda tmp: tk.load_state_dict(CHECKPOINT, entry="nope"),
        tk.EntryNotFoundError,
        KeyError,
        "net_checkpoint.pt.*'nope'",
    ),
    "inspect-entry": (
        lambda tmp: tk.inspect(CHECKPOINT, entry="nope"),
        tk.EntryNotFoundError,
        KeyError,
        "'nope'",
    ),
    "convert-entry": (
        lambda tmp: convert(CHECKPOINT, tmp / "out.safetensors", entry="nope"),
        tk.EntryNotFoundError,
        KeyError,
        "'nope'",
    ),
    # sizes
    "save-size-words": (
        lambda tmp: tk.save(Net(), tmp / "out", max_shard_size="lots"),
        tk.InvalidArgumentError,
        ValueError,
        "'lots'.*'500MB'",
    ),
    "save-size-negative": (
        lambda tmp: tk.save(Net(), tmp / "out", max_shard_size=-5),
        tk.InvalidArgumentError,
        ValueError,
        "-5",
    ),
    "save_checkpoint-size": (
        lambda tmp: tk.save_checkpoint(tmp / "ckpt", model=Net(), max_shard_size="huge"),
        tk.InvalidArgumentError,
        ValueError,
        "'huge'",
    ),
    "manager-size": (
        lambda tmp: tk.CheckpointManager(tmp / "run", max_shard_size="1 zillion"),
        tk.InvalidArgumentError,
        ValueError,
        "'1 zillion'",
    ),
    # suffixes and format names
    "save-suffix": (
        lambda tmp: tk.save(Net(), tmp / "weights.data"),
        tk.InvalidArgumentError,
        ValueError,
        r"suffix '\.data'.*format=",
    ),
    "save-format": (
        lambda tmp: tk.save(Net(), tmp / "w.pt", format="onnx"),
        tk.InvalidArgumentError,
        ValueError,
        "unknown format 'onnx'; choose one of safetensors",
    ),
    "save_model-suffix": (
        lambda tmp: tk.save_model(Net(), tmp / "net.pt"),
        tk.InvalidArgumentError,
        ValueError,
        r"\.safetensors.*net\.pt",
    ),
    "save_checkpoint-format": (
        lambda tmp: tk.save_checkpoint(tmp / "ckpt", format="zip", model=Net()),  # type: ignore[arg-type]
        tk.InvalidArgumentError,
        ValueError,
        "'zip'.*'native' or 'torch'",
    ),
    "save_checkpoint-suffix": (
        lambda tmp: tk.save_checkpoint(tmp / "ckpt.json", model=Net()),
        tk.InvalidArgumentError,
        ValueError,
        r"ckpt\.json.*'\.json'",
    ),
    "save_checkpoint-reserved-name": (
        lambda tmp: tk.save_checkpoint(tmp / "ckpt", __step=1),
        tk.InvalidArgumentError,
        ValueError,
        "'__step'",
    ),
    "export-suffix": (
        lambda tmp: tk.export(torch.nn.Linear(2, 2), torch.ones(1, 2), tmp / "m.zzz"),
        tk.InvalidArgumentError,
        ValueError,
        r"\.pt2",
    ),
    "export-format": (
        lambda tmp: tk.export(torch.nn.Linear(2, 2), torch.ones(1, 2), tmp / "m", format="tf"),
        tk.InvalidArgumentError,
        ValueError,
        "'tf'.*export, torchscript, onnx",
    ),
    "convert-dtype": (
        lambda tmp: convert(WEIGHTS, tmp / "out.safetensors", dtype="int8"),
        tk.InvalidArgumentError,
        ValueError,
        "'int8'.*floating point",
    ),
    "convert-onto-itself": (
        lambda tmp: convert(WEIGHTS, WEIGHTS),
        tk.InvalidArgumentError,
        ValueError,
        "is the input",
    ),
    "load_state_dict-sha256": (
        lambda tmp: tk.load_state_dict(WEIGHTS, sha256="not-hex"),
        tk.InvalidArgumentError,
        ValueError,
        "sha256=.*'not-hex'",
    ),
    "load_state_dict-dtype": (
        lambda tmp: tk.load_state_dict(WEIGHTS, dtype=torch.int8),
        tk.InvalidArgumentError,
        ValueError,
        "dtype=.*torch.int8",
    ),
    "load_for_inference-dtype": (
        lambda tmp: tk.load_for_inference(Net(), dtype=torch.int64),
        tk.InvalidArgumentError,
        ValueError,
        "dtype=.*torch.int64",
    ),
    "save-http": (
        lambda tmp: tk.save(Net(), "http://example.com/net.safetensors"),
        tk.InvalidArgumentError,
        ValueError,
        "HTTP URLs are read-only",
    ),
    "load_state_dict-unknown-url-scheme": (
        lambda tmp: tk.load_state_dict("nosuchscheme://bucket/net.safetensors"),
        tk.InvalidArgumentError,
        ValueError,
        "nosuchscheme",
    ),
    # rename rules
    "load-rename-collision": (
        lambda tmp: tk.load(Net(), WEIGHTS, rename={r"^.*$": "x"}),
        tk.InvalidArgumentError,
        ValueError,
        "rename rules map both",
    ),
    "load-rename-bad-regex": (
        lambda tmp: tk.load(Net(), WEIGHTS, rename={"(": "x"}),
        tk.InvalidArgumentError,
        ValueError,
        "regex",
    ),
    # the manager and its policies
    "manager-mode": (
        lambda tmp: tk.CheckpointManager(tmp / "run", mode="up"),  # type: ignore[arg-type]
        tk.InvalidArgumentError,
        ValueError,
        "'min'.*'max'.*'up'",
    ),
    "manager-keep-best-without-monitor": (
        lambda tmp: tk.CheckpointManager(tmp / "run", keep_best=1),
        tk.InvalidArgumentError,
        ValueError,
        "monitor=",
    ),
    "manager-policy-and-shortcut": (
        lambda tmp: tk.CheckpointManager(tmp / "run", keep_last=2, policy=tk.KeepLast(1)),
        tk.InvalidArgumentError,
        ValueError,
        "not both",
    ),
    "manager-best-without-monitor": (
        lambda tmp: tk.CheckpointManager(tmp / "run").best(),
        tk.InvalidArgumentError,
        ValueError,
        "monitor=",
    ),
    "manager-negative-step": (
        lambda tmp: tk.CheckpointManager(tmp / "run").save(-1, model=Net()),
        tk.InvalidArgumentError,
        ValueError,
        "non-negative.*-1",
    ),
    "manager-restore-which": (
        _restore("first"),
        tk.InvalidArgumentError,
        ValueError,
        "'latest', 'best' or a step.*'first'",
    ),
    "manager-closed": (_closed_manager_save, tk.ManagerClosedError, RuntimeError, "closed"),
    "keep-last-zero": (
        lambda tmp: tk.KeepLast(0),
        tk.InvalidArgumentError,
        ValueError,
        "positive integer, got 0",
    ),
    "keep-best-mode": (
        lambda tmp: tk.KeepBest("loss", "up"),  # type: ignore[arg-type]
        tk.InvalidArgumentError,
        ValueError,
        "'up'",
    ),
    "any-of-nothing": (lambda tmp: tk.AnyOf(), tk.InvalidArgumentError, ValueError, "at least"),
    "any-of-junk": (
        lambda tmp: tk.AnyOf(3),  # type: ignore[arg-type]
        tk.InvalidStateError,
        TypeError,
        "retention policies.*int",
    ),
    # swapped arguments and the wrong kind of object
    "load-swapped": (
        lambda tmp: tk.load(WEIGHTS, Net()),  # type: ignore[arg-type]
        tk.InvalidStateError,
        TypeError,
        "swapped",
    ),
    "load-not-a-module": (
        lambda tmp: tk.load({"fc.weight": torch.ones(1)}, WEIGHTS),  # type: ignore[arg-type]
        tk.InvalidStateError,
        TypeError,
        "nn.Module.*load_state_dict",
    ),
    "save-swapped": (
        lambda tmp: tk.save(tmp / "net.pt", Net()),  # type: ignore[arg-type]
        tk.InvalidStateError,
        TypeError,
        "swapped|path",
    ),
    "load_state_dict-not-a-path": (
        lambda tmp: tk.load_state_dict(5),  # type: ignore[arg-type]
        tk.InvalidStateError,
        TypeError,
        "int",
    ),
    "load-dtype-not-a-dtype": (
        lambda tmp: tk.load(Net(), WEIGHTS, dtype="float16"),  # type: ignore[arg-type]
        tk.InvalidStateError,
        TypeError,
        "dtype=.*'float16'",
    ),
    "load_model-module": (
        lambda tmp: tk.load_model(Net()),  # type: ignore[arg-type]
        tk.InvalidStateError,
        TypeError,
        r"torchkeep\.load\(model, path\)",
    ),
    "load_model-cls-instance": (
        lambda tmp: tk.load_model(WEIGHTS, cls=Net()),  # type: ignore[arg-type]
        tk.InvalidStateError,
        TypeError,
        "cls=Net",
    ),
    "load_for_inference-state-dict": (
        lambda tmp: tk.load_for_inference({"fc.weight": torch.ones(1)}),  # type: ignore[arg-type]
        tk.InvalidStateError,
        TypeError,
        "dict",
    ),
    "save_model-state-dict": (
        lambda tmp: tk.save_model({"w": torch.ones(1)}, tmp / "m.safetensors"),  # type: ignore[arg-type]
        tk.InvalidStateError,
        TypeError,
        r"nn\.Module.*torchkeep\.save\(state_dict",
    ),
    "record_init-function": (
        lambda tmp: tk.record_init(print),  # type: ignore[type-var]
        tk.InvalidStateError,
        TypeError,
        "nn.Module subclasses",
    ),
    "save_checkpoint-path-last": (
        lambda tmp: tk.save_checkpoint(Net(), model=Net()),  # type: ignore[arg-type]
        tk.InvalidStateError,
        TypeError,
        "path first",
    ),
    "load_checkpoint-not-a-path": (
        lambda tmp: tk.load_checkpoint(Net()),  # type: ignore[arg-type]
        tk.InvalidStateError,
        TypeError,
        "path first",
    ),
    "save_checkpoint-metric": (
        lambda tmp: tk.save_checkpoint(tmp / "ckpt", model=Net(), metrics={"acc": "high"}),
        tk.InvalidStateError,
        TypeError,
        "metric 'acc' must be a number",
    ),
    "manager-not-a-folder": (
        lambda tmp: tk.CheckpointManager(Net()),  # type: ignore[arg-type]
        tk.InvalidStateError,
        TypeError,
        "folder",
    ),
    "export-not-a-module": (
        lambda tmp: tk.export("model", torch.ones(1), tmp / "m.pt2"),  # type: ignore[arg-type]
        tk.InvalidStateError,
        TypeError,
        "nn.Module",
    ),
    "export-swapped": (
        lambda tmp: tk.export(torch.nn.Linear(2, 2), tmp / "m.pt2", torch.ones(1, 2)),  # type: ignore[arg-type]
        tk.InvalidStateError,
        TypeError,
        "swapped",
    ),
    # tensors a format cannot hold
    "save-sparse": (
        lambda tmp: tk.save({"s": torch.eye(3).to_sparse()}, tmp / "s.safetensors"),
        tk.UnsupportedTensorError,
        TypeError,
        "'s'.*to_dense",
    ),
    "save-dtype-safetensors-lacks": (
        lambda tmp: tk.save({"c": torch.zeros(2, dtype=torch.complex128)}, tmp / "c.safetensors"),
        tk.UnsupportedTensorError,
        TypeError,
        "'c'.*complex128.*safetensors.*cannot",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_arguments_raise_typed_errors(name: str, tmp_path: Path) -> None:
    call, typed, builtin, fragment = CASES[name]
    with pytest.raises(typed, match=fragment) as info:
        call(tmp_path)
    assert isinstance(info.value, tk.TorchkeepError)
    assert isinstance(info.value, builtin)


def test_a_refused_save_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(tk.InvalidArgumentError):
        tk.save(Net(), tmp_path / "w.data")
    with pytest.raises(tk.UnsupportedTensorError):
        tk.save({"s": torch.eye(2).to_sparse()}, tmp_path / "s.safetensors")
    with pytest.raises(tk.InvalidArgumentError):
        tk.save_checkpoint(tmp_path / "ckpt", format="zip", model=Net())  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_a_missing_allowed_global_is_an_import_error_naming_it(tmp_path: Path) -> None:
    gone = types.ModuleType("torchkeep_test_gone")

    class Gone:
        pass

    Gone.__module__, Gone.__qualname__ = gone.__name__, "Gone"
    gone.Gone = Gone  # type: ignore[attr-defined]
    path = tmp_path / "needs_gone.pt"
    sys.modules[gone.__name__] = gone
    try:
        torch.save({"w": torch.ones(2), "extra": Gone()}, path)
    finally:
        del sys.modules[gone.__name__]
    with pytest.raises(tk.ModelRebuildError, match="torchkeep_test_gone.Gone") as info:
        tk.load_state_dict(path, allow_globals=["torchkeep_test_gone.Gone"])
    assert isinstance(info.value, ImportError)
    with pytest.raises(tk.ModelRebuildError, match="torchkeep_test_gone") as info:
        tk.load_state_dict(path, trust=True)
    assert isinstance(info.value, ImportError)
    assert "needs_gone.pt" in str(info.value)


# -------------------------------------------------------------------------------- devices


def _absent(device: str) -> bool:
    """Whether this machine lacks ``device`` (the tests assert it is refused)."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        return True  # not a device name at all
    if parsed.type == "mps":
        return not torch.backends.mps.is_available()
    module = getattr(torch, parsed.type)
    if not module.is_available():
        return True
    return parsed.index is not None and parsed.index >= module.device_count()


DEVICES = ["mps", "xpu", "cuda", "cuda:7", "gpu", "CUDA", "cuda:-1"]


def _manager_restore(tmp: Path, device: str) -> object:
    with tk.CheckpointManager(tmp / "run") as manager:
        manager.save(1, model=Net())
        return manager.restore(model=Net(), device=device)


def _checkpoint(tmp: Path) -> Path:
    return tk.save_checkpoint(tmp / "ckpt", model=Net())


DEVICE_VERBS: dict[str, Callable[[Path, str], object]] = {
    "load": lambda tmp, d: tk.load(Net(), WEIGHTS, device=d),
    "load-assign": lambda tmp, d: tk.load(Net(), WEIGHTS, device=d, assign=True),
    "load_state_dict": lambda tmp, d: tk.load_state_dict(WEIGHTS, device=d),
    "load_state_dict-map": lambda tmp, d: tk.load_state_dict(
        GOLDEN / "cuda_saved.pt", device={"cuda:0": d}
    ),
    "load_checkpoint": lambda tmp, d: tk.load_checkpoint(_checkpoint(tmp), device=d),
    "load_model": lambda tmp, d: tk.load_model(GOLDEN / "whole_model.pt", device=d),
    "load_for_inference": lambda tmp, d: tk.load_for_inference(Net(), device=d),
    "restore": _manager_restore,
}


def _device_params() -> list[object]:
    params: list[object] = []
    for verb in DEVICE_VERBS:
        for device in DEVICES:
            marks = [pytest.mark.skipif(not _absent(device), reason=f"{device} is present")]
            params.append(pytest.param(verb, device, marks=marks, id=f"{verb}-{device}"))
    return params


@pytest.mark.parametrize(("verb", "device"), _device_params())
def test_an_unavailable_device_is_a_device_error(verb: str, device: str, tmp_path: Path) -> None:
    with pytest.raises(tk.DeviceError) as info:
        DEVICE_VERBS[verb](tmp_path, device)
    assert isinstance(info.value, RuntimeError)
    message = str(info.value)
    assert device in message or device.lower() in message
    assert re.search("not available|not a device|has [0-9]+ ", message), message
    assert "cpu" in message  # says what to use instead


@pytest.mark.parametrize("device", ["cpu", "cpu:0", "meta", None, torch.device("cpu")])
def test_usable_devices_pass_the_check(device: str | torch.device | None) -> None:
    parsed = check_device(device, "test")
    assert parsed.type in ("cpu", "meta")


def test_a_device_of_the_wrong_type_is_a_type_error() -> None:
    with pytest.raises(tk.InvalidStateError, match="float") as info:
        check_device(1.5, "load 'x.pt'")  # type: ignore[arg-type]
    assert isinstance(info.value, TypeError)
    with pytest.raises(tk.InvalidStateError):
        check_device(True, "load 'x.pt'")  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_index_past_the_last_device_names_those_present() -> None:
    count = torch.cuda.device_count()
    with pytest.raises(tk.DeviceError, match=f"has {count} CUDA device.*cuda:0"):
        check_device(f"cuda:{count}", "load 'x.pt'")
    assert check_device(f"cuda:{count - 1}", "load 'x.pt'").index == count - 1
