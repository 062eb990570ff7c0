"""``torchkeep env``: the versions and device facts people print by hand when reporting."""

from __future__ import annotations

import contextlib
import importlib.metadata
import platform
import sys
from typing import Any

import click
import torch
from rich.text import Text

from torchkeep.cli._app import debug_option, json_option
from torchkeep.cli._output import console, emit_json, print_pairs

EPILOG = """\b
Examples:
  torchkeep env
  torchkeep env --json > env.json

\b
Exit codes:
  0  printed
"""
_PACKAGES = ("torchkeep", "torch", "safetensors", "numpy", "xxhash", "click", "rich")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cuda() -> dict[str, Any]:
    available = torch.cuda.is_available()
    facts: dict[str, Any] = {
        "available": available,
        "built_with": torch.version.cuda,
        "hip": getattr(torch.version, "hip", None),
        "device_count": torch.cuda.device_count() if available else 0,
        "current_device": torch.cuda.current_device() if available else None,
        "devices": [],
        "nccl": None,
    }
    for index in range(facts["device_count"]):
        props = torch.cuda.get_device_properties(index)
        facts["devices"].append(
            {
                "index": index,
                "name": props.name,
                "capability": f"{props.major}.{props.minor}",
                "memory_bytes": props.total_memory,
                "multiprocessors": props.multi_processor_count,
            }
        )
    if available:
        with contextlib.suppress(Exception):  # NCCL is absent from some builds
            nccl: Any = torch.cuda.nccl
            version = nccl.version()
            facts["nccl"] = (
                ".".join(str(v) for v in version) if isinstance(version, tuple) else str(version)
            )
    return facts


def environment() -> dict[str, Any]:
    """Every fact ``env`` prints, as plain JSON-able values."""
    cudnn: Any = torch.backends.cudnn  # untyped module functions
    mps = torch.backends.mps
    xpu = getattr(torch, "xpu", None)
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in _PACKAGES},
        "torch": {
            "version": torch.__version__,
            "debug": bool(torch.version.debug),
            "threads": torch.get_num_threads(),
            "default_dtype": str(torch.get_default_dtype()).removeprefix("torch."),
        },
        "cuda": _cuda(),
        "cudnn": {
            "available": bool(cudnn.is_available()),
            "version": cudnn.version() if cudnn.is_available() else None,
            "enabled": bool(cudnn.enabled),
        },
        "mps": {"available": bool(mps.is_available()), "built": bool(mps.is_built())},
        "xpu": {"available": bool(xpu is not None and xpu.is_available())},
    }


def _gib(count: int) -> str:
    return f"{count / 2**30:.1f} GiB"


def _rows(facts: dict[str, Any]) -> list[tuple[str, str | Text]]:
    rows: list[tuple[str, str | Text]] = [
        ("python", f"{facts['python']} on {facts['platform']}"),
        ("torch", f"{facts['torch']['version']} ({facts['torch']['threads']} CPU threads)"),
    ]
    cuda = facts["cuda"]
    if cuda["available"]:
        rows.append(
            (
                "CUDA",
                f"available: CUDA {cuda['built_with']}, {cuda['device_count']} device(s), "
                f"current cuda:{cuda['current_device']}",
            )
        )
        for device in cuda["devices"]:
            rows.append(
                (
                    f"cuda:{device['index']}",
                    f"{device['name']} (compute {device['capability']}, "
                    f"{_gib(device['memory_bytes'])}, {device['multiprocessors']} SMs)",
                )
            )
        if cuda["nccl"]:
            rows.append(("NCCL", cuda["nccl"]))
    else:
        built = f"built for CUDA {cuda['built_with']}" if cuda["built_with"] else "CPU-only build"
        rows.append(("CUDA", Text(f"not available ({built})", style="yellow")))
    cudnn = facts["cudnn"]
    rows.append(("cuDNN", str(cudnn["version"]) if cudnn["available"] else "not available"))
    mps = facts["mps"]
    if mps["available"]:
        rows.append(("MPS", "available"))
    else:
        rows.append(("MPS", "built, not available" if mps["built"] else "not available"))
    if facts["xpu"]["available"]:
        rows.append(("XPU", "available"))
    for name, version in facts["packages"].items():
        if name != "torch":
            rows.append((name, version or "not installed"))
    return rows


@click.command("env", epilog=EPILOG)
@json_option
@debug_option
def command(as_json: bool) -> None:
    """Print torch, CUDA, cuDNN, MPS and package versions and the visible devices."""
    facts = environment()
    if as_json:
        emit_json(facts)
        return
    print_pairs(console(), _rows(facts), indent=0)
