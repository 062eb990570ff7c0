"""Shared fixtures: the golden files and the small models they were written from."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

GOLDEN = Path(__file__).parent / "data" / "golden"

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class Net(nn.Module):
    """The model the golden files were written from (tests/data/make_golden.py)."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight


class Backbone(nn.Module):
    """A model whose classifier is replaced in fine-tuning tests."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))
        self.head = nn.Linear(16, classes)


# torch's deterministic-algorithms mode as the session starts.
_DETERMINISTIC = torch.are_deterministic_algorithms_enabled()
_WARN_ONLY = torch.is_deterministic_algorithms_warn_only_enabled()


@pytest.fixture(autouse=True)
def _keep_deterministic_mode() -> Iterator[None]:
    """Put back, after every test, the mode Lightning's ``deterministic=True`` turns on for
    the whole process (also from module-scoped fixtures, which run before this one), so no
    later test runs under it."""
    yield
    torch.use_deterministic_algorithms(_DETERMINISTIC, warn_only=_WARN_ONLY)


@pytest.fixture(scope="session")
def manifest() -> dict[str, Any]:
    return json.loads((GOLDEN / "MANIFEST.json").read_text())


@pytest.fixture(scope="session")
def reference() -> dict[str, torch.Tensor]:
    """The values every net_* golden file holds."""
    return torch.load(GOLDEN / "net_state_dict.pt", weights_only=True)


def assert_same_state(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert list(state) == list(expected)
    for name, value in expected.items():
        assert torch.equal(state[name].cpu(), value.cpu()), name


def peak_rss_mib(args: list[str]) -> float:
    """VmHWM of a fresh ``torchkeep`` process running ``args`` (ru_maxrss would inherit the
    forking parent's). torch is imported first, so that every measurement starts from the same
    baseline (some commands do not need torch)."""
    code = (
        "import sys\nimport torch\nfrom torchkeep.cli import main\n"
        "try:\n    main(args=sys.argv[1:], prog_name='torchkeep')\n"
        "except SystemExit as exc:\n    assert not exc.code, exc.code\n"
        "hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
        "print('PEAK', hwm.split()[1], file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300
    )
    assert "PEAK" in done.stderr, done.stderr
    return int(done.stderr.split("PEAK")[1]) / 1024


# The largest tensor of :func:`write_big_state`; every other one is 4 MiB.
BIG_LARGEST = 16 << 20


def write_big_state(save: Any, path: Path) -> None:
    """A state of over 200 MB (48 tensors of 4 MiB and one of 16 MiB), written by ``save``."""
    tensors = {f"layer{i}.weight": torch.randn(1 << 20) for i in range(48)}
    tensors["embed.weight"] = torch.randn(BIG_LARGEST // 4)
    save(tensors, path)
    assert path.stat().st_size > 200 * 2**20


def assert_convert_streams(source: Path, folder: Path, baseline_args: list[str]) -> None:
    """``torchkeep convert`` of ``source`` into safetensors, bf16, shards and a torch zip holds
    about one tensor at a time (peak memory over the baseline command's below 4 largest
    tensors), and the measurement can tell: a legacy torch output, held whole, costs the
    file's size."""
    size_mib = source.stat().st_size / 2**20
    baseline = peak_rss_mib(baseline_args)
    streamed = {
        "safetensors": peak_rss_mib(["convert", str(source), str(folder / "o.safetensors")]),
        "bf16": peak_rss_mib(
            ["convert", str(source), str(folder / "b.safetensors"), "--dtype", "bfloat16"]
        ),
        "sharded": peak_rss_mib(
            ["convert", str(source), str(folder / "shards"), "--shard-size", "50MB"]
        ),
        "torch zip": peak_rss_mib(["convert", str(source), str(folder / "o.pt")]),
    }
    whole = peak_rss_mib(
        ["convert", str(source), str(folder / "legacy.pt"), "--format", "torch-legacy"]
    )
    print(
        f"\nfile {size_mib:.0f} MiB, baseline {baseline:.0f} MiB; over baseline: "
        + ", ".join(f"{k} +{v - baseline:.0f} MiB" for k, v in streamed.items())
        + f"; legacy torch output (not streamed) +{whole - baseline:.0f} MiB"
    )
    for label, peak in streamed.items():
        assert peak - baseline < 4 * BIG_LARGEST / 2**20, (label, peak, baseline)
    assert whole - baseline > 0.8 * size_mib
