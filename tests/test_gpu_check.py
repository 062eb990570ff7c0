"""benchmarks/gpu_check.py (`make gpu-check`) on a machine without a GPU: its CPU dry run."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
HEADINGS = (
    "=== a. environment ===",
    "=== b. CUDA tests ===",
    "=== c. CUDA checks ===",
    "=== d. GPU benchmark ===",
    "=== e. summary ===",
)


@pytest.fixture
def gpu_check(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_cpu_dry_run_runs_every_step(tmp_path: Path) -> None:
    out = tmp_path / "gpu-check.json"
    command = [sys.executable, str(SCRIPT), "--cpu-dry-run", "--size-mb", "8", "--runs", "1"]
    command += ["--out", str(out), "--dir", str(tmp_path / "work")]
    # Hidden devices: on a GPU machine too, the dry run is the CPU's.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    for heading in HEADINGS:
        assert heading in done.stdout
    for title in ("environment", "CUDA tests", "CUDA checks", "GPU benchmark"):
        assert f"PASS  {title}" in done.stdout
    assert "FAIL" not in done.stdout
    assert "skipped, as expected without CUDA" in done.stdout

    result = json.loads(out.read_text())
    assert result["mode"] == "cpu-dry-run" and result["ok"] is True
    assert set(result) >= {"environment", "cuda_tests", "checks", "benchmark", "steps", "total_s"}
    assert set(result["steps"]) == {"environment", "cuda_tests", "cuda_checks", "benchmark"}
    assert result["environment"]["cuda_available"] is False
    assert result["cuda_tests"]["returncode"] == 0 and result["cuda_tests"]["unlisted"] == []
    assert result["cuda_tests"]["counts"]["skipped"] >= 6  # the CUDA tests, skipped here
    statuses = {check["status"] for check in result["checks"]}
    assert statuses == {"PASS", "SKIP"}
    skipped = [check for check in result["checks"] if check["status"] == "SKIP"]
    assert all("no CUDA" in check["detail"] for check in skipped)
    bench = result["benchmark"]
    assert bench["device"] == "cpu" and bench["values_equal"] is True
    assert {row["operation"] for row in bench["rows"]} == {
        "load into a model on cpu",
        "load a state dict onto cpu",
    }
    for row in bench["rows"]:
        assert set(row["seconds"]) == {"torchkeep", "safetensors", "torch"}
        assert row["vs_safetensors"] > 0 and row["vs_torch"] > 0
    assert set(bench["async_save"]) >= {"blocked_s", "blocking_save_s", "stall_pct"}
    assert not (tmp_path / "work").exists()  # the files it wrote are removed


def test_without_cuda_it_exits_2_and_says_why(
    gpu_check: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 2
    captured = capsys.readouterr()
    assert "CUDA is not available" in captured.err
    assert "--cpu-dry-run" in captured.err
    assert "=== b." not in captured.out  # nothing past the environment ran


def test_every_test_that_needs_cuda_is_listed(gpu_check: ModuleType) -> None:
    assert gpu_check.unlisted_cuda_tests() == []


def test_an_unlisted_cuda_test_is_found(
    gpu_check: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_new.py").write_text(
        "needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='')\n\n"
        "def test_plain():\n    pass\n\n"
        "@needs_cuda\ndef test_new_on_gpu():\n    pass\n\n"
        "@pytest.mark.parametrize('d', [pytest.param('cuda', marks=needs_cuda)])\n"
        "def test_param(d):\n    pass\n"
    )
    monkeypatch.setattr(gpu_check, "ROOT", tmp_path)
    assert gpu_check.unlisted_cuda_tests() == [
        "tests/test_new.py::test_new_on_gpu",
        "tests/test_new.py::test_param",
    ]
