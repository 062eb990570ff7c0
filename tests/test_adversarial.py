"""Hostile files against every verb: nothing runs, nothing is written, nothing crashes or hangs.

The corpus (tests/adversarial/) is generated once per session. Every (file, verb) pair runs in
worker processes (tests/adversarial/worker.py), never in the test process: the worker records
the outcome, whether a marker file appeared, whether an allowlisted class or function changed,
and whether a module the file names was imported. A segfault or a hang is recorded for the one
pair that caused it. The tests below only read those records.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from adversarial.corpus import CASES, CLI_VERBS, STRICT_VERBS, VARIANTS, Case, build_corpus
from adversarial.runner import run_jobs

pytestmark = pytest.mark.slow  # every test reads one session-wide run of worker processes

LIB_JOBS = [(case, verb) for case in CASES for verb in case.verbs()]
CLI_JOBS = [(case, verb) for case in CASES if not case.only for verb in CLI_VERBS]


def _key(case: Case, verb: str) -> str:
    return f"{case.id}:{verb}"


def _job(case: Case, verb: str, path: str) -> dict[str, Any]:
    return {
        "key": _key(case, verb),
        "verb": verb,
        "path": path,
        "timeout": case.timeout,
        "case": {"marker_name": case.marker_name, "module": case.module, "check": case.check},
    }


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("adversarial")
    built = build_corpus(root)
    (root / "built.json").write_text(built.to_json())
    return built


@pytest.fixture(scope="session")
def outcomes(corpus: Any) -> dict[str, Any]:
    light: list[dict[str, Any]] = []
    heavy: list[dict[str, Any]] = []
    for case, verb in LIB_JOBS:
        (heavy if case.heavy else light).append(_job(case, verb, corpus.paths[case.id]))
    for case, verb in CLI_JOBS:
        (heavy if case.heavy else light).append(_job(case, f"cli_{verb}", corpus.paths[case.id]))
    half = len(light) // 2
    lanes = [light[:half], light[half:], heavy]
    return run_jobs(str(Path(corpus.root) / "built.json"), lanes)


def _describe(record: dict[str, Any]) -> str:
    if record.get("outcome") == "error":
        return f"{record['type']}: {record['message'][:300]}"
    return str({k: v for k, v in record.items() if k != "traceback"})[:600]


def _common(record: dict[str, Any]) -> None:
    """What must hold for every file and verb, whatever the outcome."""
    assert record["outcome"] != "crash", (
        f"the process died: {record.get('returncode')}: " + str(record.get("stderr", ""))[-300:]
    )
    assert record["outcome"] != "hang", "no answer within the deadline"
    assert not record["markers"], f"the payload ran: it created {record['markers']}"
    assert not record["mutated"], f"allowlisted objects were changed: {record['mutated']}"
    assert not record["imported"], "a module the file names was imported"
    assert not record["new_modules"], f"modules were imported: {record['new_modules']}"


def _assert_expected(case: Case, verb: str, record: dict[str, Any], strict: bool) -> None:
    expect = case.expectation(verb)
    if record["outcome"] == "ok":
        assert expect == "typed", f"accepted; expected a refusal ({expect})"
        assert record.get("value_ok", True), "loaded, but the values are wrong"
        return
    assert record["torchkeep"], f"untyped exception escaped: {_describe(record)}"
    if not strict or expect == "typed":
        return
    if expect == "unsafe":
        assert record["unsafe"], f"expected UnsafeFileError, got {_describe(record)}"
    elif expect == "corrupt":
        assert record["corrupt"], f"expected CorruptFileError, got {_describe(record)}"
    elif expect == "refuse":
        assert record["unsafe"] or record["corrupt"], (
            f"expected UnsafeFileError or CorruptFileError, got {_describe(record)}"
        )


@pytest.mark.parametrize(("case", "verb"), LIB_JOBS, ids=[_key(c, v) for c, v in LIB_JOBS])
def test_library_verb(outcomes: dict[str, Any], corpus: Any, case: Case, verb: str) -> None:
    record = outcomes[_key(case, verb)]
    _common(record)
    base = VARIANTS.get(verb, verb)
    strict = base in STRICT_VERBS or base in dict(case.overrides)
    _assert_expected(case, verb, record, strict=strict)
    if case.check == "no_size_leak" and record["outcome"] == "error":
        for name, size in corpus.sizes.items():
            if case.id in name or name.startswith("outside-"):
                assert not re.search(rf"\b{size}\b|\b{size:,}\b", record["message"]), (
                    f"the message reveals the size of {name}: {record['message'][:200]}"
                )


@pytest.mark.parametrize(("case", "verb"), CLI_JOBS, ids=[_key(c, "cli_" + v) for c, v in CLI_JOBS])
def test_cli_verb(outcomes: dict[str, Any], case: Case, verb: str) -> None:
    record = outcomes[_key(case, f"cli_{verb}")]
    _common(record)
    cli = record.get("cli")
    assert cli is not None, f"the CLI runner itself failed: {_describe(record)}"
    assert cli["exception"] is None, f"an exception escaped the command: {cli['exception']}"
    assert "Traceback" not in cli["stderr"]
    code = cli["exit_code"]
    if verb == "scan":
        assert code in (0, 1, 2, 3), cli
        if case.family == "codeexec" and case.expect == "unsafe":
            assert code in (2, 3), f"scan did not flag a code-execution payload: exit {code}"
    else:
        refusal = case.expect != "typed"
        allowed = {1, 2} if verb == "verify" else {2}
        if refusal:
            assert code in allowed, f"exit {code}; stderr: {cli['stderr'][-300:]}"
        else:
            assert code in {0, 1, 2}, cli
    if code == 2:
        lines = cli["stderr"].splitlines()
        assert lines and lines[0].startswith("error: "), cli["stderr"][-500:]
        assert sum(line.startswith("error:") for line in lines) == 1, cli["stderr"][-500:]


def test_no_marker_anywhere(corpus: Any, outcomes: dict[str, Any]) -> None:
    """Markers created late (a child process, a thread) are caught here."""
    stray = sorted(os.listdir(Path(corpus.root) / "markers"))
    assert stray == [], f"payloads ran: {stray}"


REAL_CLI = [
    ("inspect", "codeexec-os_system-zip"),
    ("scan", "semantics-build_namespace_dump_patches-legacy"),
    ("verify", "resources-nested_lists_100k-zip"),
]


def test_the_installed_command_refuses_without_traceback(corpus: Any) -> None:
    """A few files through `python -m torchkeep` as users run it (started side by side)."""
    env = {**os.environ, "NO_COLOR": "1"}
    env.pop("TORCHKEEP_DEBUG", None)
    procs = [
        (
            verb,
            case_id,
            subprocess.Popen(
                [sys.executable, "-m", "torchkeep", verb, corpus.paths[case_id]],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
                cwd=Path(corpus.root) / "markers",
            ),
        )
        for verb, case_id in REAL_CLI
    ]
    for verb, case_id, proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode > 0, (verb, case_id, proc.returncode, stdout[-300:])
        assert "Traceback" not in stderr, stderr[-500:]
        if proc.returncode == 2:
            assert stderr.startswith("error: "), stderr[-500:]
            assert stderr.count("error:") == 1, stderr[-500:]
    assert sorted(os.listdir(Path(corpus.root) / "markers")) == []
