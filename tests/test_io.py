"""The I/O engine: parallel writes and reads, checksums, incremental saves, recycling, failures.

Small states are written by one thread with plain os.write; these tests shrink the engine's
thresholds and chunk sizes so that small tensors go through the parallel paths (several files
side by side, chunked tensors, grouped ``pwritev``, reads split across threads).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
import xxhash
from safetensors.torch import load_file
from torch import nn

import torchkeep as tk
import torchkeep.io.read as read_module
import torchkeep.io.write as write_module
from torchkeep._tensors import byte_view, xxh3
from torchkeep.errors import ChecksumError, CorruptFileError
from torchkeep.formats._base import WriteRequest
from torchkeep.formats.safetensors import build_header, file_plan
from torchkeep.formats.safetensors_header import CHECKSUMS_KEY
from torchkeep.io.read import ReadExtent, read_extents
from torchkeep.io.recycle import BIN_NAME
from torchkeep.io.write import write_files
from torchkeep.training.checkpoint import CheckpointWriteError, load_checkpoint, save_checkpoint
from torchkeep.training.manager import CheckpointManager
from torchkeep.training.shards import frozen_names, plan_shards


@pytest.fixture
def parallel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Send small states through the parallel paths, in small pieces."""
    monkeypatch.setattr(write_module, "SEQUENTIAL_BELOW", 0)
    monkeypatch.setattr(write_module, "CHUNK", 4096)
    monkeypatch.setattr(write_module, "GROUP", 2048)
    monkeypatch.setattr(write_module, "HASH_PIECE", 1000)
    monkeypatch.setattr(write_module, "IOV_MAX", 3)
    monkeypatch.setattr(read_module, "SEQUENTIAL_BELOW", 0)
    monkeypatch.setattr(read_module, "READ_CHUNK", 3000)
    monkeypatch.setattr(read_module, "IOV_MAX", 3)
    monkeypatch.setenv("TORCHKEEP_IO_THREADS", "3")


def mixed_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Large and small tensors of several dtypes, an empty one and odd sizes."""
    gen = torch.Generator().manual_seed(seed)
    state = {
        "embed.weight": torch.randn(300, 64, generator=gen),
        "block.weight": torch.randn(129, 33, generator=gen).to(torch.bfloat16),
        "block.bias": torch.randn(33, generator=gen),
        "half": torch.randn(77, 5, generator=gen).half(),
        "empty": torch.empty(0, 3),
        "steps": torch.arange(13),
        "mask": torch.rand(101, generator=gen) > 0.5,
    }
    for i in range(12):
        state[f"norm{i}.weight"] = torch.randn(i * 7 + 1, generator=gen)
    return state


def reference_bytes(state: dict[str, torch.Tensor]) -> bytes:
    """What the file must hold: the header with every checksum, then the data in order."""
    request = WriteRequest(state, order=tuple(state))
    header, order = build_header(request, {n: xxh3(t) for n, t in state.items()})
    return header + b"".join(bytes(byte_view(state[n])) for n in order)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a
    )


# ------------------------------------------------------------------------------- writes


@pytest.mark.parametrize("durable", [False, True])
def test_parallel_save_is_byte_identical_and_valid(
    tmp_path: Path, parallel: None, durable: bool
) -> None:
    state = mixed_state()
    path = tk.save(state, tmp_path / "model.safetensors", durable=durable)
    assert path.read_bytes() == reference_bytes(state)
    assert same(load_file(str(path)), state)
    assert same(tk.load_state_dict(path, verify=True), state)


def test_several_files_are_written_side_by_side(tmp_path: Path, parallel: None) -> None:
    states = [mixed_state(seed) for seed in range(4)]
    plans = [
        file_plan(WriteRequest(s, order=tuple(s)), tmp_path / f"f{i}.safetensors")
        for i, s in enumerate(states)
    ]
    written = write_files(plans, threads=3)
    for i, (state, sums) in enumerate(zip(states, written, strict=True)):
        assert sums == {name: xxh3(t) for name, t in state.items()}
        assert (tmp_path / f"f{i}.safetensors").read_bytes() == reference_bytes(state)


def test_sequential_and_parallel_paths_agree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = mixed_state()
    tk.save(state, tmp_path / "sequential.safetensors")
    monkeypatch.setattr(write_module, "SEQUENTIAL_BELOW", 0)
    monkeypatch.setattr(write_module, "CHUNK", 1000)
    tk.save(state, tmp_path / "parallel.safetensors")
    assert (tmp_path / "sequential.safetensors").read_bytes() == (
        tmp_path / "parallel.safetensors"
    ).read_bytes()


def test_checksums_are_recorded_and_checked(tmp_path: Path, parallel: None) -> None:
    state = mixed_state()
    path = tk.save(state, tmp_path / "model.safetensors")
    metadata = tk.inspect(path).metadata
    recorded = json.loads(metadata[CHECKSUMS_KEY])
    assert recorded == {n: xxhash.xxh3_64_hexdigest(bytes(byte_view(t))) for n, t in state.items()}
    data = bytearray(path.read_bytes())
    data[-50] ^= 0xFF  # a byte of the last tensor written
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError):
        tk.load_state_dict(path, verify=True)


def test_short_writes_are_finished(tmp_path: Path, parallel: None) -> None:
    real_pwrite, real_pwritev = os.pwrite, os.pwritev

    def pwrite(fd: int, data: Any, offset: int) -> int:
        return real_pwrite(fd, memoryview(data)[:777], offset)

    def pwritev(fd: int, buffers: list[Any], offset: int) -> int:
        return real_pwritev(fd, [memoryview(buffers[0])[:500]], offset)

    state = mixed_state()
    with mock.patch("os.pwrite", pwrite), mock.patch("os.pwritev", pwritev):
        path = tk.save(state, tmp_path / "model.safetensors")
    assert path.read_bytes() == reference_bytes(state)


def test_durable_writes_start_writeback_early(tmp_path: Path, parallel: None) -> None:
    monkey = mock.patch.object(write_module, "KICK", 5000)
    calls: list[tuple[int, int]] = []
    recorder = mock.patch.object(
        write_module, "start_writeback", lambda fd, offset, length: calls.append((offset, length))
    )
    state = {"big": torch.randn(10_000)}
    with monkey, recorder:
        tk.save(state, tmp_path / "scratch.safetensors", durable=False)
        assert calls == []
        tk.save(state, tmp_path / "model.safetensors", durable=True)
    assert calls, "no writeback was started"
    # Front to back, without gaps or overlaps.
    assert all(a[0] + a[1] == b[0] for a, b in itertools.pairwise(calls))


def test_recycled_files_are_overwritten_and_cut_to_length(tmp_path: Path, parallel: None) -> None:
    state = mixed_state()
    for size in (10, 10_000_000):
        path = tmp_path / f"recycled-{size}.safetensors"
        path.write_bytes(b"\xaa" * size)
        inode = path.stat().st_ino
        plan = file_plan(WriteRequest(state, order=tuple(state)), path, reuse=True)
        write_files([plan])
        assert path.stat().st_ino == inode
        assert path.read_bytes() == reference_bytes(state)


def test_data_starts_aligned_as_tensor_memory_is(tmp_path: Path) -> None:
    """The header is padded so the data starts 64-byte aligned; tensors whose sizes are
    multiples of 64 bytes come first within a dtype size, so each starts aligned too."""
    state = {
        "odd": torch.randn(5),  # 20 bytes
        "a.weight": torch.randn(64, 16),
        "b.weight": torch.randn(16),  # 64 bytes
        "c.half": torch.randn(96).half(),  # 192 bytes
        "d.half": torch.randn(3).half(),
        "flags": torch.ones(7, dtype=torch.bool),
    }
    path = tk.save(state, tmp_path / "model.safetensors")
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    assert (8 + length) % 64 == 0
    assert raw[8 + len(raw[8 : 8 + length].rstrip(b" ")) : 8 + length].strip(b" ") == b""
    header = json.loads(raw[8 : 8 + length])
    for name, tensor in state.items():
        start = header[name]["data_offsets"][0]
        if tensor.nbytes % 64 == 0:
            assert start % 64 == 0, name
    assert same(load_file(str(path)), state)


@pytest.mark.skipif(write_module.reserve_space is None, reason="no fallocate(2) here")
def test_new_files_reserve_their_blocks_first(tmp_path: Path, parallel: None) -> None:
    assert write_module.reserve_space is not None
    probe = tmp_path / "probe"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        write_module.reserve_space(fd, 1 << 20)
    finally:
        os.close(fd)
    assert probe.stat().st_size == 1 << 20
    assert probe.stat().st_blocks * 512 >= 1 << 20  # allocated, not a sparse file
    probe.unlink()

    reserved: list[int] = []
    real = write_module.reserve_space

    def spy(fd: int, length: int) -> None:
        reserved.append(length)
        real(fd, length)

    state = mixed_state()
    with mock.patch.object(write_module, "reserve_space", spy):
        path = tk.save(state, tmp_path / "model.safetensors")
    assert reserved == [path.stat().st_size]
    assert path.read_bytes() == reference_bytes(state)


# -------------------------------------------------------------------------------- reads


def test_parallel_load_into_a_model(tmp_path: Path, parallel: None) -> None:
    source = nn.Sequential(nn.Linear(40, 50), nn.LayerNorm(50), nn.Linear(50, 7))
    path = tk.save(source, tmp_path / "model.safetensors")
    target = nn.Sequential(nn.Linear(40, 50), nn.LayerNorm(50), nn.Linear(50, 7))
    tk.load(target, path)
    assert same(target.state_dict(), source.state_dict())


def test_sharded_folders_read_across_shards(tmp_path: Path, parallel: None) -> None:
    source = nn.Sequential(*(nn.Linear(30, 30) for _ in range(5)))
    folder = tk.save(source, tmp_path / "sharded", max_shard_size=4000)
    assert len(list(folder.glob("*.safetensors"))) > 3
    target = nn.Sequential(*(nn.Linear(30, 30) for _ in range(5)))
    tk.load(target, folder)
    assert same(target.state_dict(), source.state_dict())


def extents_for(path: Path, fd: int, state: dict[str, torch.Tensor]) -> list[ReadExtent]:
    header = json.loads(path.read_bytes()[8 : 8 + int.from_bytes(path.read_bytes()[:8], "little")])
    start = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    return [
        ReadExtent(fd, start + header[name]["data_offsets"][0], byte_view(dest), str(path), name)
        for name, dest in state.items()
    ]


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
def test_chunked_reads_split_across_threads(tmp_path: Path, parallel: None, threads: int) -> None:
    first, second = mixed_state(1), mixed_state(2)
    paths = [tk.save(s, tmp_path / f"{i}.safetensors") for i, s in enumerate((first, second))]
    targets = [{n: torch.zeros_like(t) for n, t in s.items()} for s in (first, second)]
    fds = [os.open(p, os.O_RDONLY) for p in paths]
    try:
        extents = [
            e for p, fd, t in zip(paths, fds, targets, strict=True) for e in extents_for(p, fd, t)
        ]
        read_extents(extents[::-1], threads=threads)  # any order in, file order out
    finally:
        for fd in fds:
            os.close(fd)
    assert same(targets[0], first) and same(targets[1], second)


def test_short_reads_are_finished(tmp_path: Path, parallel: None) -> None:
    state = mixed_state()
    path = tk.save(state, tmp_path / "model.safetensors")
    real = os.preadv

    def preadv(fd: int, buffers: list[Any], offset: int) -> int:
        return real(fd, [memoryview(buffers[0])[:333]], offset)

    target = {n: torch.zeros_like(t) for n, t in state.items()}
    fd = os.open(path, os.O_RDONLY)
    try:
        with mock.patch("os.preadv", preadv):
            read_extents(extents_for(path, fd, target))
    finally:
        os.close(fd)
    assert same(target, state)


def test_a_truncated_file_is_reported(tmp_path: Path, parallel: None) -> None:
    state = mixed_state()
    path = tk.save(state, tmp_path / "model.safetensors")
    target = {n: torch.zeros_like(t) for n, t in state.items()}
    extents = extents_for(path, 0, target)
    os.truncate(path, path.stat().st_size - 100)
    fd = os.open(path, os.O_RDONLY)
    try:
        extents = [ReadExtent(fd, e.offset, e.dest, e.path, e.name) for e in extents]
        with pytest.raises(CorruptFileError, match="truncated"):
            read_extents(extents)
    finally:
        os.close(fd)


def test_shared_destinations_keep_the_order_of_a_loop(tmp_path: Path, parallel: None) -> None:
    """Tied weights are one tensor under two names: the later name wins, as in a loop."""
    a, b = torch.full((500,), 1.0), torch.full((500,), 2.0)
    path = tk.save({"a": a, "b": b}, tmp_path / "two.safetensors")
    tied = torch.zeros(500)
    other = torch.zeros(700)
    fd = os.open(path, os.O_RDONLY)
    try:
        extents = extents_for(path, fd, {"a": tied, "b": tied})
        for order in (extents, extents[::-1]):
            read_extents([*order, ReadExtent(fd, order[0].offset, byte_view(other[:500]), "", "x")])
            assert torch.equal(tied, torch.full((500,), 2.0 if order is extents else 1.0))
    finally:
        os.close(fd)


def test_tied_model_loads(tmp_path: Path, parallel: None) -> None:
    model = nn.Sequential(nn.Embedding(50, 20), nn.Linear(20, 50, bias=False))
    model[1].weight = model[0].weight
    path = tk.save(model, tmp_path / "tied.safetensors")
    target = nn.Sequential(nn.Embedding(50, 20), nn.Linear(20, 50, bias=False))
    target[1].weight = target[0].weight
    tk.load(target, path)
    assert torch.equal(target[0].weight, model[0].weight)
    assert target[1].weight is target[0].weight


# -------------------------------------------------------------------- incremental saves


class FineTuned(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(*(nn.Linear(64, 64) for _ in range(6)))
        self.head = nn.Linear(64, 10)
        self.backbone.requires_grad_(False)


def train(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)


def shard_files(folder: Path) -> dict[str, os.stat_result]:
    return {p.name: p.stat() for p in sorted(folder.glob("*.safetensors"))}


def test_frozen_parameters_are_named_and_get_their_own_shards() -> None:
    model = FineTuned()
    model.head.weight.requires_grad_(False)
    state = {"model": model}
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    frozen = frozen_names(state, tensors)
    assert frozen == {n for n in tensors if not n.endswith("head.bias")}
    for shard, is_frozen in plan_shards(tensors, 10_000, frozen):
        assert all((name in frozen) == is_frozen for name in shard)


def test_unchanged_frozen_shards_are_hard_linked(tmp_path: Path, parallel: None) -> None:
    model = FineTuned()
    mgr = CheckpointManager(tmp_path, max_shard_size=20_000)
    mgr.save(1, model=model)
    train(model)
    mgr.save(2, model=model)
    first, second = shard_files(mgr.path(1)), shard_files(mgr.path(2))
    shared = {n for n, s in second.items() if any(s.st_ino == f.st_ino for f in first.values())}
    manifest = json.loads((mgr.path(2) / "checkpoint.json").read_text())
    frozen_files = {
        info["file"] for name, info in manifest["tensors"].items() if "backbone" in name
    }
    assert shared == frozen_files and len(shared) >= 3
    assert all(second[n].st_nlink == 2 for n in shared)
    head_file = manifest["tensors"]["model.head.weight"]["file"]
    assert second[head_file].st_nlink == 1

    # Self-contained: the older checkpoint can go, the newer one is whole.
    shutil.rmtree(mgr.path(1))
    target = FineTuned()
    load_checkpoint(mgr.path(2), model=target, verify=True)
    assert same(target.state_dict(), model.state_dict())


def test_a_changed_frozen_tensor_is_written_again(tmp_path: Path, parallel: None) -> None:
    model = FineTuned()
    mgr = CheckpointManager(tmp_path, max_shard_size=20_000)
    mgr.save(1, model=model)
    with torch.no_grad():
        model.backbone[3].weight[0, 0] += 1.0  # frozen, yet changed by hand
    mgr.save(2, model=model)
    manifest = json.loads((mgr.path(2) / "checkpoint.json").read_text())
    changed = manifest["tensors"]["model.backbone.3.weight"]["file"]
    assert shard_files(mgr.path(2))[changed].st_nlink == 1
    target = FineTuned()
    load_checkpoint(mgr.path(2), model=target, verify=True)
    assert same(target.state_dict(), model.state_dict())


def test_retention_keeps_linked_checkpoints_whole(tmp_path: Path, parallel: None) -> None:
    model = FineTuned()
    optimizer = torch.optim.Adam(p for p in model.parameters() if p.requires_grad)
    mgr = CheckpointManager(tmp_path, keep_last=1, max_shard_size=20_000, recycle=True)
    for step in range(1, 6):
        train(model)
        mgr.save(step, model=model, optimizer=optimizer, blocking=step % 2 == 0)
        mgr.wait()
        assert mgr.steps() == [step]
        target = FineTuned()
        load_checkpoint(mgr.path(step), model=target, verify=True)
        assert same(target.state_dict(), model.state_dict())
    mgr.close()


def test_incremental_save_writes_a_fraction(tmp_path: Path) -> None:
    model = FineTuned()
    mgr = CheckpointManager(tmp_path)
    written: list[int] = []
    real = write_module.write_files

    def counting(plans: Any, **kwargs: Any) -> Any:
        written.append(sum(p.size for p in plans))
        return real(plans, **kwargs)

    with (
        mock.patch.object(write_module, "write_files", counting),
        mock.patch("torchkeep.training.shards.write_files", counting),
    ):
        mgr.save(1, model=model, rng=False)
        train(model)
        mgr.save(2, model=model, rng=False)
    head = sum(p.nbytes for p in model.head.parameters())
    assert written[1] < head + 2000 < written[0] / 5


# ------------------------------------------------------------------------------ recycling


def test_retired_files_are_recycled(tmp_path: Path, parallel: None) -> None:
    weights = {"w": torch.randn(20_000), "v": torch.randn(30_000)}
    mgr = CheckpointManager(tmp_path, keep_last=1, max_shard_size=100_000, recycle=True)
    mgr.save(1, weights=weights)
    inodes = {s.st_ino for s in shard_files(mgr.path(1)).values()}
    mgr.save(2, weights=weights)  # step 1 goes to the bin
    assert {p.stat().st_ino for p in (tmp_path / BIN_NAME).iterdir()} == inodes
    weights["w"].add_(1)
    mgr.save(3, weights=weights)  # takes the bin's files
    assert {s.st_ino for s in shard_files(mgr.path(3)).values()} == inodes
    out = load_checkpoint(mgr.path(3), verify=True)
    assert same(out["weights"], weights)
    # Bounded: the bin holds the last retired checkpoint's files, no more.
    assert len(list((tmp_path / BIN_NAME).iterdir())) == len(inodes)


def test_recycling_is_off_by_default(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=1)
    for step in range(3):
        mgr.save(step, x=torch.randn(100))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002"]


# ------------------------------------------------------------------------------- failures


def failing_after(real: Callable[..., Any], calls: int) -> Callable[..., Any]:
    count = [0]

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        if count[0] > calls:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def full_disk_after(calls: int) -> Iterator[None]:
    """``os.pwrite`` and ``os.pwritev`` fail with ENOSPC after ``calls`` calls in all."""
    count = [0]

    def failing(real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any) -> Any:
            count[0] += 1
            if count[0] > calls:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(*args)

        return wrapper

    with mock.patch("os.pwrite", failing(os.pwrite)), mock.patch("os.pwritev", failing(os.pwritev)):
        yield


@pytest.mark.parametrize("call", ["pwrite", "pwritev"])
def test_a_failed_parallel_write_leaves_no_file(tmp_path: Path, parallel: None, call: str) -> None:
    plans = [
        file_plan(WriteRequest(mixed_state(i)), tmp_path / f"f{i}.safetensors") for i in range(3)
    ]
    failing = mock.patch(f"os.{call}", failing_after(getattr(os, call), 5))
    with failing, pytest.raises(OSError) as caught:
        write_files(plans)
    assert caught.value.errno == errno.ENOSPC
    assert str(caught.value.filename).startswith(str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_is_refused_before_any_byte_is_copied(tmp_path: Path, parallel: None) -> None:
    path = tk.save(mixed_state(1), tmp_path / "model.safetensors")
    before = path.read_bytes()

    def no_space(fd: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    writes = [0]
    real_pwritev = os.pwritev

    def counted(*args: Any) -> int:
        writes[0] += 1
        return real_pwritev(*args)

    refused = mock.patch.object(write_module, "reserve_space", no_space)
    with refused, mock.patch("os.pwritev", counted), pytest.raises(CheckpointWriteError) as caught:
        tk.save(mixed_state(2), path)
    assert caught.value.errno == errno.ENOSPC
    assert "untouched" in str(caught.value)
    assert writes[0] == 0
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_a_file_that_exists_is_not_removed(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs.safetensors"
    theirs.write_bytes(b"keep me")
    with pytest.raises(FileExistsError):
        write_files([file_plan(WriteRequest(mixed_state()), theirs)])
    assert theirs.read_bytes() == b"keep me"


def test_a_failed_parallel_save_keeps_the_previous_file(tmp_path: Path, parallel: None) -> None:
    path = tk.save(mixed_state(1), tmp_path / "model.safetensors")
    before = path.read_bytes()
    with mock.patch("os.pwrite", failing_after(os.pwrite, 3)), pytest.raises(OSError):
        tk.save(mixed_state(2), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


@pytest.mark.parametrize("recycle", [False, True])
def test_a_failed_parallel_checkpoint_commits_nothing(
    tmp_path: Path, parallel: None, recycle: bool
) -> None:
    model = FineTuned()
    mgr = CheckpointManager(tmp_path, keep_last=1, max_shard_size=20_000, recycle=recycle)
    mgr.save(1, model=model)
    mgr.save(2, model=model)
    train(model)
    # Linked frozen shards are not written: fail the writes of the others.
    with full_disk_after(1), pytest.raises(CheckpointWriteError, match="nothing was committed"):
        mgr.save(3, model=model)
    assert mgr.steps() == [2]
    hidden = {p.name for p in tmp_path.iterdir() if p.name.startswith(".")}
    assert hidden <= {BIN_NAME}
    target = FineTuned()
    load_checkpoint(mgr.path(2), model=target, verify=True)
    mgr.save(3, model=model)
    assert mgr.steps() == [3]


def test_save_checkpoint_links_nothing_without_a_manager(tmp_path: Path, parallel: None) -> None:
    model = FineTuned()
    save_checkpoint(tmp_path / "a", model=model)
    save_checkpoint(tmp_path / "b", model=model)
    assert all(s.st_nlink == 1 for s in shard_files(tmp_path / "b").values())


# ------------------------------------------------------------------------ async staging


def staged(mgr: CheckpointManager) -> Iterator[int]:
    return (t.data_ptr() for t in mgr._staging._buffers.values())


def test_async_saves_reuse_staging_buffers_and_blocking_saves_need_none(tmp_path: Path) -> None:
    model = nn.Linear(100, 100)
    mgr = CheckpointManager(tmp_path, keep_last=2)
    mgr.save(1, model=model)
    assert list(staged(mgr)) == []  # the caller waits: nothing to copy
    mgr.save(2, model=model, blocking=False)
    first = list(staged(mgr))
    mgr.save(3, model=model, blocking=False)
    assert list(staged(mgr)) == first and first
    mgr.close()


def test_one_shard_planner_groups_in_order_with_big_tensors_alone() -> None:
    from torchkeep._common import group_by_size

    sizes = [("a", 4), ("b", 4), ("c", 10), ("d", 1), ("e", 1)]
    assert group_by_size(sizes, 8) == [["a", "b"], ["c"], ["d", "e"]]
    assert group_by_size(sizes, None) == [["a", "b", "c", "d", "e"]]
    assert group_by_size([], 8) == []
