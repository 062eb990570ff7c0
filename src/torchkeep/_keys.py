"""Matching the names in a file to the names a model expects.

Wrappers add prefixes: DataParallel and DistributedDataParallel ``module.``, ``torch.compile``
``_orig_mod.``, Lightning ``model.``. Rather than stripping blindly, both sides are reduced
level by level (a prefix most names share is removed) and the pair of levels under which the
most names agree is taken, so a plain file loads into a wrapped model, a wrapped file into a
plain one, and wrapped into wrapped, while a real submodule called ``model`` is left alone
when it already matches.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")
_MAX_LEVELS = 4

RenameRules = Mapping[str, str] | Sequence[tuple[str, str]] | Callable[[str], str | None] | None
Patterns = str | Sequence[str] | None


@dataclass(frozen=True)
class KeyPlan:
    """How source names map to destination names.

    Attributes:
        pairs: destination name -> source name, for every name found on both sides.
        missing: destination names nothing in the source maps to.
        unexpected: source names that map to no destination name.
        renamed: (source name, destination name) pairs whose names differ.
        skipped: names left out by include/exclude (on either side), not counted as errors.
    """

    pairs: dict[str, str]
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    renamed: tuple[tuple[str, str], ...]
    skipped: tuple[str, ...]


def strip_compile_segments(name: str) -> str:
    """Drop ``_orig_mod.`` wherever a compiled submodule put it (``enc._orig_mod.w``)."""
    return name.replace("._orig_mod.", ".").removeprefix("_orig_mod.")


def _levels(names: Sequence[str]) -> list[dict[str, str]]:
    """Successive views of ``names`` with one more shared wrapper prefix removed.

    Each view maps a reduced name back to the original one. Level 0 is the identity.
    """
    first = {strip_compile_segments(n): n for n in names}
    if len(first) != len(names):
        first = {n: n for n in names}
    levels = [{n: n for n in names}]
    if first != levels[0]:
        levels.append(first)
    current = first
    for _ in range(_MAX_LEVELS):
        counts = {p: sum(k.startswith(p) for k in current) for p in WRAPPER_PREFIXES}
        prefix, count = max(counts.items(), key=lambda item: item[1])
        if count == 0 or count * 2 < len(current):
            break
        reduced = {
            (k[len(prefix) :] if k.startswith(prefix) else k): original
            for k, original in current.items()
        }
        if len(reduced) != len(current):
            break  # removing it would merge two names
        levels.append(reduced)
        current = reduced
    return levels


def apply_rename(names: Iterable[str], rules: RenameRules) -> dict[str, str]:
    """Map each renamed name to its original; a rule returning ``None`` drops the name.

    ``rules`` is ``{regex: replacement}``, a list of such pairs (applied in order, with
    :func:`re.sub`), or a function of the name.
    """
    if rules is None:
        return {n: n for n in names}
    if callable(rules):
        function = rules
    else:
        pairs = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
        compiled = [(re.compile(pattern), repl) for pattern, repl in pairs]

        def function(name: str) -> str | None:
            for pattern, repl in compiled:
                name = pattern.sub(repl, name)
            return name

    renamed: dict[str, str] = {}
    for name in names:
        new = function(name)
        if new is not None:
            if new in renamed:
                raise ValueError(f"rename rules map both {renamed[new]!r} and {name!r} to {new!r}")
            renamed[new] = name
    return renamed


def _as_patterns(patterns: Patterns) -> list[str]:
    if patterns is None:
        return []
    return [patterns] if isinstance(patterns, str) else list(patterns)


def _matches(name: str, patterns: list[str]) -> bool:
    """Glob match; a pattern without wildcards names a module and everything under it."""
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            if fnmatch.fnmatchcase(name, pattern):
                return True
        elif name == pattern or name.startswith(pattern.rstrip(".") + "."):
            return True
    return False


def plan_keys(
    source: Iterable[str],
    dest: Iterable[str],
    *,
    rename: RenameRules = None,
    include: Patterns = None,
    exclude: Patterns = None,
) -> KeyPlan:
    """Pair source names with destination names.

    Args:
        source: names in the file.
        dest: names the model expects.
        rename: rules applied to source names first (see :func:`apply_rename`).
        include: glob patterns (``"backbone.*"``); only names matching one are considered.
        exclude: glob patterns of names to leave out.

    Include and exclude patterns are matched against destination names and against source
    names as the destination would call them.
    """
    renamed_to_original = apply_rename(source, rename)
    dest_names = list(dest)
    source_levels = _levels(list(renamed_to_original))
    dest_levels = _levels(dest_names)

    best: tuple[int, int, int] | None = None
    for i, s_level in enumerate(source_levels):
        for j, d_level in enumerate(dest_levels):
            score = len(s_level.keys() & d_level.keys())
            if best is None or score > best[0]:
                best = (score, i, j)
    assert best is not None
    s_level, d_level = source_levels[best[1]], dest_levels[best[2]]
    d_prefix_of = {original: reduced for reduced, original in d_level.items()}

    include_patterns, exclude_patterns = _as_patterns(include), _as_patterns(exclude)

    def wanted(name: str) -> bool:
        if include_patterns and not _matches(name, include_patterns):
            return False
        return not (exclude_patterns and _matches(name, exclude_patterns))

    pairs: dict[str, str] = {}
    missing: list[str] = []
    skipped: list[str] = []
    for name in dest_names:
        if not wanted(name):
            skipped.append(name)
            continue
        reduced = d_prefix_of[name]
        if reduced in s_level:
            pairs[name] = renamed_to_original[s_level[reduced]]
        else:
            missing.append(name)

    used = set(pairs.values())
    unexpected: list[str] = []
    for reduced, renamed_name in s_level.items():
        original = renamed_to_original[renamed_name]
        if original in used:
            continue
        as_dest = d_level.get(reduced, reduced)
        if wanted(as_dest) and wanted(renamed_name):
            unexpected.append(original)
        elif original not in skipped:
            skipped.append(original)

    renamed = tuple((src, dst) for dst, src in pairs.items() if src != dst)
    return KeyPlan(pairs, tuple(missing), tuple(unexpected), renamed, tuple(skipped))
