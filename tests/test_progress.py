"""progress= on the verbs that move many bytes: off by default, a bar, or a callback."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import torchkeep as tk
from torchkeep.io import read as io_read
from torchkeep.io import write as io_write

Calls = list[tuple[int, int]]


def recorder() -> tuple[Calls, Callable[[int, int], None]]:
    calls: Calls = []
    return calls, lambda done, total: calls.append((done, total))


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(256, 256) for _ in range(6)])


def nbytes(model: nn.Module) -> int:
    return sum(t.nbytes for t in model.state_dict().values())


def check(calls: Calls, total: int) -> None:
    assert calls, "no progress was reported"
    assert calls[-1] == (total, total)
    assert all(t == total for _, t in calls)
    done = [d for d, _ in calls]
    assert done == sorted(done) and all(0 <= d <= total for d in done)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("net.safetensors", {}),
        ("shards", {"max_shard_size": "200KB"}),
        ("net.pt", {}),
    ],
)
@pytest.mark.parametrize("threads", ["1", "4"])
def test_save_and_load_report_every_byte(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    options: dict[str, str],
    threads: str,
) -> None:
    monkeypatch.setenv("TORCHKEEP_IO_THREADS", threads)
    # Even this small state goes through the threaded paths (with threads > 1).
    monkeypatch.setattr(io_read, "SEQUENTIAL_BELOW", 0)
    monkeypatch.setattr(io_write, "SEQUENTIAL_BELOW", 0)
    model = net()
    saved, on_save = recorder()
    tk.save(model, tmp_path / name, progress=on_save, **options)  # type: ignore[arg-type]
    check(saved, nbytes(model))
    loaded, on_load = recorder()
    other = nn.Sequential(*[nn.Linear(256, 256) for _ in range(6)])
    assert tk.load(other, tmp_path / name, progress=on_load).ok
    check(loaded, nbytes(model))
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters(), strict=True)
    )


def test_convert_and_verify_report_progress(tmp_path: Path) -> None:
    model = net()
    tk.save(model, tmp_path / "net.pt")
    converted, on_convert = recorder()
    tk.convert(tmp_path / "net.pt", tmp_path / "net.safetensors", progress=on_convert)
    check(converted, nbytes(model))
    verified, on_verify = recorder()
    assert tk.verify(tmp_path / "net.safetensors", progress=on_verify).ok
    assert verified and verified[-1][0] == nbytes(model)


def test_progress_true_draws_a_bar_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tk.save(net(), tmp_path / "net.safetensors", progress=True)
    tk.load(net(), tmp_path / "net.safetensors", progress=True)
    err = capsys.readouterr().err
    assert "saving net.safetensors" in err and "loading net.safetensors" in err


def test_no_progress_by_default(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tk.save(net(), tmp_path / "net.safetensors")
    tk.load(net(), tmp_path / "net.safetensors", progress=False)
    assert capsys.readouterr().err == ""


def test_a_progress_that_is_not_a_function_is_refused(tmp_path: Path) -> None:
    with pytest.raises(tk.InvalidArgumentError, match="progress="):
        tk.save(net(), tmp_path / "net.safetensors", progress="yes")  # type: ignore[arg-type]
    assert not (tmp_path / "net.safetensors").exists()


def test_diff_reports_progress(tmp_path: Path) -> None:
    tk.save(net(), tmp_path / "a.safetensors")
    tk.save(net(), tmp_path / "b.safetensors")
    calls, on_diff = recorder()
    assert tk.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors", progress=on_diff).same()
    assert calls and calls[-1][0] == calls[-1][1] == 2 * nbytes(net())  # both files read


def test_quiet_turns_the_command_lines_bars_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from torchkeep.cli import _output, main

    drawn: list[str] = []

    @contextlib.contextmanager
    def bar(description: str, **_: object) -> Iterator[Callable[[int, int], None]]:
        drawn.append(description)
        yield lambda done, total: None

    monkeypatch.setattr(_output, "bar", bar)
    tk.save(net(), tmp_path / "net.pt")
    args = ["convert", str(tmp_path / "net.pt"), str(tmp_path / "a.safetensors")]
    assert CliRunner().invoke(main, args).exit_code == 0
    assert drawn == ["converting"]
    quiet = ["--quiet", *args[:2], str(tmp_path / "b.safetensors")]
    assert CliRunner().invoke(main, quiet).exit_code == 0
    assert drawn == ["converting"]  # no second bar
