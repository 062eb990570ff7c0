"""Files made by the tools people train with, loaded torch's way and torchkeep's way.

The corpus is ``tests/data/wild`` (written by ``tests/wild/generate.py``; ``cases.json``
describes each file). For every file and every model it belongs in, torch's own path
(``torch.load`` + ``load_state_dict`` with the renames users write, ``from_pretrained``,
``load_from_checkpoint``, ``Accelerator.load_state``, ``torch.jit.load``) and torchkeep's
(``torchkeep.load(model, path)``: strict, no trust, no renames) must give models equal in every
parameter and buffer and in their outputs on a fixed input. ``load_state_dict``, ``inspect`` and
``convert`` must find the same weights, and a load's report must say truly what it changed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import torchkeep as tk
from torchkeep.tools.convert import convert

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))  # whole-model pickles name wild.models.<Class>

from wild import models  # noqa: E402

CORPUS = TESTS / "data" / "wild"
CASES: list[dict[str, Any]] = json.loads((CORPUS / "cases.json").read_text())
TARGETS = [(case, target) for case in CASES for target in case["targets"]]
TOOLS = ("lightning", "transformers", "accelerate", "omegaconf")

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::FutureWarning", "ignore:.*TypedStorage.*"
)


def _case_id(case: dict[str, Any]) -> str:
    return str(case["name"])


def _target_id(pair: tuple[dict[str, Any], dict[str, Any]]) -> str:
    case, target = pair
    return f"{case['name']}->{target['model']}"


# ------------------------------------------------------------------------------ torch's path


@contextlib.contextmanager
def _torch_can_read(case: dict[str, Any]) -> Iterator[None]:
    """What torch's own unpickler needs to read ``case``: its libraries, or the look-alike
    package (importable only while torch reads; torchkeep never sees it)."""
    for need in case["needs"]:
        if need != "mmlike":
            pytest.importorskip(need, reason=f"{case['name']} needs {need} for torch's path")
    if "mmlike" in case["needs"]:
        with models.mmlike_importable():
            yield
    else:
        yield


def _read_with_torch(path: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """The state dict torch users get from ``path``, renamed as they rename it."""
    read = spec["read"]
    # The dict torch returns is used as is: its ``_metadata`` carries module versions that
    # load hooks read (quantized Linear).
    if read == "torch":
        obj = torch.load(path, map_location="cpu", weights_only=False)
        state = obj if spec.get("key") is None else obj[spec["key"]]
    elif read == "safetensors":
        state = load_file(path)
    elif read == "whole_model":
        obj = torch.load(path, map_location="cpu", weights_only=False)
        state = (obj if spec.get("attr") is None else getattr(obj, spec["attr"])).state_dict()
    elif read == "torchscript":
        state = torch.jit.load(str(path), map_location="cpu").state_dict()
    else:
        raise ValueError(f"cases.json: no state-dict reader {read!r}")
    for name in spec.get("drop", ()):
        state.pop(name)
    if spec.get("strip"):
        state = {k.removeprefix(spec["strip"]): v for k, v in state.items()}
    return state


def torch_weights(root: Path, case: dict[str, Any]) -> dict[str, Any]:
    with _torch_can_read(case):
        return _read_with_torch(root / case["path"], case["weights"])


def torch_model(root: Path, case: dict[str, Any], target: dict[str, Any]) -> nn.Module:
    """The destination model loaded the way a torch user loads ``case``."""
    spec, path = target["reference"], root / case["path"]
    with _torch_can_read(case):
        if spec["read"] == "lightning":
            # Lightning reads its own checkpoints with weights_only=False; newer versions let
            # the caller say so (and warn when it is not said).
            options: dict[str, Any] = {"map_location": "cpu"}
            if "weights_only" in inspect.signature(models.LitNet.load_from_checkpoint).parameters:
                options["weights_only"] = False
            model = models.LitNet.load_from_checkpoint(path, **options)
        elif spec["read"] == "hf":
            cls = type(models.build(target["model"]))
            model = cls.from_pretrained(root / spec["dir"])
        elif spec["read"] == "accelerate":
            from accelerate import Accelerator

            model = models.build(target["model"])
            accelerator = Accelerator(cpu=True)
            prepared, _ = accelerator.prepare(model, models.sgd(model))
            accelerator.load_state(str(root / spec["dir"]))
            model = accelerator.unwrap_model(prepared)
        else:
            model = models.build(target["model"])
            into = model if spec.get("into") is None else getattr(model, spec["into"])
            into.load_state_dict(_read_with_torch(path, spec))
    return model.eval()


# ------------------------------------------------------------------------------- comparisons


def _diff(a: Any, b: Any) -> str | None:
    """Why ``b`` is not ``a`` (None when equal): dtype, shape, values, quantization."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return f"{type(a).__name__} vs {type(b).__name__}"
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        if a.is_quantized:
            if a.qscheme() != b.qscheme() or not torch.equal(a.int_repr(), b.int_repr()):
                return "quantized values differ"
            a, b = a.dequantize(), b.dequantize()
        if torch.equal(a, b):
            return None
        if a.is_floating_point():
            delta = (a.double() - b.double()).abs()
            nan = int(b.isnan().sum())
            return f"values differ: max |diff| {delta.nan_to_num(float('inf')).max():.3g}" + (
                f", {nan} NaN" if nan else ""
            )
        return f"values differ: {a.flatten()[:4].tolist()} vs {b.flatten()[:4].tolist()}"
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        if len(a) != len(b):
            return f"{len(a)} vs {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            why = _diff(x, y)
            if why:
                return f"item {i}: {why}"
        return None
    return None if a == b else f"{a!r} vs {b!r}"


def _tensors(model: nn.Module) -> dict[str, Any]:
    """Everything a model holds: its state dict plus non-persistent buffers."""
    state: dict[str, Any] = dict(model.state_dict())
    for name, buffer in model.named_buffers():
        state.setdefault(name, buffer)
    return state


def model_differences(expected: nn.Module, actual: nn.Module) -> list[str]:
    want, got = _tensors(expected), _tensors(actual)
    problems = [f"{n}: only in torch's model" for n in want if n not in got]
    problems += [f"{n}: only in torchkeep's model" for n in got if n not in want]
    for name in want:
        why = name in got and _diff(want[name], got[name])
        if why:
            problems.append(f"{name}: {why}")
    return problems


def _untouched_by_reference(reference: nn.Module, fresh: nn.Module) -> list[str]:
    want, got = _tensors(reference), _tensors(fresh)
    return [n for n in want if n in got and _diff(want[n], got[n]) is None]


def _error(exc: BaseException, limit: int = 800) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[:limit] + " [...]"


def _describe(case: dict[str, Any]) -> str:
    return f"{case['path']} [{case['tool']}: {case['layout']}]"


def check_load(root: Path, case: dict[str, Any], target: dict[str, Any]) -> None:
    """torchkeep.load gives the model torch's path gives, tensor for tensor and output."""
    name = target["model"]
    reference = torch_model(root, case, target)
    unchanged = set(_untouched_by_reference(reference, models.build(name)))
    expected_untouched = set(target.get("untouched", ()))
    if not set(_tensors(reference)) - unchanged - expected_untouched:
        raise AssertionError(f"torch's path changed nothing in {name}; the case tests nothing")
    model = models.build(name)
    try:
        report = tk.load(model, root / case["path"], **target.get("load", {}))
    except Exception as exc:
        raise AssertionError(
            f"torchkeep.load({name}, {_describe(case)}) raised {_error(exc)}"
        ) from exc
    problems = model_differences(reference, model)
    if problems:
        raise AssertionError(
            f"torchkeep.load({name}, {_describe(case)}) differs from torch's path "
            f"({target['reference']}) in {len(problems)} names:\n  "
            + "\n  ".join(problems[:15])
            + f"\nreport: {report.summary()}\n{report.table()}"
        )
    want, got = models.outputs(reference, name), models.outputs(model, name)
    if not torch.equal(want, got):
        raise AssertionError(
            f"{name} loaded from {case['path']}: every tensor equals torch's but the outputs "
            f"differ (max |diff| {(want - got).abs().max():.3g}); a load hook or tied weight "
            "was missed"
        )


def _flatten(name: str, value: Any) -> dict[str, torch.Tensor]:
    """Tensors inside a non-tensor state value, under ``name.<index>`` paths."""
    if isinstance(value, torch.Tensor):
        return {name: value}
    if isinstance(value, (tuple, list)):
        out: dict[str, torch.Tensor] = {}
        for i, item in enumerate(value):
            out.update(_flatten(f"{name}.{i}", item))
        return out
    return {}


def _expected_names(
    expected: dict[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]], tuple[str, ...]]:
    """Split torch's weights into tensors, packed values holding tensors (quantized Linear's
    ``(weight, bias)``) with their flattened tensors, and prefixes of everything not a tensor."""
    tensors = {k: v for k, v in expected.items() if isinstance(v, torch.Tensor)}
    packed = {
        k: _flatten(k, v)
        for k, v in expected.items()
        if not isinstance(v, torch.Tensor) and _flatten(k, v)
    }
    others = tuple(k for k, v in expected.items() if not isinstance(v, torch.Tensor))
    return tensors, packed, others


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def name_differences(expected: dict[str, Any], names: set[str]) -> list[str]:
    """``names`` are the names of torch's weights: every tensor, something for each packed
    value that holds tensors (never silently dropped), and nothing that is not a weight."""
    tensors, packed, others = _expected_names(expected)
    problems = [f"{n}: missing" for n in tensors if n not in names]
    problems += [
        f"{n}: missing (torch holds {len(flat)} tensors there: "
        + ", ".join(f"{t.dtype}{tuple(t.shape)}" for t in flat.values())
        + ")"
        for n, flat in packed.items()
        if not any(_under(got, n) for got in names)
    ]
    problems += [
        f"{n}: not a weight torch finds there"
        for n in sorted(names)
        if n not in tensors and not any(_under(n, other) for other in others)
    ]
    return problems


def weight_differences(expected: dict[str, Any], got: dict[str, torch.Tensor]) -> list[str]:
    """``got`` holds torch's weights (see :func:`name_differences`), with equal values; packed
    values may come back flattened as ``name.<index>``."""
    problems = name_differences(expected, set(got))
    tensors, packed, _ = _expected_names(expected)
    for flat in packed.values():
        tensors = {**tensors, **{k: v for k, v in flat.items() if k in got}}
    for name, value in tensors.items():
        why = name in got and _diff(value, got[name])
        if why:
            problems.append(f"{name}: {why}")
    return problems


def check_load_state_dict(root: Path, case: dict[str, Any]) -> None:
    expected = torch_weights(root, case)
    try:
        got = tk.load_state_dict(root / case["path"])
    except Exception as exc:
        raise AssertionError(
            f"torchkeep.load_state_dict({_describe(case)}) raised {_error(exc)}"
        ) from exc
    scalars = [n for n in case["not_weights"] if n in got]
    problems = weight_differences(expected, got)
    if scalars or problems:
        raise AssertionError(
            f"torchkeep.load_state_dict({_describe(case)}) does not return the weights torch "
            f"finds at {case['weights']}"
            + (f"; it returned root-level values {scalars}" if scalars else "")
            + f"; {len(problems)} differences:\n  "
            + "\n  ".join(problems[:15])
            + f"\nreturned names (first 8): {sorted(got)[:8]}"
        )


# ------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize(("case", "target"), TARGETS, ids=[_target_id(p) for p in TARGETS])
def test_load_matches_torch(case: dict[str, Any], target: dict[str, Any]) -> None:
    check_load(CORPUS, case, target)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_load_state_dict_returns_the_weights(case: dict[str, Any]) -> None:
    check_load_state_dict(CORPUS, case)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_inspect_names_the_weights_entry(case: dict[str, Any]) -> None:
    try:
        info = tk.inspect(CORPUS / case["path"])
    except Exception as exc:
        raise AssertionError(f"torchkeep.inspect({_describe(case)}) raised {_error(exc)}") from exc
    assert info.entry == case["entry"], (
        f"inspect({_describe(case)}) chose entry {info.entry!r}, but the weights are in "
        f"{case['entry']!r}; entries found: {info.entries}"
    )
    names = {t.name for t in info.tensors} | set(info.values)
    problems = name_differences(torch_weights(CORPUS, case), names)
    assert not problems, (
        f"inspect({case['path']}).tensors (entry {info.entry!r}) differ from torch's weights:\n  "
        + "\n  ".join(problems[:15])
    )


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every name a safetensors file holds, tied names (torchkeep.aliases) included."""
    with safe_open(str(path), framework="pt") as f:
        state = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
        aliases = json.loads((f.metadata() or {}).get("torchkeep.aliases", "{}"))
    for alias, stored in aliases.items():
        state[alias] = state[stored]
    return state


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_convert_writes_the_weights(case: dict[str, Any], tmp_path: Path) -> None:
    expected = torch_weights(CORPUS, case)
    out = tmp_path / "w.safetensors"
    _, packed, _ = _expected_names(expected)
    try:
        result = convert(CORPUS / case["path"], out)
    except tk.TorchkeepError as exc:
        # safetensors cannot hold a packed or quantized value: a refusal naming it is right,
        # a file without it is not.
        if packed and any(name in str(exc) for name in packed):
            return
        raise AssertionError(
            f"convert({_describe(case)}, w.safetensors) raised {_error(exc)}"
        ) from exc
    except Exception as exc:
        raise AssertionError(
            f"convert({_describe(case)}, w.safetensors) raised {_error(exc)}"
        ) from exc
    assert result.entry == case["entry"], (
        f"convert({case['path']}) wrote entry {result.entry!r}, not the weights in "
        f"{case['entry']!r}"
    )
    problems = weight_differences(expected, _read_safetensors(out))
    assert not problems, (
        f"convert({case['path']}) -> safetensors differs from torch's weights:\n  "
        + "\n  ".join(problems[:15])
    )


def _fill_sentinel(model: nn.Module) -> dict[str, torch.Tensor]:
    """Fill every parameter and buffer with a sentinel (NaN; -7 for integers); return the
    state-dict names so filled."""
    filled = {id(t) for t in [*model.parameters(), *model.buffers()]}
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.fill_(float("nan") if tensor.is_floating_point() else -7)
    return {
        name: value.detach().clone()
        for name, value in model.state_dict(keep_vars=True).items()
        if isinstance(value, torch.Tensor) and id(value) in filled
    }


def _still_sentinel(value: torch.Tensor) -> torch.Tensor:
    return value.isnan() if value.is_floating_point() else value == -7


@pytest.mark.parametrize(("case", "target"), TARGETS, ids=[_target_id(p) for p in TARGETS])
def test_report_names_what_changed(case: dict[str, Any], target: dict[str, Any]) -> None:
    model = models.build(target["model"])
    sentinel = _fill_sentinel(model)
    kwargs = {**target.get("load", {}), "strict": False}
    try:
        report = tk.load(model, CORPUS / case["path"], **kwargs)
    except Exception as exc:
        raise AssertionError(
            f"torchkeep.load({target['model']}, {_describe(case)}, strict=False) raised "
            f"{_error(exc)}"
        ) from exc
    state = model.state_dict()
    unknown = [n for n in (*report.loaded, *report.missing) if n not in state]
    assert not unknown, (
        f"the report of {case['path']} names what {target['model']} lacks: {unknown}"
    )
    assert report.loaded, f"nothing loaded from {case['path']}: {report.summary()}"
    kept = [n for n in report.loaded if n in sentinel and bool(_still_sentinel(state[n]).any())]
    changed = [
        n
        for n in report.missing
        if n in sentinel
        and not torch.equal(_still_sentinel(state[n]), torch.ones_like(state[n], dtype=torch.bool))
    ]
    # A tied name shares its tensor with a loaded one: it changes with it, and says so.
    tied = dict(report.tied)
    false_ties = [
        (n, partner)
        for n, partner in tied.items()
        if n not in state
        or partner not in report.loaded
        or state[n].data_ptr() != state[partner].data_ptr()
    ]
    silent = [
        n
        for n in sentinel
        if n not in report.loaded
        and n not in report.missing
        and n not in report.skipped
        and n not in tied
        and not bool(_still_sentinel(state[n]).all())
    ]
    assert not (kept or changed or silent or false_ties), (
        f"torchkeep.load({target['model']}, {case['path']}) reported wrongly: "
        f"reported loaded but still the sentinel: {kept[:8]}; reported missing but changed: "
        f"{changed[:8]}; changed but not reported loaded: {silent[:8]}; reported tied to a "
        f"loaded name but not sharing its tensor: {false_ties[:8]}\n{report.table()}"
    )


def _tools_missing() -> list[str]:
    return [t for t in TOOLS if importlib.util.find_spec(t) is None]


@pytest.mark.slow
@pytest.mark.skipif(
    bool(_tools_missing()),
    reason=f"regenerating the corpus needs {', '.join(TOOLS)} (pip install torchkeep[test])",
)
def test_fresh_corpus_matches_torch(tmp_path: Path) -> None:
    """generate.py with the libraries installed now writes files torchkeep reads as torch
    does, and the same cases as the committed corpus."""
    out = tmp_path / "wild"
    start = time.monotonic()
    src = str(TESTS.parent / "src")
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": path}
    run = subprocess.run(
        [sys.executable, str(TESTS / "wild" / "generate.py"), str(out)],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert run.returncode == 0, f"generate.py failed:\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
    fresh = json.loads((out / "cases.json").read_text())
    assert [(c["name"], [t["model"] for t in c["targets"]]) for c in fresh] == [
        (c["name"], [t["model"] for t in c["targets"]]) for c in CASES
    ], "tests/data/wild is out of date with generate.py; regenerate it"
    failures: list[str] = []
    for case in fresh:
        checks = [
            (f"load->{t['model']}", lambda c=case, t=t: check_load(out, c, t))
            for t in case["targets"]
        ]
        checks.append(("load_state_dict", lambda c=case: check_load_state_dict(out, c)))
        for label, check in checks:
            try:
                check()
            except AssertionError as exc:
                gist = " | ".join(line.strip() for line in str(exc).splitlines()[:3])
                failures.append(f"{case['name']} {label}: {gist[:400]}")
    elapsed = time.monotonic() - start
    assert not failures, (
        f"{len(failures)} checks on freshly generated files failed ({elapsed:.0f}s):\n"
        + "\n".join(failures)
    )
