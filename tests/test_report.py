"""The HTML report: what the page holds, that it fetches nothing, and how a browser draws it."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import torchkeep as tk
from torchkeep.cli import main
from torchkeep.errors import MissingDependencyError
from torchkeep.tools import report as report_module
from torchkeep.tools.diff import diff_states
from torchkeep.tools.stats import tensor_stats

needs_matplotlib = pytest.mark.skipif(
    find_spec("matplotlib") is None,
    reason="matplotlib not installed: pip install torchkeep[report]",
)

NAN_TENSOR = "backbone.2.bias"
HEADINGS = [
    "Summary",
    "NaN and Inf values",
    "Changes from A to B",
    "Parameters by module",
    "Parameters by dtype",
    "Module tree",
    "Tensor statistics",
    "Histograms of the largest tensors",
]


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A: a small model. B: it fine-tuned with its first layer frozen, one tensor holding
    a NaN, the frozen bias renamed and a tensor added."""
    folder = tmp_path_factory.mktemp("report")
    torch.manual_seed(0)
    model = Small()
    tk.save(model, folder / "a.safetensors")
    model.backbone[0].requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(16, 8)), torch.randint(4, (16,))).backward()
        optimizer.step()
    state = {name: value.detach().clone() for name, value in model.state_dict().items()}
    state[NAN_TENSOR][5] = float("nan")
    state["input.bias"] = state.pop("backbone.0.bias")
    state["head.scale"] = torch.ones(4)
    tk.save(state, folder / "b.pt")
    return folder / "a.safetensors", folder / "b.pt"


class Page(HTMLParser):
    """Headings, tags and attributes of an HTML page, and the text of each section."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.headings: list[str] = []
        self.tags: dict[str, int] = {}
        self.attrs: list[tuple[str, str, str]] = []
        self.scripts: list[dict[str, str | None]] = []
        self.sections: dict[str, str] = {}
        self._section: str | None = None
        self._heading = False
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] = self.tags.get(tag, 0) + 1
        self.attrs += [(tag, name, value or "") for name, value in attrs]
        if tag == "script":
            self.scripts.append(dict(attrs))
        if tag == "section":
            self._section = dict(attrs)["id"]
            self.sections[self._section or ""] = ""
        self._heading = tag == "h2"

    def handle_endtag(self, tag: str) -> None:
        self._heading = False

    def handle_data(self, data: str) -> None:
        if self._heading:
            self.headings.append(data.strip())
        if self._section is not None:
            self.sections[self._section] += data


def render(tmp_path: Path, *paths: Path, **options: object) -> tuple[Path, Page]:
    out = tmp_path / "report.html"
    written = tk.report(*paths, out=out, **options)  # type: ignore[arg-type]
    assert written == out
    return out, Page(out.read_text(encoding="utf-8"))


@needs_matplotlib
def test_a_comparison_shows_every_section_and_each_change(
    tmp_path: Path, pair: tuple[Path, Path]
) -> None:
    _, page = render(tmp_path, *pair)
    assert page.headings == HEADINGS
    findings = page.sections["findings"]
    assert "1 tensor holds NaN or Inf values" in findings
    assert NAN_TENSOR in findings
    changes = page.sections["changes"]
    assert "backbone.0.bias" in changes and "input.bias" in changes  # renamed, same values
    assert "head.scale" in changes  # added
    assert "Relative change per layer" in changes
    # The per-layer chart, one bar chart for modules and one for dtypes, six histograms.
    assert page.tags["svg"] == 1 + 2 + 6
    # Every tensor of B has a statistics row; the NaN one is marked.
    assert page.sections["statistics"].count("float32") == 7
    assert ("tr", "class", "bad") in page.attrs


@needs_matplotlib
def test_the_page_fetches_nothing(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    out, page = render(tmp_path, *pair)
    text = out.read_text(encoding="utf-8")
    links = [(tag, name, value) for tag, name, value in page.attrs if name in ("src", "href")]
    assert links, "the page has in-page links to check"
    assert all(value.startswith("#") for _, _, value in links), links
    assert page.scripts == []  # no script at all, inline or not
    assert "link" not in page.tags and "img" not in page.tags and "iframe" not in page.tags
    assert "@import" not in text and "@font-face" not in text
    assert re.findall(r"url\((?!#)", text) == []  # in-page references (clip paths) only
    assert "Content-Security-Policy" in text and "default-src 'none'" in text


@needs_matplotlib
def test_one_checkpoint_has_no_changes_section(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    _, page = render(tmp_path, pair[0], top=2)
    assert page.headings == [h for h in HEADINGS if h != "Changes from A to B"]
    assert page.tags["svg"] == 2 + 2
    assert "No NaN or Inf value" in page.sections["findings"]


@needs_matplotlib
def test_names_in_a_checkpoint_are_text_not_markup(tmp_path: Path) -> None:
    path = tmp_path / "odd.safetensors"
    tk.save({'<script>alert("x")</script>.w': torch.randn(3), "a&b.w": torch.zeros(2)}, path)
    out, page = render(tmp_path, path)
    assert page.scripts == []
    assert "&lt;script&gt;" in out.read_text(encoding="utf-8")
    assert 'alert("x")' in page.sections["statistics"]


@needs_matplotlib
def test_long_tables_are_cut_with_a_note(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report_module, "MAX_ROWS", 4)
    path = tmp_path / "many.safetensors"
    tk.save({f"layers.{i}.w": torch.randn(i + 1) for i in range(10)}, path)
    _, page = render(tmp_path, path, top=0)
    statistics = page.sections["statistics"]
    assert "Showing the largest 4 of 10 tensors" in statistics
    assert "layers.9.w" in statistics and "layers.5.w" not in statistics
    assert "No tensor to draw" in page.sections["histograms"]


def test_histograms_count_every_finite_value() -> None:
    values = torch.tensor([0.0, 1.0, 1.0, 2.0, float("nan"), float("inf"), 3.0])
    stats = tensor_stats("x", values)
    hist = report_module._histogram("x", values, stats)
    assert sum(hist.counts) == 5 and hist.left_out == 2
    assert (hist.low, hist.high) == (0.0, 3.0)
    assert hist.counts[0] == 1 and hist.counts[-1] == 1


def test_layer_change_is_the_relative_norm_over_the_layer() -> None:
    a = {"blocks.0.w": torch.tensor([3.0, 4.0]), "blocks.0.b": torch.tensor([0.0, 0.0])}
    b = {"blocks.0.w": torch.tensor([3.0, 5.0]), "blocks.0.b": torch.tensor([1.0, 1.0])}

    def squares(state: dict[str, torch.Tensor]) -> dict[str, float | None]:
        return {
            name: report_module._square_norm(tensor_stats(name, t)) for name, t in state.items()
        }

    changes = diff_states(a, b)
    (layer,) = report_module.layer_changes(changes, squares(a), squares(b), {"blocks.0.b"})
    assert layer.name == "blocks.0" and layer.bad
    # ||b - a|| over the layer: (0, 1) and (1, 1); ||a||: (3, 4) and (0, 0).
    assert math.isclose(layer.rel, math.sqrt(1 + 2) / 5)
    (alone,) = report_module.layer_changes(changes, {"blocks.0.b": 0.0}, squares(b), set())
    assert alone.rel == math.inf  # A all zeros, B not
    assert report_module.layer_of("model.layers.12.mlp.up.weight") == "model.layers.12"
    assert report_module.layer_of("fc.weight") == "fc"
    assert report_module.layer_of("scale") == "scale"


@needs_matplotlib
def test_progress_reaches_the_total(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    seen: list[tuple[int, int]] = []
    tk.report(
        *pair, out=tmp_path / "r.html", progress=lambda done, total: seen.append((done, total))
    )
    assert seen and all(done <= total for done, total in seen)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    assert seen[-1][0] == seen[-1][1]


def test_without_matplotlib_the_error_names_the_extra(
    tmp_path: Path, pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "report.html"
    with pytest.raises(MissingDependencyError, match=r"pip install torchkeep\[report\]"):
        tk.report(pair[0], out=out)
    result = CliRunner().invoke(main, ["report", str(pair[0]), "-o", str(out)])
    assert result.exit_code == 2
    assert "pip install torchkeep[report]" in result.output
    assert not out.exists()


@needs_matplotlib
def test_the_command_writes_the_page(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    out = tmp_path / "changes.html"
    result = CliRunner().invoke(main, ["report", *map(str, pair), "-o", str(out), "--top", "1"])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.stdout
    assert Page(out.read_text(encoding="utf-8")).tags["svg"] == 1 + 2 + 1
    missing = CliRunner().invoke(main, ["report", str(tmp_path / "nope.pt"), "-o", str(out)])
    assert missing.exit_code == 2 and "does not exist" in missing.output


def _chromium() -> str | None:
    return next(
        (found for name in ("chromium", "chromium-browser") if (found := shutil.which(name))),
        None,
    )


@pytest.mark.slow
@needs_matplotlib
@pytest.mark.skipif(_chromium() is None, reason="chromium not installed: run `make browser`")
def test_a_browser_draws_the_page(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    out, _ = render(tmp_path, *pair)
    browser = [str(_chromium()), "--headless", "--disable-gpu", "--no-sandbox"]
    url = out.resolve().as_uri()
    dom = subprocess.run(
        [*browser, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    page = Page(dom)
    assert page.headings == HEADINGS
    assert page.tags.get("svg", 0) == 9 and page.tags.get("path", 0) > 100  # bars drawn
    assert "1 tensor holds NaN or Inf values" in page.sections["findings"]
    shot = tmp_path / "report.png"
    subprocess.run(
        [*browser, f"--screenshot={shot}", "--window-size=1200,3000", url],
        capture_output=True,
        timeout=120,
        check=True,
    )
    print(f"screenshot: {shot}")
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size == (1200, 3000)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    # A blank or error page has a handful of colours; charts and tables have many.
    assert colours is None or len(colours) > 50
