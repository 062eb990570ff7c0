"""Runs verbs on corpus cases in a process of its own and reports each outcome as JSON.

A hostile file that got through could change classes, leave threads or crash the
interpreter, so nothing in the corpus is ever loaded by the test process itself. The worker
checks, after every call, that no marker file appeared and that the allowlisted classes and
functions are unchanged (and puts them back if not, so one failure does not spread).

Usage: python worker.py BUILT_JSON JOBS_JSON FD
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copyreg
import json
import os
import pathlib
import resource
import sys
import traceback
import types
import warnings
from pathlib import Path
from typing import Any

MEMORY_LIMIT = 8 << 30


def _targets() -> dict[str, Any]:
    import torch
    import torch._utils

    return {
        "argparse.Namespace": argparse.Namespace,
        "collections.Counter": collections.Counter,
        "collections.OrderedDict": collections.OrderedDict,
        "collections.defaultdict": collections.defaultdict,
        "types.SimpleNamespace": types.SimpleNamespace,
        "pathlib.PurePosixPath": pathlib.PurePosixPath,
        "torch.Tensor": torch.Tensor,
        "torch.nn.Parameter": torch.nn.Parameter,
        "torch.UntypedStorage": torch.UntypedStorage,
        "torch.Size": torch.Size,
        "torch._utils": torch._utils,
        "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
        "torch._utils._rebuild_parameter_with_state": torch._utils._rebuild_parameter_with_state,
        "copyreg._reconstructor": copyreg._reconstructor,  # type: ignore[attr-defined]
    }


_FUNCTION_FIELDS = ("__defaults__", "__kwdefaults__", "__code__", "__name__")


def snapshot(targets: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, obj in targets.items():
        state = dict(vars(obj))
        if isinstance(obj, types.FunctionType):
            state.update({f: getattr(obj, f) for f in _FUNCTION_FIELDS})
        out[name] = state
    return out


def changed(before: dict[str, dict[str, Any]], targets: dict[str, Any]) -> list[str]:
    after = snapshot(targets)
    diffs = []
    for name, old in before.items():
        new = after[name]
        keys = set(old) | set(new)
        bad = sorted(k for k in keys if k not in old or k not in new or old[k] is not new[k])
        if bad:
            diffs.append(f"{name}: {', '.join(bad)}")
    return diffs


def restore(before: dict[str, dict[str, Any]], targets: dict[str, Any]) -> None:
    """Undo what a hostile file did to the allowlisted objects, so later calls are honest."""
    for name, old in before.items():
        obj = targets[name]
        current = snapshot({name: obj})[name]
        for key in set(current) - set(old):
            with contextlib.suppress(Exception):
                delattr(obj, key)
        for key, value in old.items():
            if current.get(key) is not value:
                with contextlib.suppress(Exception):
                    setattr(obj, key, value)


def markers_for(markers: Path, name: str) -> list[str]:
    return sorted(p.name for p in markers.iterdir() if p.name.startswith(name))


def run_verb(verb: str, path: str, built: dict[str, Any], key: str) -> dict[str, Any]:
    import torch

    import torchkeep as tk
    from torchkeep.safety import unpickle as _unpickle
    from torchkeep.tools import convert as _convert
    from torchkeep.tools import diff as _diff

    out_dir = Path(built["root"]) / "out"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / (key.replace("/", "_") + ".safetensors")
    if verb.startswith("cli_"):
        return run_cli(verb[4:], path, built, out)
    if verb == "load_state_dict":
        tk.load_state_dict(path)
    elif verb == "inspect":
        tk.inspect(path)
    elif verb == "load":
        tk.load(torch.nn.Linear(2, 2), path, strict=False)
    elif verb == "load_model":
        tk.load_model(path)
    elif verb == "load_for_inference":
        tk.load_for_inference(path)
    elif verb == "load_checkpoint":
        tk.load_checkpoint(path)
    elif verb == "manager_restore":
        tk.CheckpointManager(Path(path).parent).restore()
    elif verb == "convert":
        _convert.convert(path, out)
    elif verb == "convert_pt":
        _convert.convert(path, out.with_suffix(".pt"))
    elif verb == "load_verify":
        tk.load(torch.nn.Linear(2, 2), path, strict=False, verify=True)
    elif verb == "load_checkpoint_into":
        tk.load_checkpoint(path, model=torch.nn.Linear(2, 2), strict=False)
    elif verb == "manager_restore_into":
        tk.CheckpointManager(Path(path).parent).restore(model=torch.nn.Linear(2, 2), strict=False)
    elif verb == "diff":
        _diff.diff(path, built["reference"])
    elif verb == "safe_pickle_load":
        _unpickle.safe_pickle_load(Path(path).read_bytes(), path=path)
    else:
        raise ValueError(verb)
    return {}


def run_cli(verb: str, path: str, built: dict[str, Any], out: Path) -> dict[str, Any]:
    from click.testing import CliRunner

    from torchkeep.cli import main

    args = {"diff": [path, built["reference"]], "convert": [path, str(out)]}.get(verb, [path])
    result = CliRunner().invoke(main, [verb, *args], env={"NO_COLOR": "1"})
    exception = None
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        exception = "".join(
            traceback.format_exception(result.exception)  # type: ignore[arg-type]
        )[-2000:]
    return {
        "cli": {
            "exit_code": result.exit_code,
            "stderr": result.stderr[-2000:],
            "stdout_tail": result.stdout[-300:],
            "exception": exception,
        }
    }


def check_value(case: dict[str, Any], path: str) -> bool | None:
    if case.get("check") != "bigendian":
        return None
    import torch

    import torchkeep as tk
    from adversarial.corpus import BIG_ENDIAN_VALUES

    state = tk.load_state_dict(path)
    expected = torch.tensor(BIG_ENDIAN_VALUES, dtype=torch.float32)
    return bool(torch.equal(state["weight"], expected))


def main() -> None:
    built_file, jobs_file, fd = sys.argv[1], sys.argv[2], int(sys.argv[3])
    report = os.fdopen(fd, "w", buffering=1)
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    built = json.loads(Path(built_file).read_text())
    jobs = json.loads(Path(jobs_file).read_text())
    root = Path(built["root"])
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    # The user's environment: modules on sys.path, copyreg extensions registered.
    sys.path.insert(0, str(root / "modules"))
    from adversarial.payloads import EXTENSIONS

    for code, module, name in EXTENSIONS:
        copyreg.add_extension(module, name, code)
    warnings.simplefilter("ignore")
    os.chdir(root / "out" if (root / "out").is_dir() else root)
    import io

    import torch

    import torchkeep  # noqa: F401

    # torch's own writer caches copyreg's ``__slotnames__`` on torch.Tensor the first time it
    # pickles a tensor; the verbs that write a torch zip would otherwise be blamed for it.
    torch.save(torch.zeros(1), io.BytesIO())
    targets = _targets()
    markers = root / "markers"
    for job in jobs:
        key, verb, path = job["key"], job["verb"], job["path"]
        report.write(json.dumps({"start": key}) + "\n")
        before = snapshot(targets)
        modules_before = set(sys.modules)
        result: dict[str, Any] = {"key": key, "outcome": "ok"}
        try:
            result.update(run_verb(verb, path, built, key))
            value_ok = check_value(job["case"], path) if not verb.startswith("cli_") else None
            if value_ok is not None:
                result["value_ok"] = value_ok
        except BaseException as exc:  # everything is recorded; the test decides
            import torchkeep.errors as errors

            result.update(
                outcome="error",
                type=f"{type(exc).__module__}.{type(exc).__qualname__}",
                torchkeep=isinstance(exc, errors.TorchkeepError),
                unsafe=isinstance(exc, errors.UnsafeFileError),
                corrupt=isinstance(exc, errors.CorruptFileError),
                message=str(exc)[:1500],
                traceback="".join(traceback.format_exception(exc))[-1500:],
            )
        found = markers_for(markers, job["case"]["marker_name"])
        result["markers"] = found
        for name in found:
            (markers / name).unlink(missing_ok=True)
        result["mutated"] = changed(before, targets)
        if result["mutated"]:
            restore(before, targets)
        module = job["case"].get("module")
        result["imported"] = bool(module) and module in sys.modules
        result["new_modules"] = sorted(
            m for m in set(sys.modules) - modules_before if m.startswith("tk_adv_")
        )
        report.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
