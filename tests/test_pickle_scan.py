"""Tests for torchkeep._pickle_scan: globals are listed and nothing is ever unpickled."""

from __future__ import annotations

import argparse
import collections
import io
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from torchkeep._pickle_scan import (
    GlobalRef,
    PickleScanError,
    scan_pickle_bytes,
    scan_pickle_stream,
    scan_torch_file,
)

PROTOCOLS = range(pickle.HIGHEST_PROTOCOL + 1)
UNRESOLVED = GlobalRef("?", "?")


class Point:
    """A class of this module, so the pickle must name the test module."""

    def __init__(self, x: int) -> None:
        self.x = x


class RunsCommand:
    """Pickles as a call to os.system; these tests only ever dump it."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (self.command,))


SYSTEM = GlobalRef(os.system.__module__, "system")  # "posix" on Linux and macOS


def ref(obj: type) -> GlobalRef:
    return GlobalRef(obj.__module__, obj.__qualname__)


def test_qualname_joins_module_and_name() -> None:
    assert GlobalRef("torch._utils", "_rebuild_tensor_v2").qualname == (
        "torch._utils._rebuild_tensor_v2"
    )


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_every_protocol_lists_globals_in_first_seen_order(protocol: int) -> None:
    obj = [
        collections.OrderedDict(a=1),
        argparse.Namespace(b=2),
        Point(3),
        collections.OrderedDict(c=4),  # repeated global is listed once
        "plain data",
    ]
    expected = [ref(collections.OrderedDict), ref(argparse.Namespace), ref(Point)]
    if protocol < 2:
        # Plain instances go through copyreg, under their Python 2 names.
        expected[1:1] = [GlobalRef("copy_reg", "_reconstructor")]
        expected[3:3] = [GlobalRef("__builtin__", "object")]
    assert scan_pickle_bytes(pickle.dumps(obj, protocol=protocol)) == expected


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_command_object_is_reported_and_not_run(protocol: int, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    data = pickle.dumps({"x": RunsCommand(f"touch {marker}")}, protocol=protocol)
    path = tmp_path / "evil.pkl"
    path.write_bytes(data)

    assert scan_pickle_bytes(data) == [SYSTEM]
    assert scan_torch_file(path) == [SYSTEM]
    with path.open("rb") as f:
        assert scan_pickle_stream(f) == [SYSTEM]
    assert not marker.exists()


def test_stack_global_operands_resolved_through_memo() -> None:
    # Protocol 4 memoizes strings: the second class reuses "collections" via
    # BINGET, and the repeated class is fetched from the memo as a whole.
    obj = [collections.OrderedDict, collections.defaultdict, collections.OrderedDict]
    data = pickle.dumps(obj, protocol=4)
    assert b"\x93" in data and b"h" in data  # STACK_GLOBAL and BINGET are used
    assert scan_pickle_bytes(data) == [ref(collections.OrderedDict), ref(collections.defaultdict)]


def _unicode(s: str) -> bytes:
    return b"\x8c" + bytes([len(s)]) + s.encode()  # SHORT_BINUNICODE


def test_memoize_indices_count_non_string_entries() -> None:
    data = b"".join(
        [
            b"\x80\x04]\x94",  # PROTO 4, EMPTY_LIST, MEMOIZE as 0 (not a string)
            _unicode("collections") + b"\x94",  # memo 1
            _unicode("OrderedDict") + b"\x94",  # memo 2
            _unicode("Counter") + b"\x94",  # memo 3
            b"0h\x01h\x03\x93",  # POP, BINGET 1, BINGET 3, STACK_GLOBAL
            b"0h\x01j\x02\x00\x00\x00\x93",  # POP, BINGET 1, LONG_BINGET 2, STACK_GLOBAL
            b"0.",
        ]
    )
    assert scan_pickle_bytes(data) == [
        GlobalRef("collections", "Counter"),
        GlobalRef("collections", "OrderedDict"),
    ]


def test_put_and_get_with_explicit_indices() -> None:
    # Protocol 0 text opcodes: PUT 7 / GET 7, and BINPUT / BINGET.
    data = (
        b"\x80\x04Vos\np7\n0"
        + _unicode("system")
        + b"q\x09"  # BINPUT 9
        + b"0g7\nh\x09\x93."
    )
    assert scan_pickle_bytes(data) == [GlobalRef("os", "system")]


def test_marked_items_are_popped_with_their_mark() -> None:
    data = b"".join(
        [
            b"\x80\x04" + _unicode("collections"),
            b"(" + _unicode("os") + _unicode("system") + b"t0",  # MARK, 2 strings, TUPLE, POP
            _unicode("OrderedDict") + b"\x93.",
        ]
    )
    assert scan_pickle_bytes(data) == [GlobalRef("collections", "OrderedDict")]


def test_python2_strings_and_dup_feed_stack_global() -> None:
    # STRING and SHORT_BINSTRING load as str; DUP copies the top of the stack.
    data = b"S'collections'\nU\x0bOrderedDict\x93" + b"0" + _unicode("abc") + b"2\x93."
    assert scan_pickle_bytes(data) == [
        GlobalRef("collections", "OrderedDict"),
        GlobalRef("abc", "abc"),
    ]


def test_non_ascii_python2_string_is_unresolved() -> None:
    # Its text depends on the encoding the loader passes to Unpickler.
    data = b"U\x02osU\x06syst\xe9m\x93."
    assert scan_pickle_bytes(data) == [UNRESOLVED]


def test_stack_global_from_non_strings_is_unresolved() -> None:
    # Module name produced by a call, not a literal: unknowable without running.
    data = b"\x80\x04cbuiltins\nstr\n" + _unicode("os") + b"\x85R" + _unicode("system") + b"\x93."
    assert scan_pickle_bytes(data) == [GlobalRef("builtins", "str"), UNRESOLVED]


def test_global_lines_are_taken_verbatim() -> None:
    # pickletools would show "o\x73" as "os" and split "a b c d" wrongly.
    data = b"co\\x73\nsystem\n0ca b\nc d\n0N."
    assert scan_pickle_bytes(data) == [GlobalRef("o\\x73", "system"), GlobalRef("a b", "c d")]


def test_extension_codes_are_unresolved() -> None:
    assert scan_pickle_bytes(b"\x80\x02\x82\x01.") == [UNRESOLVED]


def test_torch_zip_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "sd.pt"
    torch.save({"w": torch.ones(2)}, path)
    refs = scan_torch_file(path)
    assert GlobalRef("torch._utils", "_rebuild_tensor_v2") in refs
    # The storage class is a GLOBAL inside the persistent-id tuple.
    assert GlobalRef("torch", "FloatStorage") in refs
    # An empty OrderedDict stands in for the tensor's backward hooks.
    assert GlobalRef("collections", "OrderedDict") in refs


def test_torch_zip_ordered_dict_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "sd.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    assert scan_torch_file(path)[0] == GlobalRef("collections", "OrderedDict")


def test_whole_model_pickle(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2), path)
    refs = scan_torch_file(path)
    assert refs[0] == GlobalRef("torch.nn.modules.linear", "Linear")
    assert GlobalRef("torch._utils", "_rebuild_parameter") in refs


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torchscript_archive_scans_every_pkl_member(tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    with zipfile.ZipFile(path) as archive:
        assert any(n.endswith("/constants.pkl") for n in archive.namelist())
    # TorchScript mangles the module path when the class was scripted before in the process.
    assert any(
        ref.module.startswith("__torch__.torch.nn.modules.linear") and ref.name == "Linear"
        for ref in scan_torch_file(path)
    )


def test_legacy_format(tmp_path: Path) -> None:
    path = tmp_path / "legacy.pt"
    torch.save(
        {"model": torch.nn.Linear(2, 2).state_dict(), "args": argparse.Namespace(lr=0.1)},
        path,
        _use_new_zipfile_serialization=False,
    )
    assert path.read_bytes()[:2] != b"PK"
    refs = scan_torch_file(path)
    assert refs[0] == GlobalRef("collections", "OrderedDict")
    assert GlobalRef("torch._utils", "_rebuild_tensor_v2") in refs
    assert GlobalRef("torch", "FloatStorage") in refs
    assert ref(argparse.Namespace) in refs


def test_stream_stops_before_raw_bytes_after_legacy_pickles(tmp_path: Path) -> None:
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(3)}, path, _use_new_zipfile_serialization=False)
    with path.open("rb") as f:
        with_count = scan_pickle_stream(f, count=5)
        end_of_pickles = f.tell()
        f.seek(0)
        assert scan_pickle_stream(f) == with_count
        assert f.tell() == end_of_pickles
        assert end_of_pickles < path.stat().st_size


def test_stream_reads_exactly_count_pickles() -> None:
    f = io.BytesIO(pickle.dumps(Point(1)) + pickle.dumps(argparse.Namespace()))
    assert scan_pickle_stream(f, count=1) == [ref(Point)]
    assert scan_pickle_stream(f, count=1) == [ref(argparse.Namespace)]
    assert scan_pickle_stream(f) == []  # at end of file
    f.seek(0)
    with pytest.raises(PickleScanError):
        scan_pickle_stream(f, count=3)


def test_truncated_legacy_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(3)}, path, _use_new_zipfile_serialization=False)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[:200])  # inside the fourth pickle
    with pytest.raises(PickleScanError, match=r"cut\.pt"):
        scan_torch_file(cut)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_truncated_pickle_raises_with_offset(protocol: int, tmp_path: Path) -> None:
    data = pickle.dumps([collections.OrderedDict(a=1), Point(2)], protocol=protocol)
    for cut in (1, len(data) // 2, len(data) - 1):
        with pytest.raises(PickleScanError, match="byte offset") as info:
            scan_pickle_bytes(data[:cut])
        assert info.value.offset is not None and info.value.offset <= cut
    path = tmp_path / "cut.pkl"
    path.write_bytes(data[:-1])
    with pytest.raises(PickleScanError, match=r"cut\.pkl"):
        scan_torch_file(path)


def test_random_bytes_raise(tmp_path: Path) -> None:
    garbage = bytes(range(0xFF, 0x7F, -1)) * 4  # 0xff is no opcode
    with pytest.raises(PickleScanError):
        scan_pickle_bytes(garbage)
    path = tmp_path / "random.bin"
    path.write_bytes(garbage)
    with pytest.raises(PickleScanError, match=r"random\.bin"):
        scan_torch_file(path)


def test_empty_inputs_raise(tmp_path: Path) -> None:
    with pytest.raises(PickleScanError):
        scan_pickle_bytes(b"")
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(PickleScanError, match="empty"):
        scan_torch_file(path)


def test_zip_without_pkl_member_raises(tmp_path: Path) -> None:
    path = tmp_path / "notes.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes/readme.txt", "not a checkpoint")
    with pytest.raises(PickleScanError, match=r"no \.pkl member"):
        scan_torch_file(path)


def test_bad_pkl_member_names_member(tmp_path: Path) -> None:
    path = tmp_path / "bad.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("bad/data.pkl", b"\x80\x02}q\x00")
    with pytest.raises(PickleScanError, match=r"bad/data\.pkl"):
        scan_torch_file(path)


def test_truncated_zip_raises(tmp_path: Path) -> None:
    path = tmp_path / "sd.pt"
    torch.save({"w": torch.ones(2)}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(PickleScanError):
        scan_torch_file(path)


def test_large_state_dict_lists_each_global_once(tmp_path: Path) -> None:
    path = tmp_path / "big.pt"
    torch.save({f"layer{i}.weight": torch.zeros(1) for i in range(10_000)}, path)
    with zipfile.ZipFile(path) as archive:
        data = archive.read("big/data.pkl")
    refs = scan_pickle_bytes(data)
    assert GlobalRef("torch", "FloatStorage") in refs
    assert len(refs) == len(set(refs))
