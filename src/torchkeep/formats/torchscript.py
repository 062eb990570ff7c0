"""TorchScript archives (``torch.jit.save``) read as weights, without running their code.

A TorchScript archive is a torch zip whose ``data.pkl`` pickles the module tree as objects of
classes named ``__torch__.*``; the classes themselves are Python-like source under ``code/``,
and ``constants.pkl`` sits beside ``data.pkl``. ``torch.jit.load`` compiles that source and
runs it (a module's ``__setstate__`` runs during the load). Here ``data.pkl`` runs on the
safe machine, every ``__torch__`` class becomes an inert stub holding its attributes, and the
source is only *read*: each class's ``__parameters__`` and ``__buffers__`` lists say which
tensor attributes ``state_dict()`` includes. Names come out as
``torch.jit.load(path).state_dict()`` gives them: parameters, then buffers (TorchScript keeps
non-persistent buffers there too), then submodules, in the archive's attribute order.
"""

from __future__ import annotations

import ast
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from torchkeep._facts import ModuleEntry, TensorInfo
from torchkeep._tensors import dtype_name, find_aliases
from torchkeep.errors import CorruptFileError, UnknownFormatError, UnsafeFileError
from torchkeep.formats._base import OpenOptions, Source, WriteRequest
from torchkeep.safety.rules import SafeRules
from torchkeep.safety.stubs import StubObject
from torchkeep.safety.torch_files import (
    ZIP_MAGIC,
    Target,
    ZipArchive,
    check_crcs,
    open_zip,
    read_member,
    read_zip,
)
from torchkeep.safety.unpickle import judge, unsafe_message

_ROOT = "__torch__"
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,200}")
_CLASS = re.compile(r"class ([A-Za-z_][A-Za-z0-9_]*)(?:\(([A-Za-z_][A-Za-z0-9_.]*)\))?:")
_LIST = re.compile(r"  (__parameters__|__buffers__) = (\[.*\])")
_SETSTATE = re.compile(r"  def __setstate__\(")
_MANGLE = re.compile(r"___torch_mangle_[0-9]+\.")
_MAX_LIST = 1 << 20
_MAX_DEPTH = 200
_MAX_MODULES = 1_000_000


def zip_names(path: Path) -> list[str] | None:
    """The member names of a zip file, or ``None`` when its directory cannot be read."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return None


def is_torchscript(names: list[str]) -> bool:
    """A ``constants.pkl`` member (any case): the mark of ``torch.jit.save`` archives."""
    return any(n.lower() == "constants.pkl" or n.lower().endswith("/constants.pkl") for n in names)


@dataclass(frozen=True)
class ModuleClass:
    """What a TorchScript module class's source declares."""

    parameters: tuple[str, ...]
    buffers: tuple[str, ...]
    custom_setstate: bool


class _Code:
    """The class declarations in an archive's ``code/`` folder, parsed (never run) on demand."""

    def __init__(self, zf: ZipArchive) -> None:
        self.zf = zf
        self.files: dict[str, dict[str, ModuleClass | None]] = {}

    def module_class(self, qualname: str) -> ModuleClass | None:
        """The declaration of ``qualname`` if it is a module class, else ``None``."""
        parts = qualname.split(".")
        if parts[0] != _ROOT or len(parts) < 2 or not all(_IDENT.fullmatch(p) for p in parts):
            return None
        source = "code/" + "/".join(parts[:-1]) + ".py"
        if source not in self.files:
            info = self.zf.find(source)
            self.files[source] = {} if info is None else self._parse(read_member(self.zf, info))
        return self.files[source].get(parts[-1])

    def _parse(self, data: bytes) -> dict[str, ModuleClass | None]:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorruptFileError(f"{self.zf.path!r}: TorchScript source is not UTF-8") from exc
        classes: dict[str, ModuleClass | None] = {}
        name: str | None = None
        lists: dict[str, tuple[str, ...]] = {}
        setstate = False

        def close() -> None:
            if name is not None and name in classes:
                if "__parameters__" not in lists or "__buffers__" not in lists:
                    raise CorruptFileError(
                        f"{self.zf.path!r}: TorchScript module class {name} does not declare "
                        "its __parameters__ and __buffers__"
                    )
                classes[name] = ModuleClass(lists["__parameters__"], lists["__buffers__"], setstate)

        for line in text.splitlines():
            if line[:1] not in ("", " "):
                close()
                name, lists, setstate = None, {}, False
                header = _CLASS.fullmatch(line)
                if header is not None:
                    name = header.group(1)
                    if header.group(2) == "Module":
                        classes[name] = None  # filled in by close()
                    else:
                        classes.setdefault(name, None)
                        name = None
                continue
            if name is None:
                continue
            found = _LIST.fullmatch(line)
            if found is not None:
                lists[found.group(1)] = self._names(found.group(2), name)
            elif _SETSTATE.match(line):
                setstate = True
        close()
        return classes

    def _names(self, text: str, cls: str) -> tuple[str, ...]:
        if len(text) > _MAX_LIST:
            raise CorruptFileError(f"{self.zf.path!r}: class {cls} declares too many attributes")
        try:
            value = ast.literal_eval(text)  # a list display of string literals; nothing runs
        except (ValueError, SyntaxError, MemoryError, RecursionError) as exc:
            raise CorruptFileError(
                f"{self.zf.path!r}: class {cls} has a malformed attribute list"
            ) from exc
        if not isinstance(value, list) or not all(type(v) is str for v in value):
            raise CorruptFileError(f"{self.zf.path!r}: class {cls} has a malformed attribute list")
        return tuple(value)


def _display(qualname: str) -> str:
    """``__torch__.torch.nn.modules.linear.___torch_mangle_3.Linear`` -> ``torch.nn...Linear``."""
    return _MANGLE.sub("", qualname.removeprefix(_ROOT + "."))


class _Walk:
    """The module tree under a root stub, named the way ``state_dict()`` names it."""

    def __init__(self, path: str, code: _Code) -> None:
        self.path = path
        self.code = code
        self.tensors: dict[str, torch.Tensor] = {}
        self.tree: list[ModuleEntry] = []
        self.visited = 0

    def module(self, obj: StubObject, name: str, depth: int, ancestors: tuple[int, ...]) -> int:
        """Collect ``obj``'s tensors under ``name``; return their element count."""
        self.visited += 1
        if depth > _MAX_DEPTH or self.visited > _MAX_MODULES:
            raise CorruptFileError(f"{self.path!r}: its module tree is too deep or too large")
        if id(obj) in ancestors:
            raise CorruptFileError(f"{self.path!r}: module {name or '(root)'} contains itself")
        where = name or "the root module"
        declared = self.code.module_class(obj.stub_qualname)
        if declared is None:
            raise CorruptFileError(
                f"{self.path!r}: {where} is of class {obj.stub_qualname}, which the archive's "
                "code/ folder does not declare as a module"
            )
        if declared.custom_setstate:
            raise UnsafeFileError(
                f"refusing to read {where} of {self.path!r}: its class "
                f"{_display(obj.stub_qualname)} restores its state with its own __setstate__ "
                "code, so its weights exist only after that code runs, which torchkeep never "
                "does. If you trust the file's author, run it with "
                "torchkeep.load_model(path, trust=True) and take model.state_dict().",
                path=self.path,
            )
        state = obj.__dict__
        if "_stub_state" in state:
            raise CorruptFileError(f"{self.path!r}: {where} has no attribute dict")
        entry = len(self.tree)
        self.tree.append(ModuleEntry(name, _display(obj.stub_qualname), 0, depth))
        total = 0
        prefix = f"{name}." if name else ""
        for kind in (declared.parameters, declared.buffers):
            wanted = set(kind)
            missing = wanted - state.keys()
            if missing:
                raise CorruptFileError(
                    f"{self.path!r}: {where} declares {sorted(missing)[0]!r} but does not hold it"
                )
            for attr, value in state.items():
                if attr not in wanted or value is None:
                    continue
                if not isinstance(value, torch.Tensor):
                    raise CorruptFileError(
                        f"{self.path!r}: {prefix}{attr} is a {type(value).__name__}, not a tensor"
                    )
                self.tensors[prefix + attr] = value.detach()
                total += value.numel()
        for attr, value in state.items():
            if isinstance(value, StubObject) and self.code.module_class(value.stub_qualname):
                total += self.module(value, prefix + attr, depth + 1, (*ancestors, id(obj)))
        self.tree[entry] = ModuleEntry(name, _display(obj.stub_qualname), total, depth)
        return total


class TorchScriptSource(Source):
    """The weights of a TorchScript archive: its module tree's parameters and buffers."""

    def __init__(self, path: Path, format: str, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__(str(path), format)
        self._tensors = tensors
        self._entries[""] = {
            name: TensorInfo(
                name, tuple(t.shape), dtype_name(t.dtype), t.numel() * t.element_size()
            )
            for name, t in tensors.items()
        }
        self._aliases[""] = find_aliases(tensors)

    def get(self, entry: str, name: str) -> torch.Tensor:
        return self._tensors[name]

    def verify(self, entry: str | None = None) -> None:
        check_crcs(self.path)


def target_for(options: OpenOptions) -> Target:
    """Where an archive's storages go for ``options`` (meta: shapes only)."""
    if options.meta:
        return Target.for_location("meta")
    mmap = options.mmap and options.map_location == "cpu"
    return Target.for_location(options.map_location, mmap=mmap)


class TorchScriptFormat:
    """``torch.jit.save`` archives (``.pt``, ``.ts``): their weights, never their code."""

    name: str = "torchscript"
    is_folder: bool = False

    def sniff(self, path: Path, head: bytes) -> bool:
        if not head.startswith(ZIP_MAGIC):
            return False
        names = zip_names(path)
        return names is not None and is_torchscript(names)

    def open(self, path: Path, options: OpenOptions) -> Source:
        label = str(path)
        zf = open_zip(label, "data.pkl")
        try:
            if zf.find("constants.pkl") is None:
                raise CorruptFileError(
                    f"{label!r} has a constants.pkl outside its top folder; a TorchScript "
                    "archive keeps it beside data.pkl"
                )
            if zf.find("archive_format") is not None:
                raise UnsafeFileError(
                    f"refusing {label!r}: it is laid out both as a TorchScript archive and as "
                    "a torch.export archive, so loaders could disagree about its contents",
                    path=label,
                )
            rules = SafeRules()
            root = read_zip(label, rules=rules, target=target_for(options), zf=zf)
            judge(label, rules, stubs=True)
            foreign = [q for q in rules.refused if not q.startswith(_ROOT + ".")]
            if foreign:
                raise UnsafeFileError(
                    unsafe_message(label, foreign), path=label, globals=tuple(foreign)
                )
            if not isinstance(root, StubObject):
                raise CorruptFileError(f"{label!r}: its data.pkl does not hold a module")
            walk = _Walk(label, _Code(zf))
            walk.module(root, "", 0, ())
        finally:
            zf.archive.close()
        source = TorchScriptSource(path, self.name, walk.tensors)
        source.module_trees[""] = walk.tree
        return source

    def write(self, request: WriteRequest, path: Path) -> None:
        raise UnknownFormatError(
            "torchkeep does not write TorchScript archives from weights; script the model and "
            "use torchkeep.export(model, example_inputs, 'model.ts')"
        )
