"""Fuzz harnesses, one per parser: seeds, mutations, and the single call that parses.

Each harness's ``parse`` is the one place the parser is called; where a pure parsing
function exists (or appears), that call is the only line to change.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import struct
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import torchkeep as tk
from torchkeep.errors import TorchkeepError
from torchkeep.safety.unpickle import safe_pickle_load

DEADLINE_S = 5.0
_OPCODES = [bytes([c]) for c in b"()NIJKLMFSTUVXabcdeghijklopqrstu}]ex" + bytes(range(0x80, 0x96))]


class Hang(Exception):
    """One input took longer than the deadline."""


def _scratch() -> Path:
    base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else Path(tempfile.gettempdir())
    return Path(tempfile.mkdtemp(prefix="tk-fuzz-", dir=base))


# ------------------------------------------------------------------------------- mutations
def mutate_bytes(rng: random.Random, data: bytes, seeds: list[bytes]) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        pos = rng.randrange(len(out) + 1)
        if op == 0 and out:
            out[min(pos, len(out) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            out[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 2 and out:
            del out[pos : pos + rng.randint(1, 16)]
        elif op == 3 and out:
            out[min(pos, len(out) - 1)] = rng.choice([0, 0xFF, 0x7F, 0x80, ord("("), ord(".")])
        elif op == 4:
            other = rng.choice(seeds)
            start = rng.randrange(len(other) + 1)
            out[pos:pos] = other[start : start + rng.randint(1, 64)]
        else:
            interesting = rng.choice([0, 1, 0x7FFFFFFF, 0xFFFFFFFF, 2**63 - 1, 2**64 - 1])
            out[pos:pos] = struct.pack("<Q", interesting)[: rng.choice([1, 2, 4, 8])]
    return bytes(out)


def random_opcodes(rng: random.Random) -> bytes:
    out = bytearray(b"\x80" + bytes([rng.randint(0, 5)]))
    for _ in range(rng.randint(1, 40)):
        op = rng.choice(_OPCODES)
        out += op
        arg = rng.randrange(4)
        if arg == 0:
            out += struct.pack("<I", rng.choice([0, 1, 3, 0xFFFFFFFF]))[: rng.choice([1, 4])]
        elif arg == 1:
            out += rng.choice([b"os\nsystem\n", b"torch\nTensor\n", b"builtins\nset\n", b"x\n"])
    return bytes(out + b".")


def mutate_json(rng: random.Random, text: bytes) -> bytes:
    try:
        doc = json.loads(text)
    except ValueError:
        return text
    nodes: list[tuple[Any, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key in list(node):
                nodes.append((node, key))
                walk(node[key])
        elif isinstance(node, list):
            for i in range(len(node)):
                nodes.append((node, i))
                walk(node[i])

    walk(doc)
    if not nodes:
        return text
    for _ in range(rng.randint(1, 3)):
        parent, key = rng.choice(nodes)
        parent[key] = rng.choice(
            [
                -1,
                2**64,
                1.5,
                True,
                None,
                "",
                "../outside",
                "/etc/passwd",
                "x" * 300,
                [],
                {},
                [[[[[]]]]],
                {"__tk__": "tensor", "name": "nope"},
                "float32",
                [2**62, 2**62],
            ]
        )
    return json.dumps(doc).encode()


# ------------------------------------------------------------------------------- harnesses
@dataclass
class Harness:
    """Seeds, how to mutate them, and the one call that parses an input."""

    name: str
    seeds: list[bytes]
    parse: Callable[[bytes], Any]
    structured: Callable[[random.Random], bytes] | None = None
    json_seeds: bool = False
    cleanup: list[Path] = field(default_factory=list)

    def generate(self, rng: random.Random) -> bytes:
        if self.structured is not None and rng.random() < 0.3:
            return self.structured(rng)
        seed = rng.choice(self.seeds)
        if self.json_seeds and rng.random() < 0.5:
            return mutate_json(rng, seed)
        return mutate_bytes(rng, seed, self.seeds)


def _torch_bytes(obj: Any, legacy: bool = False) -> bytes:
    import io

    out = io.BytesIO()
    torch.save(obj, out, _use_new_zipfile_serialization=not legacy)
    return out.getvalue()


def pickle_harness(scratch: Path, marker: Path) -> Harness:
    seeds = [pickle.dumps({"a": [1, 2.5, "x"], "b": (None, True)}, protocol=p) for p in range(6)]
    seeds.append(pickle.dumps(__import__("collections").OrderedDict(a=1), protocol=2))
    seeds.append(
        b"\x80\x02cos\nsystem\nX"
        + struct.pack("<I", 6 + len(str(marker)))
        + f"touch {marker}".encode()
        + b"\x85R."
    )

    def parse(data: bytes) -> Any:
        return safe_pickle_load(data, path="fuzz.pkl")

    return Harness("pickle", seeds, parse, structured=random_opcodes)


def _file_parse(path: Path, call: Callable[[Path], Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        path.write_bytes(data)
        return call(path)

    return parse


def torchzip_harness(scratch: Path, marker: Path) -> Harness:
    state = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.int64)}
    seeds = [_torch_bytes(state), _torch_bytes({"model": state, "epoch": 3})]
    return Harness(
        "torchzip", seeds, _file_parse(scratch / "fuzz.pt", lambda p: tk.load_state_dict(p))
    )


def safetensors_harness(scratch: Path, marker: Path) -> Harness:
    seed_path = scratch / "seed.safetensors"
    tk.save({"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}, seed_path)
    seeds = [seed_path.read_bytes()]

    def structured(rng: random.Random) -> bytes:
        data = rng.choice(seeds)
        (length,) = struct.unpack("<Q", data[:8])
        header = mutate_json(rng, data[8 : 8 + length])
        return struct.pack("<Q", len(header)) + header + data[8 + length :]

    return Harness(
        "safetensors",
        seeds,
        _file_parse(scratch / "fuzz.safetensors", lambda p: tk.load_state_dict(p)),
        structured=structured,
    )


def _folder_harness(name: str, folder: Path, member: str, call: Callable[[Path], Any]) -> Harness:
    target = folder / member
    seeds = [target.read_bytes()]
    return Harness(name, seeds, _file_parse(target, lambda p: call(folder)), json_seeds=True)


def index_harness(scratch: Path, marker: Path) -> Harness:
    folder = scratch / "sharded"
    tk.save({"a": torch.ones(8), "b": torch.zeros(8)}, folder, max_shard_size=40)
    index = next(folder.glob("*.index.json")).name
    return _folder_harness("index", folder, index, lambda f: tk.load_state_dict(f))


def manifest_harness(scratch: Path, marker: Path) -> Harness:
    folder = scratch / "native"
    tk.save_checkpoint(folder, model=torch.nn.Linear(2, 2), step=3, rng=False)
    return _folder_harness("manifest", folder, "checkpoint.json", lambda f: tk.load_state_dict(f))


def dcp_harness(scratch: Path, marker: Path) -> Harness:
    import torch.distributed.checkpoint as dcp

    folder = scratch / "dcp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(
            {"w": torch.arange(4.0), "n": torch.ones(2)}, checkpoint_id=str(folder), no_dist=True
        )
    harness = _folder_harness("dcp", folder, ".metadata", lambda f: tk.load_state_dict(f))
    harness.json_seeds = False
    return harness


HARNESSES: dict[str, Callable[[Path, Path], Harness]] = {
    "pickle": pickle_harness,
    "torchzip": torchzip_harness,
    "safetensors": safetensors_harness,
    "index": index_harness,
    "manifest": manifest_harness,
    "dcp": dcp_harness,
}


@dataclass
class Tally:
    executions: int = 0
    refusals: int = 0
    accepted: int = 0
    untyped: int = 0
    hangs: int = 0
    markers: int = 0
    examples: list[str] = field(default_factory=list)


def _on_alarm(signum: int, frame: Any) -> None:
    raise Hang()


def run(parser: str, executions: int, seed: int = 0, *, keep_examples: Path | None = None) -> Tally:
    """Run ``executions`` inputs through one harness in this process."""
    warnings.simplefilter("ignore")
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 1000))
    scratch = _scratch()
    marker = scratch / "MARKER"
    try:
        harness = HARNESSES[parser](scratch, marker)
        rng = random.Random(seed)
        tally = Tally()
        previous = signal.signal(signal.SIGALRM, _on_alarm)
        try:
            for _ in range(executions):
                data = harness.generate(rng)
                tally.executions += 1
                signal.setitimer(signal.ITIMER_REAL, DEADLINE_S)
                try:
                    harness.parse(data)
                    tally.accepted += 1
                except TorchkeepError:
                    tally.refusals += 1
                except Hang:
                    tally.hangs += 1
                    _keep(tally, "hang", data, keep_examples)
                except Exception as exc:  # anything untyped is a finding
                    tally.untyped += 1
                    _keep(tally, f"{type(exc).__name__}: {str(exc)[:120]}", data, keep_examples)
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                if marker.exists():
                    tally.markers += 1
                    _keep(tally, "marker created", data, keep_examples)
                    marker.unlink()
        finally:
            signal.signal(signal.SIGALRM, previous)
        return tally
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _keep(tally: Tally, what: str, data: bytes, folder: Path | None) -> None:
    if len(tally.examples) < 20:
        tally.examples.append(what)
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{len(tally.examples):02d}.bin").write_bytes(data)
