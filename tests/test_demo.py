"""`make demo` runs examples/demo.py: it must finish, and what it says must be what happened.

The checks look at the files the demo leaves and at the few lines of its story that state a
result (exact resume, intact checkpoint); the rest of its output is free to change.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import torchkeep as tk

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "demo.py"


@pytest.mark.slow
def test_demo_runs_and_tells_what_happened(tmp_path: Path) -> None:
    paths = [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    done = subprocess.run(
        [sys.executable, str(DEMO)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output

    # The training process was killed while writing step 20; step 15 was intact and resumed.
    assert "killed with SIGKILL" in output
    assert "torn (interrupted save)" in output
    assert "the checkpoint of step 15 is intact: tk.verify says OK" in output
    assert "resumed from the checkpoint of step 15" in output
    assert "bit-for-bit identical" in output
    assert "NOT identical" not in output
    assert "the command ran: False" in output

    # The resumed run saved on: its last three checkpoints, no leftover of the killed save.
    manager = tk.CheckpointManager(tmp_path / "demo-output" / "run", keep_last=3)
    assert manager.steps() == [25, 30, 32]
    assert manager.torn() == []
    assert tk.verify(manager.path(32)).ok
    assert not (tmp_path / "demo-output" / "pwned").exists()
