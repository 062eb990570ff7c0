"""Background saves by a forked writer: the state is snapshotted copy-on-write, not copied.

An asynchronous save must capture the state before it returns, because training changes the
tensors at once. Copying every tensor into staging buffers costs time proportional to the
state; ``fork()`` instead gives a child process the parent's memory as it is at that instant,
in time proportional to the page tables. The child writes the tensor bytes and nothing else:

- The caller blocks only for ``fork()``. The parent's save thread then plans the write
  (:func:`plan`): which shard holds which tensor, each tensor's memory address and size (the
  same in both processes), each file's safetensors header with a placeholder for every
  checksum, and sends the plan through a pipe. The child runs no torch code (torch's thread
  pools are not fork-safe), only :func:`torchkeep.io.write.write_files` over views of those
  addresses, which hashes and writes the bytes as they were at the fork.
- The child runs at low CPU priority (nice 10) with one write thread, dies with its parent
  (``PR_SET_PDEATHSIG`` on Linux), reports the checksums, or its error, through a pipe and
  leaves with ``os._exit``. It does not fsync: the sooner it exits, the sooner the parent's
  pages stop being copied on write (see below), and an fsync needs no memory of the parent.
- The parent's save thread waits for the child, then commits exactly as a threaded save does
  (:mod:`torchkeep.storage.local`: fsync, rename into place), manifest last. A child that is
  killed commits nothing; its folder is a hidden leftover that the manager removes.

Copy-on-write has a price: while the child lives, every page of the state the parent writes
(an optimizer step updating the saved parameters) is copied by the kernel first, one 4 KiB
fault at a time, which costs more than copying those bytes up front. See docs/performance.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import marshal
import os
import shutil
import signal
import sys
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from torchkeep._common import parse_size
from torchkeep._tensors import is_plain
from torchkeep.errors import CheckpointWriteError
from torchkeep.io.recycle import RecycleBin
from torchkeep.io.write import FilePlan, Slot, write_files
from torchkeep.storage.local import temp_sibling
from torchkeep.training.checkpoint import Snapshot, commit_folder, seal, tensor_record, write_error
from torchkeep.training.shards import plan_shards, shard_name, shard_plan

NICE = 10
"""The niceness of background writers (the forked child, the manager's background thread):
against busy training threads they get about a tenth of a core (19 starved them: a 512 MB
save took 10-30 s beside a CPU-bound loop), yet all of an idle one."""
WRITE_THREADS = 1
"""The child's write threads: one, so that it competes for at most one core."""

_PR_SET_PDEATHSIG = 1


def available() -> bool:
    """Whether this platform can fork a writer (Linux and macOS)."""
    return hasattr(os, "fork") and sys.platform.startswith(("linux", "darwin"))


def yield_cpu() -> None:
    """Lower the calling thread's CPU priority to :data:`NICE` (Linux, where niceness is per
    thread; elsewhere it would lower the whole process, so nothing is changed)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)


def forkable(tensors: Mapping[str, torch.Tensor]) -> bool:
    """Whether a forked writer can write ``tensors``: plain CPU tensors, on a platform with fork."""
    # A GPU's memory is not the process's to share, and other kinds are stored as parts.
    return available() and all(t.device.type == "cpu" and is_plain(t) for t in tensors.values())


# ------------------------------------------------------------------------------ planning


@dataclass
class _Shard:
    file: str
    entries: dict[str, dict[str, Any]]  # the manifest's tensor records, checksums to come


# What the child is sent for one file, in builtins only (marshal): path, header size, header
# template, [(name, checksum place)], [(name, address, bytes, file offset)], reuse.
_Order = tuple[str, int, bytes, list[tuple[str, int]], list[tuple[str, int, int, int]], bool]


def _order(plan: FilePlan, tensors: Mapping[str, torch.Tensor]) -> _Order:
    """``plan`` as builtins, its header a template the child patches without torch.

    The header is rendered once with a random token as every tensor's checksum; the child puts
    the real checksums where the tokens are (both are 16 hex digits). The checksums are the
    header's first entry, one JSON object in name order, so each token is found by searching
    on from the previous one; a name cannot hold a token, which is drawn after it.
    """
    names = sorted(slot.name for slot in plan.slots)
    drawn = os.urandom(8 * len(names)).hex()
    tokens = {name: drawn[16 * i : 16 * i + 16] for i, name in enumerate(names)}
    template = plan.make_header(tokens)
    places: list[tuple[str, int]] = []
    at = 0
    for name in names:
        at = template.index(tokens[name].encode(), at)
        places.append((name, at))
    slots = [(s.name, tensors[s.name].data_ptr(), s.data.nbytes, s.offset) for s in plan.slots]
    return (str(plan.path), plan.header_size, template, places, slots, plan.reuse)


def plan(
    snapshot: Snapshot, folder: Path, max_bytes: int, recycle: RecycleBin | None = None
) -> tuple[list[_Shard], list[_Order]]:
    """Every shard file of ``snapshot`` planned into ``folder``, for a torch-free writer."""
    shards: list[_Shard] = []
    orders: list[_Order] = []
    # The shards a threaded save writes, frozen tensors apart (written here, not hard-linked
    # from the previous checkpoint: comparing them needs their bytes as they were at the fork).
    planned_shards = plan_shards(snapshot.tensors, max_bytes, snapshot.frozen)
    for number, (tensors, _) in enumerate(planned_shards):
        file = shard_name(number)
        orders.append(_order(shard_plan(folder / file, tensors, recycle), tensors))
        shards.append(_Shard(file, {name: tensor_record(file, t) for name, t in tensors.items()}))
    return shards, orders


def _facts(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    return {n: (t.data_ptr(), t.numel() * t.element_size()) for n, t in tensors.items()}


# --------------------------------------------------------------------------------- child


def _file_plan(order: _Order) -> FilePlan:
    """A :class:`FilePlan` over this process's memory at the addresses the parent planned."""
    path, header_size, template, places, slots, reuse = order

    def make_header(checksums: Mapping[str, str]) -> bytes:
        header = bytearray(template)
        for name, at in places:
            header[at : at + 16] = checksums[name].encode("ascii")
        return bytes(header)

    def view(address: int, size: int) -> memoryview:
        if not size:
            return memoryview(b"")
        return memoryview((ctypes.c_char * size).from_address(address)).cast("B")

    return FilePlan(
        Path(path),
        header_size,
        make_header,
        [Slot(name, view(address, size), offset) for name, address, size, offset in slots],
        reuse=reuse,
    )


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)  # the parent died before the line above took effect


def _read_all(fd: int) -> bytes:
    chunks: list[bytes] = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _child(orders: int, report: int, parent: int) -> None:
    """The forked writer's whole life: wait for the plan, write, report, exit."""
    code = 0
    try:
        _die_with_parent(parent)
        # Ctrl-C is the parent's to handle: it decides whether the save goes on.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, NICE)
        received = _read_all(orders)
        if not received:
            os._exit(1)  # the parent gave up on this save
        plans = [_file_plan(order) for order in marshal.loads(received)]
        sums = write_files(
            plans,
            threads=WRITE_THREADS,
            durable=True,
        )
        message: dict[str, Any] = {"checksums": sums}
    except BaseException as exc:  # everything reaches the parent, nothing unwinds here
        code = 1
        message = {
            "error": f"{type(exc).__name__}: {exc}",
            "errno": getattr(exc, "errno", None),
            "strerror": getattr(exc, "strerror", None),
            "filename": str(getattr(exc, "filename", "") or ""),
        }
    try:
        data = json.dumps(message).encode()
        while data:
            data = data[os.write(report, data) :]
    except BaseException:
        code = 1
    os._exit(code)


# -------------------------------------------------------------------------------- parent


class ForkedWrite:
    """One native checkpoint written by a forked child and committed by the parent.

    Make it with the snapshot (live CPU tensors) and the checkpoint's final path, call
    :meth:`start` (it forks), then :meth:`commit` in the thread that commits; ``commit`` has
    the signature of the manager's writers (``writer(snapshot, path, max_shard_size=...)``).
    """

    def __init__(
        self,
        snapshot: Snapshot,
        target: Path,
        max_shard_size: int | str,
        recycle: RecycleBin | None = None,
    ) -> None:
        self.snapshot = snapshot
        self.target = target
        self.max_bytes = parse_size(max_shard_size)
        self.recycle = recycle
        self.folder = temp_sibling(target)  # a hidden leftover until the commit renames it
        self.pid: int | None = None
        # Where each tensor's bytes were at the fork; the plan made later must agree.
        self._facts = _facts(snapshot.tensors)
        self._orders = -1  # the pipe the plan goes through, until it is sent
        self._report = -1  # the pipe the child reports through, until it is read
        self._reaped = False

    def start(self) -> int:
        """Fork the writer; return its process id."""
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        self.folder.mkdir()
        pipes = [*os.pipe(), *os.pipe()]  # orders: read, write; report: read, write
        try:
            parent = os.getpid()
            with warnings.catch_warnings():
                # Python 3.12+ warns of fork() in a threaded process; the child runs only
                # code that takes no lock another thread could hold (no torch, no logging).
                warnings.filterwarnings("ignore", ".*fork.*", DeprecationWarning)
                pid = os.fork()
            if pid == 0:  # pragma: no cover - the child's coverage is not collected
                os.close(pipes[1])
                os.close(pipes[2])
                _child(pipes[0], pipes[3], parent)
        except BaseException:
            for fd in pipes:
                os.close(fd)
            self.discard()
            raise
        os.close(pipes[0])
        os.close(pipes[3])
        self.pid, self._orders, self._report = pid, pipes[1], pipes[2]
        return pid

    def _send_plan(self) -> list[_Shard]:
        try:
            if _facts(self.snapshot.tensors) != self._facts:
                raise CheckpointWriteError(
                    f"a tensor of checkpoint {str(self.target)!r} was resized or given other "
                    "memory while the save started; nothing was committed: save again, or "
                    "save with snapshot='copy'"
                )
            shards, orders = plan(self.snapshot, self.folder, self.max_bytes, self.recycle)
            data = memoryview(marshal.dumps(orders))
            with contextlib.suppress(BrokenPipeError):  # the child died: _wait says how
                while data:
                    data = data[os.write(self._orders, data) :]
        finally:
            os.close(self._orders)
            self._orders = -1
        return shards

    def _wait(self) -> dict[str, Any]:
        """Wait for the child; its report, or a typed error saying how it ended."""
        assert self.pid is not None, "start() first"
        try:
            received = _read_all(self._report)
        finally:
            os.close(self._report)
            self._report = -1
        _, status = os.waitpid(self.pid, 0)
        self._reaped = True
        where = f"checkpoint {str(self.target)!r}"
        try:
            report: dict[str, Any] = json.loads(received or b"{}")
        except ValueError:
            report = {}
        if os.WIFSIGNALED(status):
            number = os.WTERMSIG(status)
            raise CheckpointWriteError(
                f"the background writer of {where} (process {self.pid}) was killed by signal "
                f"{number} ({signal.Signals(number).name}); nothing was committed and earlier "
                "checkpoints are untouched; save again (if memory ran out, save with "
                "snapshot='copy')"
            )
        if "checksums" in report and os.WEXITSTATUS(status) == 0:
            return report
        detail = report.get("error") or f"exit status {os.WEXITSTATUS(status)}"
        if report.get("errno") is not None:
            failed = OSError(report["errno"], report.get("strerror") or detail)
            failed.filename = report.get("filename") or None
            raise write_error(failed, self.target) from None
        raise CheckpointWriteError(
            f"the background writer of {where} failed: {detail}; nothing was committed and "
            "earlier checkpoints are untouched"
        )

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def commit(
        self, snapshot: Snapshot, path: str | os.PathLike[str], *, max_shard_size: int | str
    ) -> Path:
        """Plan the write, wait for the writer, then commit its folder at ``path``, manifest
        last (the manager's writer signature)."""
        target = Path(path)
        assert target == self.target and snapshot is self.snapshot
        try:
            shards = self._send_plan()
            sums = self._wait()["checksums"]
        except BaseException:
            self.abandon()
            raise
        records = {
            name: {**entry, "xxh3": checksums[name]}
            for shard, checksums in zip(shards, sums, strict=True)
            for name, entry in shard.entries.items()
        }

        def fill(temp: Path) -> None:
            # The child's folder takes the place of the empty one made for the commit.
            os.replace(self.folder, temp)
            seal(temp, snapshot, records, [s.file for s in shards])

        try:
            return commit_folder(target, snapshot, fill)
        except BaseException:
            self.discard()
            raise

    def abandon(self) -> None:
        """Stop the writer and remove what it wrote (nothing was committed)."""
        if self.pid is not None and not self._reaped:
            # Not reaped yet, so the process id is still this child's own.
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.waitpid(self.pid, 0)
            self._reaped = True
        for fd in (self._orders, self._report):
            if fd >= 0:
                os.close(fd)
        self._orders = self._report = -1
        self.discard()


__all__ = ["ForkedWrite", "available", "forkable", "plan"]
