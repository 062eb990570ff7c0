"""How values read: ``str()``, ``rich.print()`` and notebook HTML from one description, and the
command line showing the same."""

from __future__ import annotations

import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from rich.console import Console

import torchkeep as tk
from torchkeep.cli import main
from torchkeep.models.export import ExportResult
from torchkeep.tools.diff import diff_states
from torchkeep.weights.report import LoadReport, ShapeMismatch

GOLDEN = Path(__file__).parent / "data" / "golden"
HOSTILE = "<script>alert(1)</script>"


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def check_rendering(value: object, *expected: str) -> str:
    """``str(value)``, its rich rendering and its HTML agree and hold ``expected``; the text."""
    text = str(value)
    assert "\x1b" not in text
    for line in expected:
        assert line in text, (line, text)
    recorder = Console(
        record=True, width=200, file=io.StringIO(), color_system="truecolor", soft_wrap=True
    )
    recorder.print(value)
    assert [line.rstrip() for line in recorder.export_text().splitlines()] == text.splitlines()
    page_html = value._repr_html_()  # type: ignore[attr-defined]
    page = _Page()
    page.feed(page_html)
    page.close()
    assert "script" not in page.tags and "<script" not in page_html
    assert not re.search(r"\b(src|href)=", page_html)
    shown = " ".join(page.text)
    for line in expected:
        for word in line.split():
            assert word in shown, (word, page_html)
    one_line = repr(value)
    assert "\n" not in one_line and len(one_line) < 400
    return text


def run(*args: object) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def section(text: str, title: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index(title) + 1
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("  ")), len(lines))
    return lines[start:end]


# ------------------------------------------------------------------------- CheckpointInfo


def test_checkpoint_info_reads_like_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    tk.save({f"{HOSTILE}.weight": torch.zeros(3, 2), "fc.bias": torch.zeros(3)}, path)
    info = tk.inspect(path)
    text = check_rendering(info, "format      safetensors", "tensors     2", HOSTILE)
    assert "&lt;script&gt;" in info._repr_html_()
    assert text == run("inspect", path).rstrip("\n")
    assert repr(info) == f"<CheckpointInfo {path} [safetensors]: 2 tensors, 9 parameters, 36 B>"


def _training_state(tmp_path: Path, layout: str) -> Path:
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3)
    path = tmp_path / ("c.pt" if layout == "pt" else "c")
    tk.save_checkpoint(
        path,
        model=model,
        optimizer=opt,
        scheduler=sched,
        epoch=2,
        step=40,
        args={"batch_size": 8, "name": "run"},
        metrics={"val_loss": 0.5},
        metadata={"note": "first"},
    )
    return path


@pytest.mark.parametrize("layout", ["pt", "native"])
def test_own_checkpoints_hide_bookkeeping_unless_asked(tmp_path: Path, layout: str) -> None:
    path = _training_state(tmp_path, layout)
    info = tk.inspect(path)
    assert not any("__torchkeep__" in k for k in (*info.entries, *info.extras))
    assert "__torchkeep__.created" in info.bookkeeping
    shown = run("inspect", path)
    assert "__torchkeep__" not in shown and "__torchkeep__" not in str(info)
    everything = run("inspect", path, "--all")
    assert "__torchkeep__.created" in everything and "__torchkeep__.format" in everything
    assert "bookkeeping" not in json.loads(run("inspect", path, "--json"))
    assert (
        "__torchkeep__.created"
        in json.loads(run("inspect", path, "--all", "--json"))["bookkeeping"]
    )


def test_pt_and_native_checkpoints_are_summarized_alike(tmp_path: Path) -> None:
    pt, native = (tk.inspect(_training_state(tmp_path, layout)) for layout in ("pt", "native"))
    for info in (pt, native):
        text = check_rendering(
            info,
            "epoch      2",
            "step       40",
            "metrics    val_loss=0.5",
            "args       batch_size=8  name=run",
            "lr=0.1  momentum=0.9",
            "metadata    note=first",
        )
        assert "None" not in text and "{" not in text
    assert section(str(pt), "Training state") == section(str(native), "Training state")
    assert pt.training is not None and pt.training.optimizers[0].type == "SGD"


def test_a_root_scalar_is_a_value_not_a_tensor_dict(tmp_path: Path) -> None:
    path = tmp_path / "tutorial.pt"
    model = torch.nn.Linear(2, 2)
    torch.save(
        {"epoch": 1, "model_state_dict": model.state_dict(), "loss": torch.tensor(0.5)}, path
    )
    info = tk.inspect(path)
    assert info.extras["loss"] == "0.5" and "" not in info.entries
    assert "model_state_dict" not in info.extras  # the chosen entry is not an "other" value
    text = check_rendering(info, "loss   0.5", "epoch  1")
    assert "(root)" not in text and "Other tensor dicts" not in text


def test_a_pickled_model_names_its_classes_without_misleading(tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 2)), path)
    text = check_rendering(tk.inspect(path), "pickled model  torch.nn.modules.container.Sequential")
    assert "?" not in text and "not imported" not in text
    assert "torch.nn.modules.linear.Linear" in text and "stand-ins" in text


def test_golden_checkpoint_dict_strings_print_plainly() -> None:
    info = tk.inspect(GOLDEN / "net_checkpoint.pt")
    text = check_rendering(info, "Training state", "Modules")
    assert not re.search(r"=\'", text)


# --------------------------------------------------------------------------- ModuleInfo


def test_module_info_shows_tree_counts_devices_and_gradient_norms() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    model[0].requires_grad_(False)
    model(torch.ones(1, 3)).sum().backward()
    info = tk.inspect(model)
    text = check_rendering(
        info, "trainable   3", "frozen      8", "devices     cpu (4)", "grad norm", "(Linear)"
    )
    assert text.splitlines()[0] == info.summary()
    assert repr(info) == f"<ModuleInfo {info.summary()}>"


# --------------------------------------------------------- LoadReport, DiffReport, Export


def test_load_report_prints_its_table() -> None:
    report = LoadReport(
        "m.pt",
        "torch-zip",
        "",
        loaded=("a",),
        missing=(HOSTILE,),
        mismatched=(ShapeMismatch("w", "w", (2,), (3,)),),
    )
    text = check_rendering(
        report, "1 loaded, 1 missing, 1 shape mismatches", "file [2] vs model [3]"
    )
    assert text == report.table()
    assert "&lt;script&gt;" in report._repr_html_()


def test_diff_report_reads_like_the_command_line(tmp_path: Path) -> None:
    a = {"w": torch.zeros(2), HOSTILE: torch.ones(1)}
    b = {"w": torch.ones(2)}
    report = diff_states(a, b)
    check_rendering(report, "A: a", "B: b", "removed", "values", "different: 1 tensors compared")
    tk.save(a, tmp_path / "a.safetensors")
    tk.save(b, tmp_path / "b.safetensors")
    result = CliRunner().invoke(
        main, ["diff", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]
    )
    assert result.exit_code == 1
    assert "different: 1 tensors compared" in result.stdout and HOSTILE in result.stdout


def test_export_result_keeps_its_line() -> None:
    result = ExportResult(
        "m.pt2", "export", "torch.export", 0.0, True, 1e-5, 1e-4, "", (2, 5), True
    )
    line = "m.pt2 [export via torch.export]: matches the eager model at batch 2 and 5"
    assert check_rendering(result, line).startswith(line)


# ------------------------------------------------------------------------------- verify


def test_verify_of_a_torch_zip_counts_crcs_and_tensors() -> None:
    result = tk.verify(GOLDEN / "net_state_dict.pt")
    assert (result.crcs, result.unpickled, result.checksums) == (15, 9, 0)
    line = "15 records (CRC-32) checked, 9 tensors read through the allowlist"
    check_rendering(result, f"OK {GOLDEN / 'net_state_dict.pt'} [torch-zip]: {line}")
    data = json.loads(run("verify", GOLDEN / "net_state_dict.pt", "--json"))
    assert {"tensors", "checksums", "problems", "notes", "ok"} <= set(data)
    assert data["crcs"] == 15


def test_verify_failure_lists_problems() -> None:
    result = tk.verify(GOLDEN / "truncated.safetensors")
    text = check_rendering(result, "FAILED", "problem")
    assert text.splitlines()[0].endswith("1 problem")
