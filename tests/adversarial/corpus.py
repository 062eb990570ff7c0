"""The hostile corpus: every case, its family, what a loader must answer, and how to build it.

The list of cases is static (pytest parametrises over it at collection time); ``build_corpus``
writes the files into a folder once per test session. Nothing here is a committed blob: every
byte comes from the assembler, from torch writing a tiny real object, or from zipfile.
"""

from __future__ import annotations

import bz2
import io
import json
import os
import pickle
import shutil
import struct
import sys
import threading
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import containers as C
from . import payloads, semantics
from .opcodes import Asm, finish

# What a verb must answer:
#   unsafe  -> UnsafeFileError                      (hostile content)
#   corrupt -> CorruptFileError                     (malformed content)
#   refuse  -> UnsafeFileError or CorruptFileError  (either reading is defensible)
#   typed   -> success, or any TorchkeepError       (legitimate, or not for this verb)
Expect = str

# Verbs whose refusal must have the exact class of the case's expectation; every other verb
# may answer with any TorchkeepError (a training-checkpoint loader that says "not a
# checkpoint" before looking at the pickle has still refused).
STRICT_VERBS = ("load_state_dict", "inspect", "load", "safe_pickle_load", "convert", "diff")
LIB_VERBS = (
    "load_state_dict",
    "inspect",
    "load",
    "load_model",
    "load_for_inference",
    "load_checkpoint",
    "manager_restore",
    "convert",
    "diff",
    "safe_pickle_load",
)
CLI_VERBS = ("inspect", "diff", "convert", "verify", "scan")
# The same verbs down other paths, expected to answer as their base verb does: a verified load
# (checksums hashed from the page cache), a convert into a torch zip (torch's writer fed one
# record at a time), a checkpoint read straight into a model's tensors.
VARIANTS = {
    "load_verify": "load",
    "convert_pt": "convert",
    "load_checkpoint_into": "load_checkpoint",
    "manager_restore_into": "manager_restore",
}


@dataclass(frozen=True)
class Case:
    """One hostile file or folder.

    Attributes:
        id: unique, used as the pytest id and the file name.
        family: codeexec / semantics / resources / zip / archive / record / folder / json.
        expect: see ``Expect``.
        layout: "pickle" (a plain pickle file), "file" (any other file), "folder", or
            "manager" (a step folder inside a CheckpointManager root).
        overrides: per-verb expectations that differ from ``expect``.
        heavy: slow or memory-hungry; run in the second lane with a longer deadline.
        timeout: seconds one verb may take before it counts as a hang.
        marker: the marker name its payload would create (default: the id).
        module: a module the file names that must never be imported.
        check: a value check applied when a verb succeeds ("bigendian").
        outside: a file outside the case's folder whose size must not leak into messages.
    """

    id: str
    family: str
    expect: Expect
    layout: str = "file"
    overrides: tuple[tuple[str, Expect], ...] = ()
    heavy: bool = False
    timeout: float = 30.0
    marker: str = ""
    module: str = ""
    check: str = ""
    only: tuple[str, ...] = ()

    @property
    def marker_name(self) -> str:
        return self.marker or self.id

    def expectation(self, verb: str) -> Expect:
        return dict(self.overrides).get(VARIANTS.get(verb, verb), self.expect)

    def verbs(self) -> tuple[str, ...]:
        if self.only:
            return self.only
        verbs = [v for v in LIB_VERBS if v != "safe_pickle_load" or self.layout == "pickle"]
        if self.layout != "manager":
            verbs.remove("manager_restore")
        verbs += [v for v, base in VARIANTS.items() if base in verbs]
        return tuple(verbs)


@dataclass
class Ctx:
    root: Path

    @property
    def markers(self) -> Path:
        return self.root / "markers"

    @property
    def cases(self) -> Path:
        return self.root / "cases"

    @property
    def scripts(self) -> Path:
        return self.root / "scripts"

    @property
    def modules(self) -> Path:
        return self.root / "modules"

    @property
    def outside(self) -> Path:
        return self.root / "outside"

    def marker(self, case: Case) -> str:
        return str(self.markers / case.marker_name)

    def module_name(self, case: Case) -> str:
        return "tk_adv_" + case.id.replace("-", "_")

    def env(self, case: Case) -> payloads.Env:
        name = self.module_name(case)
        marker = self.marker(case)
        (self.modules / f"{name}.py").write_text(
            f"open({marker!r}, 'w').close()\n\n\nclass Model:\n    pass\n"
        )
        return payloads.Env(
            marker=marker,
            scripts=self.scripts,
            modules=self.modules,
            module_name=name,
            torchscript=str(self.scripts / "setstate.ts"),
        )


Builder = Callable[[Ctx, Case], Path]
CASES: list[Case] = []
BUILDERS: dict[str, Builder] = {}


def _add(case: Case, builder: Builder) -> None:
    assert case.id not in BUILDERS, case.id
    CASES.append(case)
    BUILDERS[case.id] = builder


def _file(ctx: Ctx, case: Case, data: bytes, suffix: str) -> Path:
    path = ctx.cases / f"{case.id}{suffix}"
    path.write_bytes(data)
    return path


# ----------------------------------------------------------------------------- code execution
def _container(pickled: bytes, kind: str) -> tuple[bytes, str]:
    if kind == "pkl":
        return pickled, ".pkl"
    if kind == "zip":
        return C.torch_zip(pickled), ".pt"
    return C.legacy(pickled), ".pt"


def _codeexec(name: str, kind: str) -> Builder:
    def build(ctx: Ctx, case: Case) -> Path:
        data, suffix = _container(payloads.CODE_EXEC[name](ctx.env(case)), kind)
        return _file(ctx, case, data, suffix)

    return build


# Plain pickles of protocol 0 and 1 are not a format torchkeep sniffs; saying so is a refusal
# too. safe_pickle_load, which is handed the bytes, must still call them unsafe.
_OLD_PROTOCOLS = {"inst", "obj", "inst_allowlisted_name"}
_SNIFFING_VERBS = ("load_state_dict", "inspect", "load", "convert", "diff")
_NOT_SNIFFED = tuple((verb, "typed") for verb in _SNIFFING_VERBS)

for _name in payloads.CODE_EXEC:
    for _kind in ("pkl", "zip", "legacy"):
        _add(
            Case(
                f"codeexec-{_name}-{_kind}",
                "codeexec",
                "unsafe",
                layout="pickle" if _kind == "pkl" else "file",
                marker="torchscript-setstate" if _name == "torch_jit_load" else "",
                overrides=_NOT_SNIFFED if _kind == "pkl" and _name in _OLD_PROTOCOLS else (),
            ),
            _codeexec(_name, _kind),
        )

# PERSID with a text id: nothing to resolve it in a plain pickle; in torch files the id must
# be the tuple torch writes.
for _kind in ("pkl", "zip", "legacy"):
    _add(
        Case(
            f"malformed-persid_text-{_kind}",
            "codeexec",
            "refuse",
            "pickle" if _kind == "pkl" else "file",
            overrides=_NOT_SNIFFED if _kind == "pkl" else (),
        ),
        lambda ctx, case, k=_kind: _file(
            ctx, case, *_container(b"(Pos.system\n" + pickle.TUPLE1 + pickle.STOP, k)
        ),
    )


# ----------------------------------------------------------------------------- semantics
# Semantic attacks that need torch's storage records, or torch's legacy loader, say so here.
_LEGACY_ONLY = {"build_namespace_dump_patches"}
_SEGFAULT_PRONE = {"newobj_ex_tensor_cdata", "newobj_ex_storage_allocator"}


def _semantic(name: str, kind: str) -> Builder:
    def build(ctx: Ctx, case: Case) -> Path:
        pickled = semantics.SEMANTICS[name](ctx.marker(case))
        if kind == "pkl":
            return _file(ctx, case, pickled, ".pkl")
        if kind == "zip":
            return _file(ctx, case, C.torch_zip(pickled, {"0": semantics.FLOATS}), ".pt")
        uses_storage = C.storage_ref("0", "FloatStorage", 4) in pickled
        storages = [("0", semantics.FLOATS, 4)] if uses_storage else []
        return _file(ctx, case, C.legacy(pickled, storages), ".pt")

    return build


for _name in semantics.SEMANTICS:
    for _kind in ("legacy",) if _name in _LEGACY_ONLY else ("zip", "legacy", "pkl"):
        _add(
            Case(
                f"semantics-{_name}-{_kind}",
                "semantics",
                "unsafe"
                if _name.startswith(("build_", "newobj", "reduce_", "parameter_"))
                else "refuse",
                layout="pickle" if _kind == "pkl" else "file",
                heavy=_name in _SEGFAULT_PRONE,
            ),
            _semantic(_name, _kind),
        )


# ----------------------------------------------------------------------------- resources
def _nested(opener: bytes, n: int, closer: bytes, key: bool = False) -> bytes:
    asm = Asm(2)
    for _ in range(n):
        asm.raw(opener)
        if key:
            asm.str("k")
    asm.raw(opener)
    asm.raw(closer * n)
    return finish(asm)


def _nested_tuples(n: int) -> bytes:
    return finish(Asm(2).raw(pickle.EMPTY_TUPLE).raw(pickle.TUPLE1 * n))


def _many_opcodes(n: int) -> bytes:
    return Asm(2).raw(pickle.EMPTY_LIST).raw((pickle.NONE + pickle.POP) * (n // 2)).stop().bytes()


def _dag_bomb(levels: int) -> bytes:
    # Each level is a dict holding the level below twice: 2**levels paths, few objects.
    asm = Asm(2).raw(pickle.EMPTY_DICT).str("weight")
    asm.raw(semantics._rebuild((4,), (1,)).bytes()).raw(pickle.SETITEM).put(0)
    for i in range(1, levels + 1):
        asm.raw(pickle.EMPTY_DICT).str("a").get(i - 1).str("b").get(i - 1)
        asm.raw(pickle.SETITEM + pickle.SETITEM).put(i).pop()
    return finish(asm.get(levels))


def _wide_dag(width: int) -> bytes:
    # One mapping of `width` plain entries, held under `width` keys of another: a few hundred
    # kilobytes that a walk without memory of what it has seen visits width**2 times.
    asm = Asm(2).raw(pickle.EMPTY_DICT).str("weight")
    asm.raw(semantics._rebuild((4,), (1,)).bytes()).raw(pickle.SETITEM)
    asm.str("config").raw(pickle.EMPTY_DICT).mark()
    for i in range(width):
        asm.str(f"k{i}").int(i)
    asm.raw(pickle.SETITEMS).put(0).pop().raw(pickle.EMPTY_DICT).mark()
    for i in range(width):
        asm.str(f"o{i}").get(0)
    return finish(asm.raw(pickle.SETITEMS + pickle.SETITEM))


RESOURCES: dict[str, tuple[Callable[[], bytes], Expect, bool]] = {
    # name: (pickle, expectation, heavy)
    "bytearray_1e11": (
        lambda: finish(Asm(2).call("builtins", "bytearray", 10**11)),
        "refuse",
        False,
    ),
    "bytes_1e11": (lambda: finish(Asm(2).call("builtins", "bytes", 10**11)), "refuse", False),
    "set_of_range_1e10": (
        lambda: finish(
            Asm(2)
            .global_("builtins", "set")
            .mark()
            .call("builtins", "range", 10**10)
            .raw(pickle.TUPLE)
            .reduce()
        ),
        "refuse",
        True,
    ),
    "ndarray_huge": (
        lambda: finish(Asm(2).call("numpy", "ndarray", (10**6, 10**6))),
        "refuse",
        False,
    ),
    "ndarray_uninitialised": (
        lambda: finish(Asm(2).call("numpy", "ndarray", (2048, 2048))),
        "refuse",
        False,
    ),
    "ndarray_reconstruct_huge_shape": (
        lambda: finish(
            Asm(2)
            .global_("numpy.core.multiarray", "_reconstruct")
            .mark()
            .global_("numpy", "ndarray")
            .value((0,))
            .binbytes(b"b")
            .raw(pickle.TUPLE)
            .reduce()
            .mark()
            .int(1)
            .value((10**6, 10**6))
            .global_("numpy", "dtype")
            .tuple("f8", False, True)
            .reduce()
            .bool(False)
            .binbytes(b"")
            .raw(pickle.TUPLE)
            .build()
        ),
        "refuse",
        False,
    ),
    "nested_lists_100k": (
        lambda: _nested(pickle.EMPTY_LIST, 100_000, pickle.APPEND),
        "refuse",
        False,
    ),
    "nested_dicts_100k": (
        lambda: _nested(pickle.EMPTY_DICT, 100_000, pickle.SETITEM, key=True),
        "refuse",
        False,
    ),
    "nested_tuples_100k": (lambda: _nested_tuples(100_000), "refuse", False),
    "memo_put_4g": (lambda: finish(Asm(2).raw(pickle.EMPTY_LIST).put(0xFFFFFFFF)), "typed", False),
    "memo_get_missing": (lambda: finish(Asm(2).get(0xFFFFFFF0)), "corrupt", False),
    "dag_bomb_60": (lambda: _dag_bomb(60), "typed", True),
    "wide_dag_30000": (lambda: _wide_dag(30_000), "typed", True),
}

for _name, (_fn, _expect, _heavy) in RESOURCES.items():
    for _kind in ("pkl", "zip"):
        _add(
            Case(
                f"resources-{_name}-{_kind}",
                "resources",
                _expect,
                layout="pickle" if _kind == "pkl" else "file",
                heavy=_heavy,
            ),
            lambda ctx, case, f=_fn, k=_kind: _file(
                ctx,
                case,
                f() if k == "pkl" else C.torch_zip(f(), {"0": semantics.FLOATS}),
                ".pkl" if k == "pkl" else ".pt",
            ),
        )

_add(
    Case(
        "resources-opcodes_40m-pkl",
        "resources",
        "refuse",
        layout="pickle",
        heavy=True,
        timeout=60,
        only=("safe_pickle_load", "load_state_dict"),
    ),
    lambda ctx, case: _file(ctx, case, _many_opcodes(40_000_000), ".pkl"),
)

# Compressed long before the corpus needs it: bz2 releases the GIL.
_BOMB: dict[str, bytes] = {}


def _compress_bomb() -> None:
    compressor = bz2.BZ2Compressor(9)
    parts = [compressor.compress(b"\x80\x02N")]
    chunk = b"\x00" * (1 << 24)
    parts += [compressor.compress(chunk) for _ in range(128)]  # 2 GiB of zeros
    parts.append(compressor.flush())
    _BOMB["data"] = b"".join(parts)


def _zip_bomb(ctx: Ctx, case: Case) -> Path:
    # zipfile cannot stream a precomputed bz2 body, so the local header and central
    # directory are written by hand around it.
    body = _BOMB["data"]
    name = b"archive/data.pkl"
    size = 3 + (1 << 31)
    import zlib

    crc = 0
    crc = zlib.crc32(b"\x80\x02N", crc)
    zero = b"\x00" * (1 << 24)
    for _ in range(128):
        crc = zlib.crc32(zero, crc)
    out = io.BytesIO()
    local = struct.pack(
        "<IHHHHHIIIHH", 0x04034B50, 46, 0, 12, 0, 0x21, crc, len(body), size, len(name), 0
    )
    out.write(local + name + body)
    central_at = out.tell()
    central = struct.pack(
        "<IHHHHHHIIIHHHHHII",
        0x02014B50,
        46,
        46,
        0,
        12,
        0,
        0x21,
        crc,
        len(body),
        size,
        len(name),
        0,
        0,
        0,
        0,
        0,
        0,
    )
    out.write(central + name)
    end = out.tell()
    out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, end - central_at, central_at, 0))
    return _file(ctx, case, out.getvalue(), ".pt")


_add(Case("resources-zip_bomb_bz2", "resources", "refuse", heavy=True, timeout=60), _zip_bomb)


def _state_zip(**kw: object) -> bytes:
    import torch

    return C.real_torch_bytes({"weight": torch.arange(4.0)}, **kw)  # type: ignore[arg-type]


def _recompressed(zip_bytes: bytes, member_suffix: str) -> bytes:
    src = zipfile.ZipFile(io.BytesIO(zip_bytes))
    members = [(i.filename, src.read(i.filename)) for i in src.infolist()]
    names = [n for n, _ in members if n.endswith(member_suffix)]
    return C.write_zip(members, compress={n: zipfile.ZIP_DEFLATED for n in names})


_add(
    Case("resources-deflated_data_record", "resources", "corrupt"),
    lambda ctx, case: _file(ctx, case, _recompressed(_state_zip(), "/data/0"), ".pt"),
)
_add(
    Case("resources-deflated_data_pkl", "resources", "typed"),
    lambda ctx, case: _file(ctx, case, _recompressed(_state_zip(), "/data.pkl"), ".pt"),
)


def _short_record(ctx: Ctx, case: Case) -> Path:
    pickled = _state_dict_pickle(numel=4)
    return _file(ctx, case, C.torch_zip(pickled, {"0": semantics.FLOATS[:8]}), ".pt")


def _state_dict_pickle(numel: int = 4, storage: str = "FloatStorage") -> bytes:
    asm = Asm(2).raw(pickle.EMPTY_DICT).str("weight")
    asm.raw(semantics._rebuild((numel,), (1,), numel=numel).bytes()).raw(pickle.SETITEM)
    return finish(asm)


_add(Case("resources-short_data_record", "resources", "corrupt"), _short_record)
_add(
    Case("resources-legacy_unfilled_storage", "resources", "corrupt"),
    lambda ctx, case: _file(
        ctx, case, C.legacy(_state_dict_pickle(), [("0", semantics.FLOATS, 4)], keys=[]), ".pt"
    ),
)
_add(
    Case("resources-legacy_numel_lies", "resources", "corrupt"),
    lambda ctx, case: _file(
        ctx, case, C.legacy(_state_dict_pickle(), [("0", semantics.FLOATS, 1 << 40)]), ".pt"
    ),
)
_add(
    Case("resources-legacy_short_storage", "resources", "corrupt"),
    lambda ctx, case: _file(
        ctx, case, C.legacy(_state_dict_pickle(), [("0", semantics.FLOATS, 4)])[:-6], ".pt"
    ),
)

BIG_ENDIAN_VALUES = (0.5, 1.5, -2.25, 1e30)


def _big_endian(ctx: Ctx, case: Case) -> Path:
    data = struct.pack(">4f", *BIG_ENDIAN_VALUES)
    return _file(ctx, case, C.torch_zip(_state_dict_pickle(), {"0": data}, byteorder="big"), ".pt")


_add(Case("resources-big_endian", "resources", "typed", check="bigendian"), _big_endian)


# ----------------------------------------------------------------------------- zip tricks
def _with_extra(name_of: Callable[[Ctx, Case], str]) -> Builder:
    def build(ctx: Ctx, case: Case) -> Path:
        members = C.zip_members(_state_dict_pickle(), {"0": semantics.FLOATS})
        members.append((name_of(ctx, case), b"written by extraction"))
        return _file(ctx, case, C.write_zip(members), ".pt")

    return build


_add(
    Case("zip-member_dotdot", "zip", "refuse"),
    _with_extra(lambda ctx, case: f"archive/../../{case.marker_name}"),
)
_add(Case("zip-member_absolute", "zip", "refuse"), _with_extra(lambda ctx, case: ctx.marker(case)))


def _duplicate(evil_first: bool) -> Builder:
    def build(ctx: Ctx, case: Case) -> Path:
        good = C.zip_members(_state_dict_pickle(), {"0": semantics.FLOATS})
        evil = ("archive/data.pkl", payloads.p_os_system(ctx.env(case)))
        members = [evil, *good] if evil_first else [*good, evil]
        return _file(ctx, case, C.write_zip(members), ".pt")

    return build


_add(Case("zip-duplicate_data_pkl_evil_last", "zip", "refuse"), _duplicate(False))
_add(Case("zip-duplicate_data_pkl_evil_first", "zip", "refuse"), _duplicate(True))


def _upper(ctx: Ctx, case: Case) -> Path:
    members = [
        ("archive/DATA.PKL" if n.endswith("data.pkl") else n, d)
        for n, d in C.zip_members(payloads.p_os_system(ctx.env(case)))
    ]
    return _file(ctx, case, C.write_zip(members), ".pt")


_add(Case("zip-upper_case_data_pkl", "zip", "refuse"), _upper)


def _two_prefixes(ctx: Ctx, case: Case) -> Path:
    good = C.zip_members(_state_dict_pickle(), {"0": semantics.FLOATS})
    evil = C.zip_members(payloads.p_os_system(ctx.env(case)), prefix="zzz")
    return _file(ctx, case, C.write_zip(good + evil), ".pt")


_add(Case("zip-two_archive_prefixes", "zip", "refuse"), _two_prefixes)

# ----------------------------------------------------------------------------- archives
TORCHSCRIPT_SOURCE = """
import torch


class SetState(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2))

    def forward(self, x):
        return x * self.w

    @torch.jit.export
    def __getstate__(self):
        return (self.w, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, bool]):
        self.w = state[0] + torch.from_file(MARKER, True, 2).sum() * 0
        self.training = state[1]
"""


def _build_torchscript(ctx: Ctx, marker: str, dest: Path) -> None:
    import importlib

    import torch

    name = "tk_adv_torchscript_" + Path(marker).name.replace("-", "_")
    (ctx.modules / f"{name}.py").write_text(TORCHSCRIPT_SOURCE.replace("MARKER", repr(marker)))
    sys.path.insert(0, str(ctx.modules))
    try:
        module = importlib.import_module(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.script(module.SetState()).save(str(dest))
    finally:
        sys.path.remove(str(ctx.modules))
        sys.modules.pop(name, None)


LOADS_MODELS = (("load_model", "unsafe"), ("load_for_inference", "unsafe"))

_add(
    Case(
        "archive-torchscript_setstate",
        "archive",
        "typed",
        marker="torchscript-setstate",
        overrides=LOADS_MODELS,
    ),
    lambda ctx, case: Path(shutil.copy(ctx.scripts / "setstate.ts", ctx.cases / f"{case.id}.pt")),
)


def _pt2(
    mutate: Callable[[Ctx, Case, list[tuple[str, bytes]]], list[tuple[str, bytes]]],
) -> Builder:
    def build(ctx: Ctx, case: Case) -> Path:
        src = zipfile.ZipFile(ctx.scripts / "tiny.pt2")
        members = [(i.filename, src.read(i.filename)) for i in src.infolist()]
        return _file(ctx, case, C.write_zip(mutate(ctx, case, members)), ".pt2")

    return build


def _evil_zip(ctx: Ctx, case: Case) -> bytes:
    return C.torch_zip(payloads.p_os_system(ctx.env(case)))


def _replace(
    suffix: str, evil: Callable[[Ctx, Case], bytes]
) -> Callable[..., list[tuple[str, bytes]]]:
    def mutate(ctx: Ctx, case: Case, members: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        return [(n, evil(ctx, case) if n.endswith(suffix) else d) for n, d in members]

    return mutate


def _weights_use_pickle(
    ctx: Ctx, case: Case, members: list[tuple[str, bytes]]
) -> list[tuple[str, bytes]]:
    out = []
    for name, data in members:
        if name.endswith("model_weights_config.json"):
            config = json.loads(data)
            for meta in config["config"].values():
                meta["use_pickle"] = True
            data = json.dumps(config).encode()
        elif "/data/weights/weight_" in name:
            data = _evil_zip(ctx, case)
        out.append((name, data))
    return out


def _constant_pickle(
    ctx: Ctx, case: Case, members: list[tuple[str, bytes]]
) -> list[tuple[str, bytes]]:
    out = []
    for name, data in members:
        if name.endswith("model_constants_config.json"):
            prefix = name.rpartition("/")[0]
            data = json.dumps(
                {"config": {"c": {"path_name": "custom_obj_0", "use_pickle": True}}}
            ).encode()
            out.append((f"{prefix}/custom_obj_0", _evil_zip(ctx, case)))
        out.append((name, data))
    return out


def _extra(name: str) -> Callable[..., list[tuple[str, bytes]]]:
    def mutate(ctx: Ctx, case: Case, members: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        prefix = members[0][0].split("/")[0]
        return [*members, (name.format(prefix=prefix), _evil_zip(ctx, case))]

    return mutate


def _legacy_layout(
    ctx: Ctx, case: Case, members: list[tuple[str, bytes]]
) -> list[tuple[str, bytes]]:
    evil = _evil_zip(ctx, case)
    return [
        ("serialized_exported_program.json", b"{}"),
        ("serialized_state_dict.pt", evil),
        ("serialized_constants.pt", evil),
        ("serialized_example_inputs.pt", evil),
        ("version", b"1.0"),
    ]


for _name, _mutate in {
    "sample_inputs": _replace("/sample_inputs/model.pt", _evil_zip),
    "weights_use_pickle": _weights_use_pickle,
    "custom_obj_constant": _constant_pickle,
    "upper_sample_inputs": _extra("{prefix}/data/SAMPLE_INPUTS/model.pt"),
    "root_sample_inputs": _extra("sample_inputs/model.pt"),
    "extra_pickle_member": _extra("{prefix}/data/payload.pkl"),
    "legacy_serialized_layout": _legacy_layout,
}.items():
    _add(
        Case(f"archive-pt2_{_name}", "archive", "typed", overrides=LOADS_MODELS),
        _pt2(_mutate),
    )


# ----------------------------------------------------------------------------- save_model
def _record_file(ctx: Ctx, case: Case, record: object, *, raw: str | None = None) -> Path:
    import torch

    from torchkeep import save

    ctx.env(case)  # writes the marker module
    path = ctx.cases / f"{case.id}.safetensors"
    value = raw if raw is not None else json.dumps(record)
    save({"weight": torch.ones(2, 2)}, path, metadata={"torchkeep.model": value})
    return path


def _record_class(spec: Callable[[Ctx, Case], str]) -> Builder:
    return lambda ctx, case: _record_file(
        ctx, case, {"class": spec(ctx, case), "init": {}, "version": 1}
    )


for _name, _spec in {
    "marker_module": lambda ctx, case: f"{ctx.module_name(case)}:Model",
    "marker_module_dotted": lambda ctx, case: f"{ctx.module_name(case)}:Model.__init__",
    "os_system": lambda ctx, case: "os:system",
    "builtins_exec": lambda ctx, case: "builtins:exec",
}.items():
    _add(
        Case(
            f"record-{_name}",
            "record",
            "typed",
            overrides=LOADS_MODELS,
            module="tk_adv_record_" + _name,
        ),
        _record_class(_spec),
    )


def _sharded_record(ctx: Ctx, case: Case) -> Path:
    import torch

    from torchkeep import save

    ctx.env(case)
    folder = ctx.cases / case.id
    record = json.dumps({"class": f"{ctx.module_name(case)}:Model", "init": {}, "version": 1})
    save(
        {"a": torch.ones(8), "b": torch.ones(8)},
        folder,
        max_shard_size=40,
        metadata={"torchkeep.model": record},
    )
    return folder


_add(
    Case(
        "record-sharded_marker_module",
        "record",
        "typed",
        "folder",
        overrides=LOADS_MODELS,
        module="tk_adv_record_sharded_marker_module",
    ),
    _sharded_record,
)


# ----------------------------------------------------------------------------- folders
def _native(ctx: Ctx, case: Case, mutate: Callable[[Path, dict], None]) -> Path:
    import torch

    from torchkeep import CheckpointManager

    run = ctx.cases / case.id
    CheckpointManager(run).save(1, model=torch.nn.Linear(2, 2), rng=False)
    step = next(p for p in run.iterdir() if p.is_dir())
    manifest_path = step / "checkpoint.json"
    manifest = json.loads(manifest_path.read_text())
    mutate(step, manifest)
    manifest_path.write_text(json.dumps(manifest))
    return step


def _outside_copy(ctx: Ctx, step: Path) -> Path:
    shard = next(step.glob("*.safetensors"))
    target = ctx.outside / f"outside-{step.parent.name}.safetensors"
    shutil.copy(shard, target)
    return target


def _native_relative(ctx: Ctx, case: Case) -> Path:
    def mutate(step: Path, manifest: dict) -> None:
        target = os.path.relpath(_outside_copy(ctx, step), step)
        for entry in manifest["tensors"].values():
            entry["file"] = target
        for shard in step.glob("*.safetensors"):
            shard.unlink()

    return _native(ctx, case, mutate)


def _native_absolute(ctx: Ctx, case: Case) -> Path:
    def mutate(step: Path, manifest: dict) -> None:
        target = str(_outside_copy(ctx, step))
        for entry in manifest["tensors"].values():
            entry["file"] = target
        for shard in step.glob("*.safetensors"):
            shard.unlink()

    return _native(ctx, case, mutate)


def _native_symlink(ctx: Ctx, case: Case) -> Path:
    def mutate(step: Path, manifest: dict) -> None:
        target = _outside_copy(ctx, step)
        for shard in step.glob("*.safetensors"):
            shard.unlink()
            shard.symlink_to(target)

    return _native(ctx, case, mutate)


def _native_objects(ctx: Ctx, case: Case) -> Path:
    env = ctx.env(case)

    def mutate(step: Path, manifest: dict) -> None:
        import xxhash

        data = payloads.p_os_system(env)
        (step / "objects.pkl").write_bytes(data)
        manifest["objects"] = {
            "file": "objects.pkl",
            "paths": ["extra"],
            "bytes": len(data),
            "xxh3": xxhash.xxh3_64_hexdigest(data),
        }

    return _native(ctx, case, mutate)


def _dcp(ctx: Ctx, case: Case, mutate: Callable[[Path], None]) -> Path:
    import torch
    import torch.distributed.checkpoint as dcp

    folder = ctx.cases / case.id
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"weight": torch.arange(4.0)}, checkpoint_id=str(folder), no_dist=True)
    mutate(folder)
    return folder


def _dcp_evil_metadata(ctx: Ctx, case: Case) -> Path:
    env = ctx.env(case)
    return _dcp(ctx, case, lambda f: (f / ".metadata").write_bytes(payloads.p_os_system(env)))


def _dcp_relative(absolute: bool) -> Builder:
    def build(ctx: Ctx, case: Case) -> Path:
        def mutate(folder: Path) -> None:
            meta = pickle.loads((folder / ".metadata").read_bytes())  # our own file
            for info in meta.storage_data.values():
                data = folder / info.relative_path
                target = ctx.outside / f"outside-{case.id}.distcp"
                shutil.move(data, target)
                info.relative_path = str(target) if absolute else os.path.relpath(target, folder)
            (folder / ".metadata").write_bytes(pickle.dumps(meta, protocol=2))

        return _dcp(ctx, case, mutate)

    return build


def _sharded(mutate: Callable[[Ctx, Case, Path, dict], None]) -> Builder:
    def build(ctx: Ctx, case: Case) -> Path:
        import torch

        from torchkeep import save

        folder = ctx.cases / case.id
        save({"a": torch.ones(8), "b": torch.ones(8)}, folder, max_shard_size=40)
        index_path = next(folder.glob("*.index.json"))
        index = json.loads(index_path.read_text())
        mutate(ctx, case, folder, index)
        index_path.write_text(json.dumps(index))
        return folder

    return build


def _index_outside(absolute: bool) -> Callable[[Ctx, Case, Path, dict], None]:
    def mutate(ctx: Ctx, case: Case, folder: Path, index: dict) -> None:
        moved: dict[str, str] = {}
        for name, shard in index["weight_map"].items():
            if shard not in moved:
                target = ctx.outside / f"outside-{case.id}-{shard}"
                shutil.move(folder / shard, target)
                moved[shard] = str(target) if absolute else os.path.relpath(target, folder)
            index["weight_map"][name] = moved[shard]

    return mutate


def _index_to_index(ctx: Ctx, case: Case, folder: Path, index: dict) -> None:
    (folder / "other.index.json").write_text(json.dumps(index))
    for name in index["weight_map"]:
        index["weight_map"][name] = "other.index.json"


for _id, _builder, _layout in (
    ("native_manifest_relative", _native_relative, "manager"),
    ("native_manifest_absolute", _native_absolute, "manager"),
    ("native_symlinked_shard", _native_symlink, "manager"),
    ("native_pickled_objects", _native_objects, "manager"),
    ("dcp_code_exec_metadata", _dcp_evil_metadata, "folder"),
    ("dcp_metadata_relative", _dcp_relative(False), "folder"),
    ("dcp_metadata_absolute", _dcp_relative(True), "folder"),
    ("index_relative_shards", _sharded(_index_outside(False)), "folder"),
    ("index_absolute_shards", _sharded(_index_outside(True)), "folder"),
    ("index_to_index", _sharded(_index_to_index), "folder"),
):
    _add(
        Case(
            f"folder-{_id}",
            "folder",
            "refuse"
            if _id == "index_to_index"
            else "typed"
            if _id == "native_pickled_objects"
            else "unsafe",
            layout=_layout,
            # Weights can be read without the pickled side objects; restoring them cannot.
            overrides=(("load_checkpoint", "unsafe"), ("manager_restore", "unsafe"))
            if _id == "native_pickled_objects"
            else (),
            check="no_size_leak",
        ),
        _builder,
    )


# ----------------------------------------------------------------------------- deep JSON
DEEP = 100_000


def _deep_json() -> str:
    return '{"a": ' + "[" * DEEP + "]" * DEEP + "}"


def _deep_safetensors(ctx: Ctx, case: Case) -> Path:
    header = _deep_json().encode()
    return _file(ctx, case, struct.pack("<Q", len(header)) + header, ".safetensors")


def _deep_index(ctx: Ctx, case: Case, folder: Path, index: dict) -> None:
    pass


def _deep_index_folder(ctx: Ctx, case: Case) -> Path:
    folder = _sharded(_deep_index)(ctx, case)
    next(folder.glob("*.index.json")).write_text(_deep_json())
    return folder


def _deep_manifest(ctx: Ctx, case: Case) -> Path:
    step = _native(ctx, case, lambda step, manifest: None)
    (step / "checkpoint.json").write_text(_deep_json())
    return step


_add(Case("json-deep_safetensors_header", "json", "corrupt"), _deep_safetensors)
_add(Case("json-deep_index", "json", "corrupt", "folder"), _deep_index_folder)
_add(Case("json-deep_checkpoint_json", "json", "corrupt", "manager"), _deep_manifest)
_add(
    Case(
        "json-deep_model_record",
        "json",
        "typed",
        overrides=(("load_model", "corrupt"), ("load_for_inference", "corrupt")),
    ),
    lambda ctx, case: _record_file(ctx, case, None, raw=_deep_json()),
)


# ----------------------------------------------------------------------------- building
@dataclass
class Built:
    """A built corpus: where everything is, and each case's path."""

    root: str
    paths: dict[str, str] = field(default_factory=dict)
    reference: str = ""
    sizes: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def build_corpus(root: Path) -> Built:
    """Write every case under ``root``; returns where each one is."""
    import torch

    ctx = Ctx(root)
    for folder in (ctx.markers, ctx.cases, ctx.scripts, ctx.modules, ctx.outside):
        folder.mkdir(parents=True, exist_ok=True)
    bomb = threading.Thread(target=_compress_bomb)
    bomb.start()
    _build_torchscript(ctx, str(ctx.markers / "torchscript-setstate"), ctx.scripts / "setstate.ts")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(torch.nn.Linear(2, 2), (torch.ones(1, 2),))
        torch.export.save(program, str(ctx.scripts / "tiny.pt2"))
    from torchkeep import save

    built = Built(str(root), reference=str(root / "reference.safetensors"))
    save({"weight": torch.arange(4.0)}, built.reference)
    bomb.join()
    for case in CASES:
        built.paths[case.id] = str(BUILDERS[case.id](ctx, case))
    built.sizes = {p.name: p.stat().st_size for p in ctx.outside.iterdir()}
    return built
