"""Unpickling without running anything: the entry points every reader of pickles uses.

Pickles run code through what they reference (``os.system``, a class whose ``__reduce__`` does
anything) and through what they do with it (BUILD on a class, keyword arguments to a C
constructor). Every pickle torchkeep reads — torch zip and legacy files, plain pickles,
torch.distributed.checkpoint ``.metadata``, TorchScript members — runs on the
:mod:`~torchkeep.safety.vm` machine under :class:`~torchkeep.safety.rules.SafeRules`: allowed
names are used only through argument checks, unknown classes become inert stubs, and a file
that references anything dangerous is refused, naming every offending global at once.
``trust=True`` is the only way to torch's or Python's own unpickler.
"""

from __future__ import annotations

import contextlib
import pickle
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from torchkeep.errors import CorruptFileError, DeviceError, TorchkeepError, UnsafeFileError
from torchkeep.safety.rules import SafeRules, SurveyRules, Verdict, classify
from torchkeep.safety.torch_files import (
    LEGACY_MAGIC,
    ZIP_MAGIC,
    Target,
    meta_storage,
    open_zip,
    read_legacy,
    read_member,
    read_torch_zip,
    run_pickle,
)

__all__ = [
    "Policy",
    "ScanResult",
    "Verdict",
    "classify",
    "safe_pickle_load",
    "safe_torch_load",
    "scan_file",
    "scan_pickle",
    "unsafe_message",
]


@dataclass(frozen=True)
class Policy:
    """What an unpickler may resolve beyond the allowlist.

    Attributes:
        extra: ``module.name`` globals the caller explicitly allowed (imported for real).
        stubs: unknown, non-dangerous classes may remain as inert stubs in the result.
        torch_nn: torch.nn's own module classes are real, so a whole-model pickle of plain
            torch.nn layers rebuilds into working modules.
    """

    extra: frozenset[str] = frozenset()
    stubs: bool = False
    torch_nn: bool = False

    def rules(self) -> SafeRules:
        return SafeRules(self.extra, torch_nn=self.torch_nn)


def unsafe_message(path: str, refused: Iterable[str]) -> str:
    """The refusal text: what was refused, why, and the ways forward."""
    names = list(refused)
    lines = [
        f"refusing to load {path!r}: its pickle references globals that are not on "
        "torchkeep's allowlist, and resolving them could run code. Nothing was executed.",
    ]
    verdicts = {q: classify(q) for q in names}
    for qualname in names:
        note = (
            "  <- DANGEROUS: can run code, import, or touch files or the network"
            if verdicts[qualname] == "dangerous"
            else ""
        )
        lines.append(f"    {qualname}{note}")
    if "dangerous" in verdicts.values():
        lines.append("Do not load this file unless you wrote it yourself.")
    else:
        allow = ", ".join(repr(q) for q in names)
        lines.append(
            "If you trust whoever wrote the file, pass trust=True, or allow just these names "
            f"with allow_globals=[{allow}]. To keep only the tensors, re-save the file with "
            "torchkeep.save(...) as .safetensors."
        )
    return "\n".join(lines)


def run_judged(path: str, policy: Policy, run: Callable[[SafeRules], Any]) -> Any:
    """Run a read under ``policy``'s rules, then judge the globals it met.

    A read that failed after meeting refused globals is run again under
    :class:`SurveyRules`, which carry on past refusals, so the error lists every global the
    file references that is not allowed (the first failure is often a consequence of one).
    """
    rules = policy.rules()
    try:
        value = run(rules)
    except (UnsafeFileError, CorruptFileError) as exc:
        if not rules.refused:
            raise
        survey = SurveyRules(policy.extra, torch_nn=policy.torch_nn)
        with contextlib.suppress(UnsafeFileError, CorruptFileError):
            run(survey)
        refused = tuple({**rules.refused, **survey.refused})
        raise UnsafeFileError(unsafe_message(path, refused), path=path, globals=refused) from exc
    judge(path, rules, policy.stubs)
    return value


def judge(path: str, rules: SafeRules, stubs: bool) -> None:
    """Refuse a finished unpickling that met dangerous globals, or unknown ones without stubs."""
    refused = rules.refused
    if not refused:
        return
    if not stubs or "dangerous" in refused.values():
        raise UnsafeFileError(unsafe_message(path, refused), path=path, globals=tuple(refused))


def safe_pickle_load(
    data: bytes,
    *,
    path: str,
    trust: bool = False,
    allow_globals: Iterable[str] = (),
    stubs: bool = False,
    torch_nn: bool = False,
    persistent_load: Callable[[Any], Any] | None = None,
) -> Any:
    """Unpickle a plain pickle (``pickle.dump``) safely, or fully when trusted.

    Raises:
        UnsafeFileError: the pickle references or does something torchkeep refuses.
        CorruptFileError: the pickle is malformed or its values are inconsistent.
    """
    if trust:
        return pickle.loads(data)  # the caller declared the file trusted

    def run(rules: SafeRules) -> Any:
        value, end = run_pickle(data, 0, rules=rules, label=path, persistent_load=persistent_load)
        if end != len(data):
            raise CorruptFileError(f"{path!r} has {len(data) - end} bytes after its pickle's end")
        return value

    return run_judged(path, Policy(frozenset(allow_globals), stubs, torch_nn), run)


def safe_torch_load(
    path: str,
    *,
    map_location: Callable[[Any, str], Any] | str | None,
    trust: bool = False,
    allow_globals: Iterable[str] = (),
    mmap: bool = False,
    stubs: bool = False,
    torch_nn: bool = False,
) -> Any:
    """Read a torch zip or legacy file safely (or through ``torch.load`` when trusted).

    Args:
        path: the file.
        map_location: as for ``torch.load`` (``"meta"``: shapes only, no data read).
        trust: unpickle everything with ``torch.load`` (the caller vouches for the file).
        allow_globals: extra globals imported for real.
        mmap: map zip storages instead of reading them.
        stubs: let unknown, non-dangerous classes remain as inert stubs.
        torch_nn: import torch.nn's own module classes for real.

    Raises:
        UnsafeFileError: the pickle needs globals or operations that are not allowed.
        CorruptFileError: the file cannot be parsed, or contradicts itself.
    """
    if trust:
        return _trusted_torch_load(path, map_location, mmap)
    policy = Policy(frozenset(allow_globals), stubs, torch_nn)
    return run_judged(path, policy, lambda rules: _read(path, rules, map_location, mmap))


def _read(path: str, rules: SafeRules, map_location: Any, mmap: bool) -> Any:
    with open(path, "rb") as f:
        head = f.read(len(LEGACY_MAGIC))
    target = Target.for_location(map_location, mmap=mmap)
    if head.startswith(ZIP_MAGIC):
        return read_torch_zip(path, rules=rules, target=target)
    if head.startswith(LEGACY_MAGIC):
        return read_legacy(path, rules=rules, target=target)
    raise CorruptFileError(f"{path!r} is neither a torch zip file nor a legacy torch file")


def _trusted_torch_load(path: str, map_location: Any, mmap: bool) -> Any:
    kwargs: dict[str, Any] = {"map_location": map_location, "weights_only": False}
    if mmap:
        kwargs["mmap"] = True
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Couldn't retrieve source code")
            return torch.load(path, **kwargs)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as exc:
        if isinstance(exc, TorchkeepError) or isinstance(exc.__cause__, DeviceError):
            raise
        raise CorruptFileError(f"cannot load {path!r}: the file is damaged ({exc})") from exc


@dataclass(frozen=True)
class ScanResult:
    """What scanning one pickle-based file found.

    Attributes:
        globals: every global that is not on the allowlist, with its verdict, plus the
            allowlisted ones it used, as ``safe``.
        problem: why the load path refuses the file although no global is dangerous (an
            operation it does not allow, a damaged structure), or ``None``.
        corrupt: ``problem`` is damage rather than a refused operation.
    """

    globals: dict[str, Verdict]
    problem: str | None = None
    corrupt: bool = False

    @property
    def verdict(self) -> Verdict:
        if "dangerous" in self.globals.values() or (self.problem and not self.corrupt):
            return "dangerous"
        return "unknown" if "unknown" in self.globals.values() else "safe"


def _scan(run: Callable[[SafeRules], Any]) -> ScanResult:
    rules = SurveyRules()
    problem: str | None = None
    corrupt = False
    try:
        run(rules)
    except UnsafeFileError as exc:
        problem = str(exc)
    except CorruptFileError as exc:
        problem, corrupt = str(exc), True
    if rules.problems and problem is None:
        first = rules.problems[0]
        problem, corrupt = f"the pickle {first}", first.corrupt
    found: dict[str, Verdict] = {q: rules.refused.get(q, "safe") for q in rules.used}
    return ScanResult(found, problem, corrupt)


def scan_file(path: str) -> ScanResult:
    """Run every pickle in a file on the loaders' own machine and rules, storages on meta.

    Zip archives (torch.save, TorchScript, torch.export) have each ``.pkl`` member scanned,
    whatever its case or folder; legacy files are read as the loader reads them; anything
    else as one plain pickle. What ``scan`` calls safe loads, and what a load refuses as
    unsafe ``scan`` does not call safe. Nothing is executed.
    """
    with open(path, "rb") as f:
        head = f.read(len(LEGACY_MAGIC))
    if head.startswith(ZIP_MAGIC):
        return _scan(lambda rules: _scan_zip(path, rules))
    if head.startswith(LEGACY_MAGIC):
        return _scan(lambda rules: _read(path, rules, "meta", False))
    with open(path, "rb") as f:
        data = f.read()
    return scan_pickle(data, path)


def _scan_zip(path: str, rules: SafeRules) -> None:
    zf = open_zip(path, pickle_name="")
    for info in zf.members.values():
        if info.filename.lower().endswith(".pkl"):
            data = read_member(zf, info)
            run_pickle(
                data,
                0,
                rules=rules,
                label=f"{path}:{info.filename}",
                persistent_load=lambda pid: meta_storage(pid, rules, path),
            )


def scan_pickle(data: bytes, label: str) -> ScanResult:
    """Scan one pickle's bytes; storages it names are stood in for on the meta device."""
    return _scan(
        lambda rules: run_pickle(
            data,
            0,
            rules=rules,
            label=label,
            persistent_load=lambda p: meta_storage(p, rules, label),
        )
    )
