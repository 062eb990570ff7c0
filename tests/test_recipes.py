"""docs/recipes.md runs: every snippet on the page is executed and every output it shows is
compared with what the code prints.

How the page is read:

- The page is cut into sections at its ``## `` headings; the text before the first one (the
  title and the table of contents) holds no code.
- The first section ("The model used below") is the prelude. Its first ```python block is
  written to ``models.py`` in each section's folder and imported as the module ``models`` (so
  ``from models import Net`` works, pickles name ``models.Net`` and TorchScript finds the
  source). Its other ```python blocks run at the start of every other section.
- Every other section runs in a namespace and a working directory of its own (``tmp_path``),
  its blocks in page order.
- A ```python block is executed. A ```text block right after it is what the block prints,
  compared as doctest compares output with ``ELLIPSIS`` (``...`` matches anything). When that
  text starts with ``Traceback (most recent call last):`` the block must raise instead: the
  indented traceback lines are skipped and the rest is compared with ``ClassName: message``.
- A ```console block holds ``$ torchkeep ...`` commands, each followed by its expected output
  (compared the same way); each runs through the ``torchkeep`` script of the interpreter
  running the tests, in the section's folder, and must exit 0.
- An HTML comment ``<!-- test-setup ... -->`` holds code run at its place without being shown
  on the page; it sees ``GOLDEN`` (tests/data/golden) and ``shutil``.
- Any other fenced block fails ``test_page_structure``, so a misspelt fence language cannot
  hide a snippet from the test.
"""

from __future__ import annotations

import contextlib
import doctest
import importlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

PAGE = Path(__file__).resolve().parents[1] / "docs" / "recipes.md"
GOLDEN = Path(__file__).parent / "data" / "golden"
TRACEBACK = "Traceback (most recent call last):"
KINDS = ("python", "text", "console", "test-setup")
_FLAGS = doctest.ELLIPSIS


@dataclass(frozen=True)
class Block:
    """One fenced block (or hidden setup comment) of the page: its kind, text and first line."""

    kind: str
    code: str
    line: int


@dataclass
class Section:
    title: str
    line: int
    blocks: list[Block] = field(default_factory=list)


def parse(text: str) -> tuple[list[Section], list[str]]:
    """The page's sections and the lines before the first one (title, table of contents)."""
    lines = text.splitlines()
    sections: list[Section] = []
    head: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        opening = re.fullmatch(r"```(\S*)\s*", line)
        if opening or line.strip() == "<!-- test-setup":
            kind = opening.group(1) if opening else "test-setup"
            end = "```" if opening else "-->"
            start = i + 1
            i = start
            while i < len(lines) and lines[i].strip() != end:
                i += 1
            assert i < len(lines), f"{PAGE.name}:{start}: block never closed"
            assert sections, f"{PAGE.name}:{start}: a code block before the first section"
            sections[-1].blocks.append(Block(kind, "\n".join(lines[start:i]) + "\n", start + 1))
        elif line.startswith("## "):
            sections.append(Section(line[3:].strip(), i + 1))
        elif not sections:
            head.append(line)
        i += 1
    return sections, head


SECTIONS, HEAD = parse(PAGE.read_text(encoding="utf-8"))
PRELUDE, RECIPES = SECTIONS[0], SECTIONS[1:]


def slug(title: str) -> str:
    """The anchor GitHub gives a heading."""
    text = re.sub(r"[^\w\- ]", "", title.lower())
    return text.replace(" ", "-")


def check_output(want: str, got: str, where: str) -> None:
    checker = doctest.OutputChecker()
    want = want if want.endswith("\n") else want + "\n"
    if not checker.check_output(want, got, _FLAGS):
        example = doctest.Example("", want)
        diff = checker.output_difference(example, got, _FLAGS)
        pytest.fail(f"{where}: the output differs from the page.\n{diff}", pytrace=False)


def expected_error(want: str) -> str:
    """The ``ClassName: message`` part of an expected traceback."""
    rest = want.splitlines()[1:]
    while rest and rest[0].startswith((" ", "\t")):
        rest = rest[1:]
    return "\n".join(rest) + "\n"


def run_python(block: Block, namespace: dict[str, Any], want: str | None) -> None:
    """Execute ``block`` in ``namespace``; compare what it prints (or raises) with ``want``."""
    where = f"{PAGE.name}:{block.line}"
    # Padded so that tracebacks point at the page's own lines.
    code = compile("\n" * (block.line - 1) + block.code, str(PAGE), "exec")
    out = io.StringIO()
    raises = want is not None and want.startswith(TRACEBACK)
    try:
        with contextlib.redirect_stdout(out):
            exec(code, namespace)
    except Exception as exc:
        if not raises:
            raise
        assert want is not None
        check_output(expected_error(want), f"{type(exc).__name__}: {exc}\n", where)
        return
    if raises:
        pytest.fail(f"{where}: the page shows this block raising, but it ran", pytrace=False)
    if want is not None:
        check_output(want, out.getvalue(), where)


def torchkeep_command() -> list[str]:
    script = Path(sys.executable).with_name("torchkeep")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "torchkeep"]


def run_console(block: Block, cwd: Path) -> None:
    """Run each ``$ torchkeep ...`` line of ``block`` and compare its output with the page."""
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    env.pop("FORCE_COLOR", None)
    env.pop("TORCHKEEP_DEBUG", None)
    commands: list[tuple[str, list[str], int]] = []
    for offset, text in enumerate(block.code.splitlines()):
        if text.startswith("$ "):
            commands.append((text[2:], [], block.line + offset))
        else:
            commands[-1][1].append(text)
    for command, want, line in commands:
        args = shlex.split(command)
        assert args[0] == "torchkeep", f"{PAGE.name}:{line}: only torchkeep commands run"
        done = subprocess.run(
            [*torchkeep_command(), *args[1:]],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        where = f"{PAGE.name}:{line}: {command}"
        assert done.returncode == 0, f"{where} exited {done.returncode}:\n{done.stderr}"
        check_output("\n".join(want), done.stdout, where)


def run_section(section: Section, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the prelude and then ``section``'s blocks in ``folder``."""
    model_code, *prelude = [b for b in PRELUDE.blocks if b.kind == "python"]
    (folder / "models.py").write_text(model_code.code, encoding="utf-8")
    monkeypatch.chdir(folder)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "models", raising=False)
    importlib.invalidate_caches()
    importlib.import_module("models")
    namespace: dict[str, Any] = {"__name__": "__recipes__"}
    for block in prelude:
        run_python(block, namespace, None)
    blocks = section.blocks
    for index, block in enumerate(blocks):
        following = blocks[index + 1] if index + 1 < len(blocks) else None
        if block.kind == "python":
            want = following.code if following and following.kind == "text" else None
            run_python(block, namespace, want)
        elif block.kind == "test-setup":
            namespace.update(GOLDEN=GOLDEN, shutil=shutil)
            run_python(block, namespace, None)
        elif block.kind == "console":
            run_console(block, folder)


def _params() -> list[Any]:
    return [
        pytest.param(
            section,
            id=slug(section.title),
            marks=[pytest.mark.slow] if any(b.kind == "console" for b in section.blocks) else [],
        )
        for section in RECIPES
    ]


@pytest.mark.parametrize("section", _params())
def test_recipe_runs(section: Section, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_section(section, tmp_path, monkeypatch)


def test_page_structure() -> None:
    assert PRELUDE.title == "The model used below"
    assert sum(b.kind == "python" for b in PRELUDE.blocks) >= 2
    links = re.findall(r"^\d+\. \[.+\]\(#([^)]+)\)$", "\n".join(HEAD), flags=re.MULTILINE)
    assert links == [slug(s.title) for s in SECTIONS], "the table of contents is out of date"
    for section in SECTIONS:
        previous = None
        for block in section.blocks:
            where = f"{PAGE.name}:{block.line}"
            assert block.kind in KINDS, f"{where}: unknown block kind {block.kind!r}"
            if block.kind == "text":
                assert previous == "python", f"{where}: output that follows no python block"
            if block.kind == "console":
                assert block.code.startswith("$ torchkeep "), f"{where}: not a torchkeep command"
            previous = block.kind
    for section in RECIPES:
        assert any(b.kind == "python" for b in section.blocks), section.title


# The harness itself must be able to fail: wrong output, a missing or a different error.


def test_harness_catches_wrong_output() -> None:
    block = Block("python", "print(1 + 1)\n", 1)
    run_python(block, {}, "2\n")
    with pytest.raises(pytest.fail.Exception, match="output differs"):
        run_python(block, {}, "3\n")


def test_harness_catches_a_missing_or_different_error() -> None:
    raising = Block("python", "raise ValueError('bad value')\n", 1)
    run_python(raising, {}, f"{TRACEBACK}\n  ...\nValueError: bad ...\n")
    with pytest.raises(pytest.fail.Exception, match="output differs"):
        run_python(raising, {}, f"{TRACEBACK}\n  ...\nKeyError: ...\n")
    with pytest.raises(pytest.fail.Exception, match="but it ran"):
        run_python(Block("python", "pass\n", 1), {}, f"{TRACEBACK}\nValueError: x\n")
    with pytest.raises(ValueError):
        run_python(raising, {}, None)
