"""torchkeep's CUDA paths on a machine with a GPU, in one run (``make gpu-check``).

Five steps, each printed under a heading with its time:

a. environment: Python, torch and its CUDA build, the devices, torchkeep. Without CUDA the
   script stops here with exit code 2.
b. CUDA tests: every test of the suite that needs a CUDA device (listed below by node id, so
   the run is short) in a pytest subprocess. On a GPU machine a skipped test fails the step.
c. CUDA checks written here: pinned staging buffers and non-blocking copies in an async
   ``CheckpointManager.save``; the CUDA RNG states through ``save_checkpoint`` and
   ``load_checkpoint``; ``load`` and ``load_state_dict`` onto CUDA against the CPU load; a
   ``{"cuda:1": "cuda:0"}`` location map (two devices or more); ``load_for_inference``.
d. GPU benchmark: a ~1 GB float32 transformer-shaped state loaded onto CUDA by torchkeep,
   ``safetensors.torch.load_file`` and ``torch.load(map_location=...)``, and the time an async
   save of CUDA tensors blocks against a blocking save. Medians of ``--runs`` runs after
   ``--warmup``; the files are read from the page cache. Written to
   ``bench-output/gpu-check.json``.
e. summary: each step's PASS/FAIL and the total time; the exit code is 1 if any failed.

``--cpu-dry-run`` runs every step on the CPU ("cpu" where a device is named), reports the
CUDA-only assertions as SKIP and accepts the skipped tests of step b, so that the script's own
code runs on any machine::

    python benchmarks/gpu_check.py                                   # on a CUDA machine
    python benchmarks/gpu_check.py --cpu-dry-run --size-mb 8 --runs 1
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import safetensors
import torch
from safetensors.torch import load_file
from torch import nn

import torchkeep as tk

ROOT = Path(__file__).resolve().parent.parent

# The tests that skip without a CUDA device. `unlisted_cuda_tests` finds any that is missing.
CUDA_TESTS = (
    "tests/test_checkpoint.py::test_cuda_state_loads_on_cpu_and_back",
    "tests/test_manager.py::test_async_save_of_cuda_tensors_is_staged",
    "tests/test_errors.py::test_a_cuda_index_past_the_last_device_names_those_present",
    "tests/test_golden.py::test_cuda_location_map_on_a_gpu_machine",
    "tests/test_load.py::test_load_moves_the_model_when_given_a_device[cuda]",
    "tests/test_load.py::test_assign_builds_a_meta_model_on_the_given_device[cuda]",
)
# Tests that run everywhere and read the real CUDA state: `torchkeep env` and its device table.
CUDA_AWARE_TESTS = (
    "tests/test_cli.py::test_env_text_and_json",
    "tests/test_cli.py::test_env_describes_cuda_devices",
)
# Each loading verb refusing "cuda:7", an index past the last device (runs with < 8 devices).
PAST_LAST_DEVICE = tuple(
    f"tests/test_errors.py::test_an_unavailable_device_is_a_device_error[{verb}-cuda:7]"
    for verb in (
        "load",
        "load-assign",
        "load_state_dict",
        "load_state_dict-map",
        "load_checkpoint",
        "load_model",
        "load_for_inference",
        "restore",
    )
)
CUDA_MARK = re.compile(
    r"^\s*@(needs_cuda\b|pytest\.mark\.skipif\(\s*not torch\.cuda\.is_available\(\))"
    r"|marks=needs_cuda\b"
)
DEF = re.compile(r"^\s*(?:async\s+)?def\s+(\w+)")
NO_CUDA = "no CUDA (CPU dry run)"
BUDGET_S = 480.0  # 8 minutes: what the whole check, set-up included, should take


# ------------------------------------------------------------------------------ reporting


@dataclass
class Check:
    name: str
    status: str  # PASS, FAIL or SKIP
    detail: str = ""


@dataclass
class Step:
    title: str
    status: str = "PASS"
    seconds: float = 0.0


@dataclass
class Context:
    dry_run: bool
    device: str
    devices: list[str]
    size_mb: float
    runs: int
    warmup: int
    work: Path
    test_timeout: float
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return not self.dry_run


def run_step(letter: str, title: str, body: Callable[[], bool]) -> Step:
    print(f"\n=== {letter}. {title} ===", flush=True)
    start = time.perf_counter()
    try:
        ok = body()
    except Exception:
        traceback.print_exc(file=sys.stdout)
        ok = False
    step = Step(title, "PASS" if ok else "FAIL", time.perf_counter() - start)
    print(f"--- {letter}. {title}: {step.status} ({step.seconds:.1f} s)", flush=True)
    return step


def report(checks: list[Check], check: Check) -> None:
    checks.append(check)
    print(f"  {check.status:4}  {check.name}" + (f": {check.detail}" if check.detail else ""))


def verdict(name: str, ok: bool, detail: str = "") -> Check:
    return Check(name, "PASS" if ok else "FAIL", detail)


# ---------------------------------------------------------------------------- environment


def environment() -> dict[str, Any]:
    available = torch.cuda.is_available()
    count = torch.cuda.device_count() if available else 0
    devices = []
    for index in range(count):
        props = torch.cuda.get_device_properties(index)
        devices.append(
            {
                "name": props.name,
                "capability": f"{props.major}.{props.minor}",
                "memory_gib": round(props.total_memory / 2**30, 1),
            }
        )
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda,
        "cuda_available": available,
        "device_count": count,
        "devices": devices,
        "torchkeep": tk.__version__,
        "safetensors": safetensors.__version__,
    }


def print_environment(env: dict[str, Any]) -> None:
    print(f"  python       {env['python']} ({env['platform']})")
    print(f"  torch        {env['torch']} (CUDA build: {env['torch_cuda_build'] or 'none'})")
    print(f"  CUDA         {'available' if env['cuda_available'] else 'NOT available'}")
    print(f"  devices      {env['device_count']}")
    for index, device in enumerate(env["devices"]):
        print(
            f"    cuda:{index}     {device['name']} (compute {device['capability']}, "
            f"{device['memory_gib']} GiB)"
        )
    print(f"  torchkeep    {env['torchkeep']}")
    print(f"  safetensors  {env['safetensors']}")


def no_cuda_message(env: dict[str, Any]) -> str:
    why = (
        "the installed torch is a CPU build (torch.version.cuda is None); install a CUDA "
        "build of torch into the venv first"
        if env["torch_cuda_build"] is None
        else f"torch is built for CUDA {env['torch_cuda_build']} but finds no usable device "
        "(driver, CUDA_VISIBLE_DEVICES)"
    )
    return (
        f"CUDA is not available: {why}. This check needs a CUDA device; nothing was run. "
        "Run it on a machine with a GPU, or pass --cpu-dry-run to exercise the script on the "
        "CPU."
    )


# ---------------------------------------------------------------------------- CUDA tests


def unlisted_cuda_tests() -> list[str]:
    """Tests marked to skip without CUDA that the lists above do not name."""
    listed = {node.split("::")[1].split("[")[0] for node in CUDA_TESTS + CUDA_AWARE_TESTS}
    found: list[str] = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        pending = False
        for line in path.read_text(encoding="utf-8").splitlines():
            if CUDA_MARK.search(line):
                pending = True
            elif match := DEF.match(line):
                if pending and match.group(1).startswith("test_"):
                    found.append(f"{path.relative_to(ROOT).as_posix()}::{match.group(1)}")
                pending = False
    return [node for node in found if node.split("::")[1] not in listed]


def pytest_counts(output: str) -> dict[str, int]:
    lines = [line for line in output.splitlines() if re.search(r"\b(passed|failed|error)", line)]
    counts: dict[str, int] = {}
    for number, word in re.findall(r"(\d+) (\w+)", lines[-1] if lines else ""):
        counts[word.rstrip("s") if word == "errors" else word] = int(number)
    return counts


def cuda_tests(ctx: Context) -> bool:
    unlisted = unlisted_cuda_tests()
    if unlisted:
        print("  tests that need CUDA but are not listed in benchmarks/gpu_check.py:")
        for node in unlisted:
            print(f"    {node}")
    count = torch.cuda.device_count() if ctx.cuda else 0
    nodes = list(CUDA_TESTS + CUDA_AWARE_TESTS)
    if count < 8:
        nodes += PAST_LAST_DEVICE
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *nodes]
    env = dict(os.environ)
    if ctx.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the same on any machine: every CUDA test skips
    print(
        f"  {len(nodes)} tests: pytest -q -rs -p no:cacheprovider " + " ".join(nodes[:2]) + " ..."
    )
    try:
        done = subprocess.run(
            command,
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=ctx.test_timeout,
        )
    except subprocess.TimeoutExpired:
        print(f"  pytest did not finish within {ctx.test_timeout:.0f} s")
        ctx.result["cuda_tests"] = {"nodes": nodes, "timed_out": True}
        return False
    output = done.stdout + done.stderr
    print("\n".join("  | " + line for line in output.rstrip().splitlines()))
    counts = pytest_counts(output)
    skipped = counts.get("skipped", 0)
    ctx.result["cuda_tests"] = {
        "nodes": nodes,
        "returncode": done.returncode,
        "counts": counts,
        "unlisted": unlisted,
    }
    ran = sum(counts.get(word, 0) for word in ("passed", "failed", "skipped", "error"))
    ok = done.returncode == 0 and ran == len(nodes) and not unlisted
    if skipped and not ctx.dry_run:
        print(f"  {skipped} CUDA test(s) skipped on a machine with CUDA: that is a failure here")
        ok = False
    elif skipped:
        print(f"  {skipped} skipped, as expected without CUDA")
    return ok


# --------------------------------------------------------------------------- CUDA checks


def _equal_states(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> bool:
    return list(got) == list(want) and all(
        torch.equal(got[name].detach().cpu(), want[name]) for name in want
    )


def _on(state: dict[str, torch.Tensor], device: str) -> bool:
    return all(t.device.type == torch.device(device).type for t in state.values())


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(256, 256), nn.LayerNorm(256), nn.Linear(256, 64))


def check_staging(ctx: Context, checks: list[Check]) -> None:
    """Async saves copy into reused (pinned) buffers with non-blocking copies, then return."""
    torch.manual_seed(0)
    model = _mlp().to(ctx.device)
    expected = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    sources = {t.data_ptr() for t in model.state_dict().values()}
    copies: list[tuple[int, bool, bool, str]] = []  # destination, pinned, non_blocking, source
    original = torch.Tensor.copy_

    def spy(self: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
        if isinstance(src, torch.Tensor) and src.data_ptr() in sources:
            copies.append((self.data_ptr(), self.is_pinned(), non_blocking, src.device.type))
        return original(self, src, non_blocking)

    with tk.CheckpointManager(ctx.work / "staging", keep_last=1) as manager:
        with mock.patch.object(torch.Tensor, "copy_", spy):
            manager.save(1, blocking=False, model=model)
        first = list(copies)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.mul_(0)  # training goes on while the save is written
        manager.wait()
        restored = _mlp()
        manager.restore(model=restored)
        report(
            checks,
            verdict(
                "async save keeps the values of the moment it returned",
                _equal_states(restored.state_dict(), expected),
                f"{len(expected)} tensors on {ctx.device}, weights zeroed before the write ended",
            ),
        )
        copies.clear()
        with mock.patch.object(torch.Tensor, "copy_", spy):
            manager.save(2, blocking=False, model=model)
        manager.wait()
    report(
        checks,
        verdict(
            "staging buffers are reused by the next save",
            len(first) == len(expected) and {c[0] for c in first} == {c[0] for c in copies},
            f"{len(first)} copies into the pool, then {len(copies)} into the same buffers",
        ),
    )
    if not ctx.cuda:
        report(checks, Check("staging buffers are pinned, copies non-blocking", "SKIP", NO_CUDA))
        return
    from_gpu = [c for c in first if c[3] == "cuda"]
    report(
        checks,
        verdict(
            "staging buffers are pinned, copies non-blocking",
            len(from_gpu) == len(expected) and all(c[1] and c[2] for c in from_gpu),
            f"{sum(c[1] for c in from_gpu)}/{len(from_gpu)} pinned, "
            f"{sum(c[2] for c in from_gpu)}/{len(from_gpu)} non_blocking",
        ),
    )


def check_rng(ctx: Context, checks: list[Check]) -> None:
    """The RNG states saved by save_checkpoint come back with load_checkpoint."""
    devices = ctx.devices if ctx.cuda else ["cpu"]

    def draw() -> list[torch.Tensor]:
        return [torch.rand(8, device=device).cpu() for device in devices]

    for layout, path in (("folder", ctx.work / "rng"), (".pt", ctx.work / "rng.pt")):
        torch.manual_seed(7)
        states = [s.clone() for s in torch.cuda.get_rng_state_all()] if ctx.cuda else []
        tk.save_checkpoint(path, model=nn.Linear(4, 4))
        expected = draw()
        draw()  # the states move on
        tk.load_checkpoint(path, model=nn.Linear(4, 4))
        restored = list(torch.cuda.get_rng_state_all()) if ctx.cuda else []
        again = draw()
        report(
            checks,
            verdict(
                f"RNG round trip ({layout}): draws repeat after load_checkpoint",
                all(torch.equal(a, b) for a, b in zip(expected, again, strict=True)),
                "on " + ", ".join(devices),
            ),
        )
        name = f"RNG round trip ({layout}): torch.cuda.get_rng_state_all() restored"
        if not ctx.cuda:
            report(checks, Check(name, "SKIP", NO_CUDA))
            continue
        same = len(states) == len(restored) and all(
            torch.equal(a, b) for a, b in zip(states, restored, strict=True)
        )
        report(checks, verdict(name, same, f"{len(states)} device state(s)"))


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)
    )


def check_loads(ctx: Context, checks: list[Check]) -> None:
    """load and load_state_dict onto the device give what the CPU load gives."""
    torch.manual_seed(1)
    source = _net()
    source(torch.randn(2, 3, 8, 8))  # BatchNorm running statistics away from their init
    files = {
        "safetensors": tk.save(source, ctx.work / "net.safetensors"),
        "torch.save": ctx.work / "net.pt",
    }
    torch.save(source.state_dict(), files["torch.save"])
    for kind, path in files.items():
        on_cpu = tk.load_state_dict(path)
        moved = tk.load_state_dict(path, device=ctx.device)
        report(
            checks,
            verdict(
                f"load_state_dict(device={ctx.device!r}) equals the CPU load ({kind})",
                _on(moved, ctx.device) and _equal_states(moved, on_cpu),
                f"{len(moved)} tensors",
            ),
        )
        model = _net().to(ctx.device)
        loaded = tk.load(model, path).ok
        state = model.state_dict()
        report(
            checks,
            verdict(
                f"load(model on {ctx.device}) equals the CPU load ({kind})",
                loaded and _on(state, ctx.device) and _equal_states(state, on_cpu),
            ),
        )
        model = _net()
        loaded = tk.load(model, path, device=ctx.device).ok
        state = model.state_dict()
        report(
            checks,
            verdict(
                f"load(CPU model, device={ctx.device!r}) moves it, same values ({kind})",
                loaded and _on(state, ctx.device) and _equal_states(state, on_cpu),
            ),
        )


def check_remap(ctx: Context, checks: list[Check]) -> None:
    """A file whose storages say cuda:1, loaded with {"cuda:1": "cuda:0"}."""
    name = 'load_state_dict(device={"cuda:1": "cuda:0"}) of a file saved on cuda:1'
    if not ctx.cuda:
        report(checks, Check(name, "SKIP", NO_CUDA))
        return
    if len(ctx.devices) < 2:
        report(
            checks,
            Check(
                name,
                "SKIP",
                f"needs 2 CUDA devices, this machine has {len(ctx.devices)}; step b's "
                "test_cuda_location_map_on_a_gpu_machine maps a file tagged cuda:1 instead",
            ),
        )
        return
    torch.manual_seed(2)
    want = {k: v.detach().clone() for k, v in _net().state_dict().items()}
    path = ctx.work / "on_cuda1.pt"
    torch.save({k: v.to("cuda:1") for k, v in want.items()}, path)
    state = tk.load_state_dict(path, device={"cuda:1": "cuda:0"})
    report(
        checks,
        verdict(
            name,
            all(t.device == torch.device("cuda:0") for t in state.values())
            and _equal_states(state, want),
        ),
    )


def check_inference(ctx: Context, checks: list[Check]) -> None:
    """load_for_inference rebuilds (or fills) a model on the device, ready to run."""
    torch.manual_seed(3)
    source = nn.Linear(64, 32)
    path = tk.save_model(source, ctx.work / "linear.safetensors")
    batch = torch.randn(5, 64)
    want = source(batch).detach()
    forms: list[tuple[str, Callable[[], nn.Module]]] = [
        ("load_for_inference(path)", lambda: tk.load_for_inference(path, device=ctx.device)),
        (
            "load_for_inference(model, path)",
            lambda: tk.load_for_inference(nn.Linear(64, 32), path, device=ctx.device),
        ),
    ]
    for form, build in forms:
        model = build()
        state = model.state_dict()
        with torch.no_grad():
            got = model(batch.to(ctx.device)).cpu()
        ready = not model.training and not any(p.requires_grad for p in model.parameters())
        report(
            checks,
            verdict(
                f"{form} on {ctx.device}",
                isinstance(model, nn.Linear)
                and ready
                and _on(state, ctx.device)
                and _equal_states(state, {k: v.detach() for k, v in source.state_dict().items()})
                and torch.allclose(got, want, atol=1e-5),
                "eval(), no gradients, same weights and outputs",
            ),
        )


CHECKS = (check_staging, check_rng, check_loads, check_remap, check_inference)


def cuda_checks(ctx: Context) -> bool:
    checks: list[Check] = []
    for check in CHECKS:
        try:
            check(ctx, checks)
        except Exception as exc:
            traceback.print_exc(file=sys.stdout)
            report(checks, Check(check.__name__, "FAIL", f"{type(exc).__name__}: {exc}"))
    ctx.result["checks"] = [asdict(c) for c in checks]
    return all(c.status != "FAIL" for c in checks)


# ------------------------------------------------------------------------------ benchmark


def _ratio(other: float, ours: float) -> float | None:
    return other / ours if ours > 0 else None


def benchmark(ctx: Context) -> bool:
    from workload import Transformer, make_model, nbytes, shape_for

    device, cuda = ctx.device, ctx.cuda

    def timed(work: Callable[[], object]) -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        work()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def compare(peers: dict[str, Callable[[], object]]) -> dict[str, list[float]]:
        samples: dict[str, list[float]] = {name: [] for name in peers}
        for round_ in range(ctx.warmup + ctx.runs):
            for name, work in peers.items():  # interleaved, so drift hits every peer alike
                seconds = timed(work)
                if round_ >= ctx.warmup:
                    samples[name].append(seconds)
        return samples

    source = make_model(ctx.size_mb)
    state = {k: v.detach() for k, v in source.state_dict().items()}
    size = nbytes(state)
    st_path, pt_path = ctx.work / "state.safetensors", ctx.work / "state.pt"
    tk.save(source, st_path)
    torch.save(state, pt_path)
    with torch.device("meta"):
        target = Transformer(*shape_for(ctx.size_mb))
    target = target.to_empty(device=device)
    print(
        f"  state: {size / 1e6:.0f} MB float32 in {len(state)} tensors; {ctx.runs} runs "
        f"after {ctx.warmup} warm-up, medians; files in the page cache; device {device}"
    )

    def torch_load() -> dict[str, torch.Tensor]:
        loaded: dict[str, torch.Tensor] = torch.load(
            pt_path, map_location=device, weights_only=True
        )
        return loaded

    sections: list[tuple[str, dict[str, Callable[[], object]]]] = [
        (
            f"load into a model on {device}",
            {
                "torchkeep": lambda: tk.load(target, st_path),
                "safetensors": lambda: target.load_state_dict(load_file(st_path, device=device)),
                "torch": lambda: target.load_state_dict(torch_load()),
            },
        ),
        (
            f"load a state dict onto {device}",
            {
                "torchkeep": lambda: tk.load_state_dict(st_path, device=device),
                "safetensors": lambda: load_file(st_path, device=device),
                "torch": torch_load,
            },
        ),
    ]
    rows: list[dict[str, Any]] = []
    for operation, peers in sections:
        samples = compare(peers)
        medians = {name: statistics.median(values) for name, values in samples.items()}
        rows.append(
            {
                "operation": operation,
                "seconds": medians,
                "vs_safetensors": _ratio(medians["safetensors"], medians["torchkeep"]),
                "vs_torch": _ratio(medians["torch"], medians["torchkeep"]),
                "samples": samples,
            }
        )
    loaded_ok = _equal_states(target.state_dict(), state) and _equal_states(
        tk.load_state_dict(st_path, device=device), state
    )

    blocked: list[float] = []
    whole: list[float] = []
    blocking: list[float] = []
    with tk.CheckpointManager(ctx.work / "run", keep_last=1) as manager:
        step = 0
        for round_ in range(ctx.warmup + ctx.runs):
            step += 1
            start = time.perf_counter()
            stall = timed(functools.partial(manager.save, step, blocking=False, model=target))
            manager.wait()
            total = time.perf_counter() - start
            step += 1
            sync = timed(functools.partial(manager.save, step, model=target))
            if round_ >= ctx.warmup:
                blocked.append(stall)
                whole.append(total)
                blocking.append(sync)
        restored = Transformer(*shape_for(ctx.size_mb))
        manager.restore(model=restored)
    saved_ok = _equal_states(restored.state_dict(), state)
    stall_s, sync_s = statistics.median(blocked), statistics.median(blocking)
    async_save = {
        "blocked_s": stall_s,
        "whole_async_save_s": statistics.median(whole),
        "blocking_save_s": sync_s,
        "stall_pct": 100 * stall_s / sync_s if sync_s > 0 else None,
        "samples": {"blocked": blocked, "whole": whole, "blocking": blocking},
    }

    def cell(value: float | None, suffix: str = "") -> str:
        return "-" if value is None else f"{value:.3f}{suffix}"

    print()
    print(
        f"  {'operation (median s)':34} {'torchkeep':>9} {'safetens.':>9} {'torch':>9}"
        f" {'vs safet.':>9} {'vs torch':>9}"
    )
    for row in rows:
        s = row["seconds"]
        print(
            f"  {row['operation']:34} {s['torchkeep']:9.3f} {s['safetensors']:9.3f} "
            f"{s['torch']:9.3f} {cell(row['vs_safetensors'], 'x'):>9} "
            f"{cell(row['vs_torch'], 'x'):>9}"
        )
    print("  vs = the peer's time / torchkeep's (above 1: torchkeep is faster)")
    pct = async_save["stall_pct"]
    print(
        f"  async save of {device} tensors: blocked {stall_s:.3f} s of a {sync_s:.3f} s "
        f"blocking save (stall {'-' if pct is None else f'{pct:.1f}'} %); the whole async "
        f"save took {async_save['whole_async_save_s']:.3f} s"
    )
    print(f"  {'PASS' if loaded_ok else 'FAIL'}  loaded values equal the saved state")
    print(f"  {'PASS' if saved_ok else 'FAIL'}  the manager's checkpoints restore the state")
    ctx.result["benchmark"] = {
        "device": device,
        "state_bytes": size,
        "tensors": len(state),
        "runs": ctx.runs,
        "warmup": ctx.warmup,
        "rows": rows,
        "async_save": async_save,
        "values_equal": loaded_ok and saved_ok,
    }
    return loaded_ok and saved_ok


# ----------------------------------------------------------------------------------- main


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--cpu-dry-run",
        action="store_true",
        help='every step on the CPU ("cpu" for "cuda"), CUDA-only assertions as SKIP',
    )
    parser.add_argument("--size-mb", type=float, default=None, help="default 1024 (8 dry)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--test-timeout", type=float, default=300.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench-output" / "gpu-check.json")
    parser.add_argument("--dir", type=Path, default=ROOT / "bench-output" / "gpu-check-work")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.warmup < 0:
        parser.error("--runs must be at least 1 and --warmup at least 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    started = time.perf_counter()
    mode = "cpu-dry-run" if args.cpu_dry_run else "cuda"
    print(f"torchkeep GPU check ({mode})", flush=True)
    env: dict[str, Any] = {}

    def env_step() -> bool:
        env.update(environment())
        print_environment(env)
        if args.cpu_dry_run:
            print('  CPU dry run: "cpu" stands for "cuda"; CUDA-only checks are SKIP')
        return bool(env["cuda_available"]) or args.cpu_dry_run

    steps = {"environment": run_step("a", "environment", env_step)}
    if steps["environment"].status == "FAIL":
        print(
            no_cuda_message(env) if env else "could not describe the environment", file=sys.stderr
        )
        return 2
    count = env["device_count"] if not args.cpu_dry_run else 0
    ctx = Context(
        dry_run=args.cpu_dry_run,
        device="cpu" if args.cpu_dry_run else "cuda",
        devices=[f"cuda:{i}" for i in range(count)],
        size_mb=args.size_mb or (8.0 if args.cpu_dry_run else 1024.0),
        runs=args.runs,
        warmup=args.warmup,
        work=args.dir,
        test_timeout=args.test_timeout,
        result={"mode": mode, "environment": env},
    )
    shutil.rmtree(ctx.work, ignore_errors=True)
    ctx.work.mkdir(parents=True)
    try:
        steps["cuda_tests"] = run_step("b", "CUDA tests", lambda: cuda_tests(ctx))
        steps["cuda_checks"] = run_step("c", "CUDA checks", lambda: cuda_checks(ctx))
        steps["benchmark"] = run_step("d", "GPU benchmark", lambda: benchmark(ctx))
    finally:
        shutil.rmtree(ctx.work, ignore_errors=True)

    print("\n=== e. summary ===")
    total = time.perf_counter() - started
    for step in steps.values():
        print(f"  {step.status:4}  {step.title:16} {step.seconds:7.1f} s")
    ok = all(step.status == "PASS" for step in steps.values())
    print(f"  {'PASS' if ok else 'FAIL'}  total            {total:7.1f} s")
    if total > BUDGET_S:
        print(f"  note: over the {BUDGET_S:.0f} s this check is meant to take")
    ctx.result.update(
        steps={key: asdict(step) for key, step in steps.items()}, total_s=total, ok=ok
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(ctx.result, indent=1) + "\n", encoding="utf-8")
    print(f"  written to {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
