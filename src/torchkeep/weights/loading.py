"""Loading a file's tensors into a model with the semantics of ``nn.Module.load_state_dict``.

torch's own path copies each tensor inside the module that owns it, and lets modules take part:
load pre-hooks rename old names (``weight_norm``'s ``weight_g``/``weight_v``), custom
``_load_from_state_dict`` methods unpack or convert state (quantized modules' packed
parameters, BatchNorm's version fix-ups, lazy modules taking shapes from the file),
``set_extra_state`` restores non-tensor state, post-hooks adjust what counts as missing.

torchkeep reads file bytes straight into parameters, in parallel, which is only equivalent to
torch's path for modules that do none of that. So the model is split:

- submodules that customise loading (and the whole model, when its root does or its class
  overrides ``load_state_dict``) are loaded by their own ``load_state_dict``, given every
  name of the file that falls under them, exactly as torch would;
- everything else goes through the fast path.

A strict load is checked in full before anything is written: customised submodules are
first loaded into a deep copy, so a refusal leaves the model untouched. The report is built
from what each path actually did, and names the file lacks but whose tensor is tied to a
loaded one (``decoder.weight`` tied to the embeddings) are reported as tied, not missing.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.parameter import is_lazy

from torchkeep._facts import TensorInfo
from torchkeep._tensors import dtype_name, stored_shape
from torchkeep.errors import TorchkeepWarning
from torchkeep.weights.entries import NOT_WEIGHTS
from torchkeep.weights.keys import KeyPlan
from torchkeep.weights.report import ShapeMismatch

_BASE = torch.nn.Module


def _customised(module: torch.nn.Module) -> bool:
    kind = type(module)
    return (
        kind._load_from_state_dict is not _BASE._load_from_state_dict
        or kind.set_extra_state is not _BASE.set_extra_state
        or bool(module._load_state_dict_pre_hooks)
        or bool(module._load_state_dict_post_hooks)
    )


def custom_modules(model: torch.nn.Module, state: Mapping[str, Any]) -> list[str]:
    """Prefixes (``"bn."``; ``""`` for the whole model) of the outermost submodules whose
    loading torch's path lets them customise, plus owners of non-tensor state values."""
    if type(model).load_state_dict is not _BASE.load_state_dict or _customised(model):
        return [""]
    found: list[str] = []

    def visit(module: torch.nn.Module, prefix: str) -> None:
        for name, child in module._modules.items():
            if child is None:
                continue
            child_prefix = f"{prefix}{name}."
            if _customised(child):
                found.append(child_prefix)
            else:
                visit(child, child_prefix)

    visit(model, "")
    for name, value in state.items():
        if not isinstance(value, torch.Tensor) and owner(found, name) is None:
            parent = name.rpartition(".")[0]
            found.append(f"{parent}." if parent else "")
            if not parent:
                return [""]
    return found


def owner(prefixes: Sequence[str], name: str) -> str | None:
    """The prefix in ``prefixes`` that ``name`` falls under, or None."""
    for prefix in prefixes:
        if name.startswith(prefix):
            return prefix
    return None


@dataclass
class Outcome:
    """What a load did or would do, in the model's names."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[ShapeMismatch] = field(default_factory=list)
    cast: list[tuple[str, str, str]] = field(default_factory=list)
    tied: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (
            self.missing or self.unexpected or self.mismatched or self.conflicts or self.errors
        )


@dataclass
class Group:
    """A customised submodule and what the file gives it."""

    prefix: str
    module: torch.nn.Module
    given: dict[str, str]  # name relative to the module -> name in the file
    state: OrderedDict[str, Any] = field(default_factory=OrderedDict)


class Loader:
    """One load of one entry of a source into a model.

    Args:
        model: the destination (wrapped or not; its own ``state_dict`` names are used).
        source: the opened file.
        entry: the chosen tensor dict.
        plan: how the file's names pair with the model's.
        state: ``model.state_dict(keep_vars=True)``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        source: Any,
        entry: str,
        plan: KeyPlan,
        state: Mapping[str, Any],
    ) -> None:
        self.model = model
        self.source = source
        self.entry = entry
        self.plan = plan
        self.infos: Mapping[str, TensorInfo] = source.entries()[entry]
        self.values: dict[str, Any] = source.values(entry)
        self.state = state
        self.tensors = {n: v for n, v in self.state.items() if isinstance(v, torch.Tensor)}
        self.prefixes = custom_modules(model, self.state)
        self.skipped = set(plan.skipped)
        self.fits: list[tuple[str, str]] = []
        self.all_fits: list[tuple[str, str]] = []
        self.groups: list[Group] = []
        self.outcome = Outcome()
        self._split()

    # ------------------------------------------------------------------------- planning

    def _split(self) -> None:
        out = self.outcome
        for dst, src in self.plan.pairs.items():
            if owner(self.prefixes, dst) is not None:
                continue
            target = self.tensors.get(dst)
            info = self.infos.get(src)
            if target is None or info is None:
                out.missing.append(dst)
                out.unexpected.append(src)
                continue
            if info.shape != stored_shape(target):
                out.mismatched.append(ShapeMismatch(dst, src, info.shape, stored_shape(target)))
                continue
            self.fits.append((dst, src))
            if info.dtype != dtype_name(target.dtype):
                out.cast.append((dst, info.dtype, dtype_name(target.dtype)))
        out.missing += [n for n in self.plan.missing if owner(self.prefixes, n) is None]
        out.skipped = list(self.plan.skipped)
        for name in self.plan.unexpected:
            if owner(self.prefixes, self.plan.translated.get(name, name)) is not None:
                continue
            if self._wrapper_bookkeeping(name):
                out.skipped.append(name)
            else:
                out.unexpected.append(name)
        for prefix in self.prefixes:
            module = self.model.get_submodule(prefix[:-1]) if prefix else self.model
            given = {
                as_dest[len(prefix) :]: src
                for src, as_dest in self.plan.translated.items()
                if as_dest.startswith(prefix)
                and src not in self.skipped
                and (src in self.infos or src in self.values)
                and owner(self.prefixes, as_dest) == prefix
            }
            self.groups.append(Group(prefix, module, given))
        self._check_tied_fits()

    def _wrapper_bookkeeping(self, name: str) -> bool:
        """A scalar such as ``AveragedModel``'s ``n_averaged`` beside the ``module.`` names of
        the model it wraps: when the wrapper's prefix was removed, it belongs to no weight."""
        removed = self.plan.prefixes[0]
        info = self.infos.get(name)
        return (
            bool(removed)
            and not name.startswith(removed)
            and info is not None
            and math.prod(info.shape) <= 1
            and name.rpartition(".")[2].lower() in NOT_WEIGHTS
        )

    def _check_tied_fits(self) -> None:
        """Names tied in the model are written once; a file that disagrees is refused."""
        self.all_fits = list(self.fits)
        first: dict[int, tuple[str, str]] = {}
        aliases = self.source.aliases(self.entry)
        kept: list[tuple[str, str]] = []
        for dst, src in self.fits:
            key = id(self.tensors[dst])
            if key not in first:
                first[key] = (dst, src)
                kept.append((dst, src))
                continue
            first_dst, first_src = first[key]
            same = aliases.get(src, src) == aliases.get(first_src, first_src) or torch.equal(
                self.source.get(self.entry, src), self.source.get(self.entry, first_src)
            )
            if same:
                self.outcome.loaded.append(dst)
            else:
                self.outcome.conflicts.append(
                    f"{first_dst} and {dst} are one tensor in the model (tied), but the file "
                    f"holds different values for {first_src} and {src}"
                )
        self.fits = kept

    def _read_group(self, group: Group) -> None:
        state: OrderedDict[str, Any] = OrderedDict()
        for rel, src in group.given.items():
            full = group.prefix + rel
            target = self.tensors.get(full)
            info = self.infos.get(src)
            if info is not None and target is not None and not is_lazy(target):
                if info.shape != stored_shape(target):
                    self.outcome.mismatched.append(
                        ShapeMismatch(full, src, info.shape, stored_shape(target))
                    )
                    continue
                if info.dtype != dtype_name(target.dtype):
                    self.outcome.cast.append((full, info.dtype, dtype_name(target.dtype)))
            state[rel] = self.source.get(self.entry, src) if info is not None else self.values[src]
        versions = self._versions(group.prefix)
        if versions is not None:
            state._metadata = versions  # type: ignore[attr-defined]
        group.state = state

    def _versions(self, prefix: str) -> OrderedDict[str, Any] | None:
        saved = self.source.module_versions(self.entry)
        if saved is None:
            return None
        source_prefix, dest_prefix = self.plan.prefixes
        out: OrderedDict[str, Any] = OrderedDict()
        for key, value in saved.items():
            name = f"{key}." if key else ""
            if source_prefix:
                if not name.startswith(source_prefix):
                    continue
                name = name[len(source_prefix) :]
            name = dest_prefix + name
            if name.startswith(prefix):
                out[name[len(prefix) :].removesuffix(".")] = value
        return out

    # -------------------------------------------------------------------------- running

    def check(self, *, trial: bool, assign: bool = False) -> Outcome:
        """Read what customised submodules get and, with ``trial``, load deep copies of them
        to learn what torch's path would report, without touching the model."""
        for group in self.groups:
            self._read_group(group)
            if trial:
                trial_module = copy.deepcopy(group.module)
                self._record(group, self._run(trial_module, group, assign=assign))
        self._add_tied()
        return self.outcome

    def write(self, *, assign: bool, read_many: Any) -> Outcome:
        """Write into the model: the fast path, then each customised submodule.

        ``read_many`` gets the fast path's (model name, file name) pairs: each tensor once for
        copies, every tied name for assignment (which must re-tie them). Returns the outcome
        of the real loads (a trial's records are replaced).
        """
        read_many(self.all_fits if assign else self.fits)
        self.outcome.loaded += [dst for dst, _ in self.fits]
        if self.groups:
            self.outcome.errors.clear()
            for group in self.groups:
                self._drop_records(group)
                self._record(group, self._run(group.module, group, assign=assign))
            self._add_tied()
        return self.outcome

    def _run(
        self, module: torch.nn.Module, group: Group, *, assign: bool = False
    ) -> tuple[list[str], list[str], list[str]]:
        state = OrderedDict(group.state)
        if hasattr(group.state, "_metadata"):
            state._metadata = group.state._metadata  # type: ignore[attr-defined]
        try:
            if assign:
                result = module.load_state_dict(state, strict=False, assign=True)
            else:
                result = module.load_state_dict(state, strict=False)
        except RuntimeError as exc:
            return [], [], [f"{group.prefix or 'the model'}: {exc}"]
        if result is None:  # an override that does not report
            return [], [], []
        return list(result.missing_keys), list(result.unexpected_keys), []

    def _record(self, group: Group, result: tuple[list[str], list[str], list[str]]) -> None:
        missing, unexpected, errors = result
        out = self.outcome
        mismatched = {m.name for m in out.mismatched}
        missing_full = {group.prefix + rel for rel in missing}
        for rel in missing:
            full = group.prefix + rel
            if full not in self.skipped and full not in mismatched:
                out.missing.append(full)
        for rel in unexpected:
            out.unexpected.append(group.given.get(rel, group.prefix + rel))
        out.errors += errors
        if errors:
            return
        for name in self.state:
            if (
                name.startswith(group.prefix)
                and name not in missing_full
                and name not in self.skipped
                and name not in mismatched
            ):
                out.loaded.append(name)

    def _drop_records(self, group: Group) -> None:
        out = self.outcome
        under = group.prefix
        out.loaded = [n for n in out.loaded if owner([under], n) is None]
        out.missing = [n for n in out.missing if owner([under], n) is None]
        out.unexpected = [
            n
            for n in out.unexpected
            if owner([under], self.plan.translated.get(n, n)) is None
            and n not in group.given.values()
        ]
        out.tied = []

    def _add_tied(self) -> None:
        """Missing names whose tensor is a loaded one's are tied, not missing."""
        out = self.outcome
        written = [*out.loaded, *(dst for dst, _ in self.fits)]
        loaded_by_id = {id(self.tensors[n]): n for n in written if n in self.tensors}
        still: list[str] = []
        tied = dict(out.tied)
        for name in out.missing:
            tensor = self.tensors.get(name)
            source = loaded_by_id.get(id(tensor)) if tensor is not None else None
            if source is not None and source != name:
                tied[name] = source
            else:
                still.append(name)
        out.missing = still
        out.tied = list(tied.items())


def warn_conflicts(outcome: Outcome) -> None:
    """Non-strict loads report tied-weight conflicts as a warning (strict ones refuse)."""
    for conflict in outcome.conflicts:
        warnings.warn(f"{conflict}; the first was loaded", TorchkeepWarning, stacklevel=3)


__all__ = ["Loader", "Outcome", "custom_modules", "owner", "warn_conflicts"]
