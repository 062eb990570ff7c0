"""Matching the names in a file to the names a model expects.

Wrappers and containers add prefixes: DataParallel and DistributedDataParallel ``module.``,
``torch.compile`` ``_orig_mod.`` (anywhere in a name), Lightning the attribute the model lives
under (``model.``, ``net.``), transformers task models their base model (``bert.``). Rather than
stripping known prefixes blindly, both sides are searched for a shared dotted prefix: every
prefix many names share is a candidate, and the pair (prefix removed from the file's names,
prefix removed from the model's names) under which the most names agree (in shape too, when
shapes are known) is taken. A prefix is removed from both sides at once only when one of them
is a wrapper's (``module.`` and the like): exchanging one module name for another is a rename.
A plain file loads into a wrapped model, a wrapped file into a plain one, a base model into a
task model and back, while a real submodule called ``model`` is left alone when it already
matches. Two prefixes that fit equally well but pair different
names are ambiguous: neither is applied, and the plan says so.

``rename="by_position"`` pairs names in order instead (timm's remap), when both sides list the
same number of tensors and every pair agrees in shape.
"""

from __future__ import annotations

import fnmatch
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from torchkeep.errors import InvalidArgumentError, KeyMismatchError

BY_POSITION = "by_position"
_WRAPPER_SEGMENTS = frozenset({"module", "_orig_mod", "model"})
_MAX_DEPTH = 4
_MAX_CANDIDATES = 8

RenameRules = (
    Mapping[str, str] | Sequence[tuple[str, str]] | Callable[[str], str | None] | str | None
)
Patterns = str | Sequence[str] | None
Shapes = Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class KeyPlan:
    """How source names map to destination names.

    Attributes:
        pairs: destination name -> source name, for every name found on both sides.
        missing: destination names nothing in the source maps to.
        unexpected: source names that map to no destination name.
        renamed: (source name, destination name) pairs whose names differ.
        skipped: names left out by include/exclude (on either side), not counted as errors.
        prefixes: (prefix removed from the source's names, prefix removed from the
            destination's names) that made the names agree; ``("", "")`` when none was needed.
        translated: every source name kept by the rename rules -> the name it has in the
            destination's terms (its destination name when it has one).
        ambiguous: other prefix pairs that would have matched as many names differently
            (described as text); when set, no prefix was applied.
    """

    pairs: dict[str, str]
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    renamed: tuple[tuple[str, str], ...]
    skipped: tuple[str, ...]
    prefixes: tuple[str, str] = ("", "")
    translated: dict[str, str] = field(default_factory=dict)
    ambiguous: tuple[str, ...] = ()


def strip_compile_segments(name: str) -> str:
    """Drop ``_orig_mod.`` wherever a compiled submodule put it (``enc._orig_mod.w``)."""
    return name.replace("._orig_mod.", ".").removeprefix("_orig_mod.")


def _plain_view(names: Iterable[str]) -> dict[str, str]:
    """Names without ``_orig_mod.`` segments -> the original names (unchanged on collision)."""
    names = list(names)
    view = {strip_compile_segments(n): n for n in names}
    return view if len(view) == len(names) else {n: n for n in names}


def _candidates(names: Iterable[str]) -> list[str]:
    """``""`` and the dotted prefixes (up to four levels) many of ``names`` share."""
    counts: Counter[str] = Counter()
    total = 0
    for name in names:
        total += 1
        parts = name.split(".")
        for depth in range(1, min(_MAX_DEPTH, len(parts) - 1) + 1):
            counts[".".join(parts[:depth]) + "."] += 1
    floor = max(1, total // 10)
    common = [p for p, c in counts.most_common() if c >= floor][:_MAX_CANDIDATES]
    return ["", *common]


def _is_wrapper(prefix: str) -> bool:
    """``module.``, ``_orig_mod.``, ``model.`` and their combinations (wrappers' prefixes)."""
    return all(part in _WRAPPER_SEGMENTS for part in prefix.removesuffix(".").split("."))


def _reduce(view: Mapping[str, str], prefix: str) -> dict[str, str] | None:
    """``view`` with ``prefix`` removed where present, or None when that merges two names."""
    if not prefix:
        return dict(view)
    out = {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in view.items()}
    return out if len(out) == len(view) else None


def _agreeing(
    s_view: Mapping[str, str],
    d_view: Mapping[str, str],
    source_shapes: Shapes | None,
    dest_shapes: Shapes | None,
) -> frozenset[tuple[str, str]]:
    common = s_view.keys() & d_view.keys()
    if source_shapes is None or dest_shapes is None:
        return frozenset((s_view[k], d_view[k]) for k in common)
    return frozenset(
        (s_view[k], d_view[k])
        for k in common
        if source_shapes.get(s_view[k]) == dest_shapes.get(d_view[k])
    )


def _best_prefixes(
    s_plain: Mapping[str, str],
    d_plain: Mapping[str, str],
    source_shapes: Shapes | None,
    dest_shapes: Shapes | None,
) -> tuple[tuple[str, str], tuple[str, ...]]:
    """The (source prefix, destination prefix) pair under which most names agree."""
    if len(_agreeing(s_plain, d_plain, source_shapes, dest_shapes)) == min(
        len(s_plain), len(d_plain)
    ):
        return ("", ""), ()  # every name of the smaller side already agrees: nothing to find
    s_views = {p: v for p in _candidates(s_plain) if (v := _reduce(s_plain, p)) is not None}
    d_views = {p: v for p in _candidates(d_plain) if (v := _reduce(d_plain, p)) is not None}
    scored: list[tuple[int, int, str, str, frozenset[tuple[str, str]]]] = []
    for sp, s_view in s_views.items():
        for dp, d_view in d_views.items():
            if sp and dp and not (_is_wrapper(sp) or _is_wrapper(dp)):
                continue  # replacing one module name by another is a rename, not a prefix
            agree = _agreeing(s_view, d_view, source_shapes, dest_shapes)
            scored.append((len(agree), len(sp) + len(dp), sp, dp, agree))
    scored.sort(key=lambda item: (-item[0], item[1]))
    best = scored[0]
    identity = next(item for item in scored if not item[2] and not item[3])
    if best[0] <= identity[0]:
        return ("", ""), ()
    rivals = [
        f"{item[2] or '(none)'} -> {item[3] or '(none)'}"
        for item in scored[1:]
        if item[0] == best[0] and item[4] != best[4]
    ]
    if rivals:
        return ("", ""), (f"{best[2] or '(none)'} -> {best[3] or '(none)'}", *rivals)
    return (best[2], best[3]), ()


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
        compiled = []
        for pattern, repl in pairs:
            try:
                compiled.append((re.compile(pattern), repl))
            except (re.error, TypeError) as exc:
                raise InvalidArgumentError(
                    f"rename rule {pattern!r} -> {repl!r} is not a valid regex: {exc}"
                ) from exc

        def function(name: str) -> str | None:
            for pattern, repl in compiled:
                name = pattern.sub(repl, name)
            return name

    renamed: dict[str, str] = {}
    for name in names:
        new = function(name)
        if new is not None:
            if new in renamed:
                raise InvalidArgumentError(
                    f"rename rules map both {renamed[new]!r} and {name!r} to {new!r}"
                )
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


def matches_any(name: str, patterns: Patterns) -> bool:
    """Whether ``name`` matches one of ``patterns`` (as include=/exclude= match)."""
    return _matches(name, _as_patterns(patterns))


def pattern_list(patterns: Patterns) -> list[str]:
    """``patterns`` as a list (a single string is one pattern)."""
    return _as_patterns(patterns)


def plan_keys(
    source: Iterable[str],
    dest: Iterable[str],
    *,
    rename: RenameRules = None,
    include: Patterns = None,
    exclude: Patterns = None,
    source_shapes: Shapes | None = None,
    dest_shapes: Shapes | None = None,
) -> KeyPlan:
    """Pair source names with destination names.

    Args:
        source: names in the file.
        dest: names the model expects.
        rename: rules applied to source names first (see :func:`apply_rename`), or
            ``"by_position"`` to pair names in order.
        include: glob patterns (``"backbone.*"``); only names matching one are considered.
        exclude: glob patterns of names to leave out.
        source_shapes: shapes of the source's tensors, so prefixes are judged by names
            that agree in shape too.
        dest_shapes: shapes of the destination's tensors.

    Include and exclude patterns are matched against destination names and against source
    names as the destination would call them.

    Raises:
        InvalidArgumentError: rename rules map two names to one, or are not rules.
        KeyMismatchError: ``"by_position"`` and the two sides do not line up.
    """
    include_patterns, exclude_patterns = _as_patterns(include), _as_patterns(exclude)

    def wanted(name: str) -> bool:
        if include_patterns and not _matches(name, include_patterns):
            return False
        return not (exclude_patterns and _matches(name, exclude_patterns))

    if isinstance(rename, str):
        if rename != BY_POSITION:
            raise InvalidArgumentError(
                f"rename={rename!r} is not a rule: pass {{regex: replacement}}, a list of such "
                f"pairs, a function of the name, or {BY_POSITION!r}"
            )
        return _by_position(list(source), list(dest), wanted, source_shapes, dest_shapes)
    renamed_to_original = apply_rename(source, rename)
    dest_names = list(dest)
    s_plain = {k: renamed_to_original[v] for k, v in _plain_view(renamed_to_original).items()}
    d_plain = _plain_view(dest_names)
    (sp, dp), ambiguous = _best_prefixes(s_plain, d_plain, source_shapes, dest_shapes)
    s_view = _reduce(s_plain, sp)
    d_view = _reduce(d_plain, dp)
    assert s_view is not None and d_view is not None
    reduced_of_dest = {original: reduced for reduced, original in d_view.items()}

    pairs: dict[str, str] = {}
    missing: list[str] = []
    skipped: list[str] = []
    for name in dest_names:
        if not wanted(name):
            skipped.append(name)
            continue
        reduced = reduced_of_dest[name]
        if reduced in s_view:
            pairs[name] = s_view[reduced]
        else:
            missing.append(name)

    used = set(pairs.values())
    unexpected: list[str] = []
    translated: dict[str, str] = {}
    for reduced, original in s_view.items():
        as_dest = d_view.get(reduced, dp + reduced)
        translated[original] = as_dest
        if original in used:
            continue
        if wanted(as_dest):
            unexpected.append(original)
        elif original not in skipped:
            skipped.append(original)

    renamed = tuple((src, dst) for dst, src in pairs.items() if src != dst)
    return KeyPlan(
        pairs,
        tuple(missing),
        tuple(unexpected),
        renamed,
        tuple(skipped),
        (sp, dp),
        translated,
        ambiguous,
    )


def _by_position(
    source: list[str],
    dest: list[str],
    wanted: Callable[[str], bool],
    source_shapes: Shapes | None,
    dest_shapes: Shapes | None,
) -> KeyPlan:
    """Pair the wanted names of both sides in order (each side in its stored order).

    Include and exclude patterns apply to both sides' names as they are.
    """
    kept_dest = [n for n in dest if wanted(n)]
    kept_source = [n for n in source if wanted(n)]
    skipped = tuple(n for n in dest if n not in set(kept_dest)) + tuple(
        n for n in source if n not in set(kept_source)
    )
    if len(kept_source) != len(kept_dest):
        raise KeyMismatchError(
            f"rename='by_position' needs as many tensors in the file as in the model: the file "
            f"has {len(kept_source)}, the model {len(kept_dest)} (include=/exclude= narrow "
            "either side)",
            None,
        )
    if source_shapes is not None and dest_shapes is not None:
        for position, (src, dst) in enumerate(zip(kept_source, kept_dest, strict=True)):
            if source_shapes.get(src) != dest_shapes.get(dst):
                raise KeyMismatchError(
                    f"rename='by_position' cannot pair tensor {position} of the file, {src!r} "
                    f"{source_shapes.get(src)}, with the model's {dst!r} "
                    f"{dest_shapes.get(dst)}: the shapes differ, so the two do not list the same "
                    "layers in the same order",
                    None,
                )
    pairs = dict(zip(kept_dest, kept_source, strict=True))
    renamed = tuple((src, dst) for dst, src in pairs.items() if src != dst)
    translated = {src: dst for dst, src in pairs.items()}
    return KeyPlan(pairs, (), (), renamed, skipped, ("", ""), translated)
