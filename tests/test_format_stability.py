"""Files torchkeep wrote stay readable, exactly, by every later version.

Each folder ``tests/data/formats/torchkeep-<version>/`` holds files written by that version's
own writers and a ``manifest.json`` of what each file must give back, computed from the
objects the files were written from (``tests/data/formats/generate.py``, never run here).
Every file is read with the current code through the public verbs (``load_state_dict``,
``load``, ``inspect``, ``load_model``, ``load_checkpoint``, ``CheckpointManager.restore``,
the ``verify`` command) and, where one exists, through an independent reader (the
``safetensors`` library, ``torch.load(weights_only=True)``, torch.distributed.checkpoint);
tensors are compared by the SHA-256 of their bytes, everything else by an exact description
(``format_models.describe``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
import xxhash
from click.testing import CliRunner
from safetensors import safe_open

import torchkeep as tk
from torchkeep.cli import main as cli

FORMATS = Path(__file__).parent / "data" / "formats"
sys.path.insert(0, str(FORMATS))  # the files name format_models.TiedNet and format_models.Config

import format_models as fm  # noqa: E402

GENERATIONS = sorted(p.parent.name for p in FORMATS.glob("*/manifest.json"))

# torch's own notes about the tensor kinds the files hold (beta, prototype, deprecated).
pytestmark = [
    pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta:UserWarning"),
    pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning"),
    pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning"),
    pytest.mark.filterwarnings("ignore:TypedStorage is deprecated:UserWarning"),
]


@cache
def manifest(generation: str) -> dict[str, Any]:
    return json.loads((FORMATS / generation / "manifest.json").read_text(encoding="utf-8"))


def cases(section: str) -> list[Any]:
    return [
        pytest.param(generation, name, id=f"{generation}/{name}")
        for generation in GENERATIONS
        for name in manifest(generation)[section]
    ]


def expected(section: str, generation: str, name: str) -> dict[str, Any]:
    return manifest(generation)[section][name]


def golden(generation: str, name: str) -> Path:
    return FORMATS / generation / name


@pytest.fixture(autouse=True)
def keep_global_rngs() -> Iterator[None]:
    """Loading a checkpoint restores the global RNGs; other tests get theirs back."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    yield
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])


# ------------------------------------------------------------------------------ helpers


def fields(description: Any) -> dict[str, Any]:
    """A described string-keyed dict as ``{key: described value}``."""
    assert isinstance(description, dict) and set(description) == {"dict"}, description
    out = {}
    for key, value in description["dict"]:
        assert isinstance(key, str), key
        out[key] = value
    return out


def assert_options_kept(actual: Any, wanted: Any, what: str) -> None:
    """Every option the file holds is restored; a later torch may add options of its own."""
    got = fields(actual)
    missing = {k: v for k, v in fields(wanted).items() if got.get(k) != v}
    restored = {k: got.get(k) for k in missing}
    assert not missing, f"{what}: restored {restored}, saved {missing}"


def assert_optimizer_restored(optimizer_state: Any, wanted: Any) -> None:
    got, want = fields(fm.describe(optimizer_state)), fields(wanted)
    assert got["state"] == want["state"]
    got_groups, want_groups = got["param_groups"]["list"], want["param_groups"]["list"]
    assert len(got_groups) == len(want_groups)
    for index, (group, saved) in enumerate(zip(got_groups, want_groups, strict=True)):
        assert_options_kept(group, saved, f"param group {index}")


def without_namespaces(description: Any) -> Any:
    """A description as a reader that keeps Namespaces as dicts (``torch.load``) gives it."""
    if isinstance(description, list):
        return [without_namespaces(d) for d in description]
    if isinstance(description, dict):
        if set(description) == {"namespace"}:
            return without_namespaces(description["namespace"])
        return {k: without_namespaces(v) for k, v in description.items()}
    return description


def assert_global_rngs(rng: dict[str, Any]) -> None:
    assert fm.python_rng_state(random.getstate()) == rng["python"]
    assert fm.numpy_rng_state(np.random.get_state(legacy=True)) == rng["numpy"]
    assert fm.sha256(fm.tensor_bytes(torch.get_rng_state())) == rng["torch"]


def describe_state(state: Any) -> dict[str, Any]:
    return fm.describe_tensors(state)


def tensor_nodes(node: Any) -> dict[str, str]:
    """``{key: stored tensor name}`` of a module entry's structure in a commit document."""
    assert isinstance(node, dict)
    out = {}
    for key, value in node.items():
        assert value.get("__tk__") == "tensor", (key, value)
        out[key] = value["name"]
    return out


def fresh_training() -> fm.Training:
    """Untrained targets, drawn from another seed than the files were written from."""
    return fm.training(seed=999)


def verify_command(path: Path) -> None:
    result = CliRunner().invoke(cli, ["verify", str(path)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("OK"), result.output


# ----------------------------------------------------------------------- the golden files


def test_there_are_golden_files() -> None:
    assert "torchkeep-0.1.0" in GENERATIONS
    total = sum(f.stat().st_size for f in FORMATS.rglob("*") if f.is_file())
    assert total < 1_500_000


# -------------------------------------------------------------------------- weights files


@pytest.mark.parametrize(("generation", "name"), cases("weights"))
def test_weights_read_back_exactly(generation: str, name: str) -> None:
    want = expected("weights", generation, name)
    path = golden(generation, name)
    state = tk.load_state_dict(path)
    assert list(state) == list(want["tensors"])
    assert describe_state(state) == want["tensors"]
    for group in want["tied"]:
        # Tied names are one tensor in memory again, as they were when saved.
        assert len({state[n].data_ptr() for n in group}) == 1, group
    verified = tk.load_state_dict(path, verify=True)
    assert describe_state(verified) == want["tensors"]


@pytest.mark.parametrize(("generation", "name"), cases("weights"))
def test_weights_inspect(generation: str, name: str) -> None:
    want = expected("weights", generation, name)
    info = tk.inspect(golden(generation, name))
    assert info.format == want["format"]
    assert info.entry == ""
    shapes = {t.name: (t.dtype, list(t.shape)) for t in info.tensors}
    wanted = {k: (v["tensor"]["dtype"], v["tensor"]["shape"]) for k, v in want["tensors"].items()}
    assert shapes == wanted
    for key, value in want.get("metadata", {}).items():
        assert info.metadata[key] == value


@pytest.mark.parametrize(
    ("generation", "name"),
    [c for c in cases("weights") if expected("weights", *c.values).get("model") == "tied_net"],
)
def test_weights_load_into_the_model(generation: str, name: str) -> None:
    want = expected("weights", generation, name)
    model = fm.tied_net(seed=999)
    report = tk.load(model, golden(generation, name))
    assert report.ok
    assert not report.missing and not report.unexpected
    assert describe_state(model.state_dict()) == want["tensors"]
    assert model.head.weight is model.emb.weight


@pytest.mark.parametrize(("generation", "name"), cases("weights"))
def test_weights_read_by_independent_readers(generation: str, name: str) -> None:
    """The safetensors library and torch.load read the files as torchkeep does."""
    want = expected("weights", generation, name)
    path = golden(generation, name)
    if want["format"] in ("safetensors", "sharded"):
        if path.is_dir():
            index = json.loads((path / "model.safetensors.index.json").read_text())
            files = sorted(set(index["weight_map"].values()))
        else:
            files = [path.name]
            path = path.parent
        stored: dict[str, torch.Tensor] = {}
        aliases: dict[str, str] = {}
        for file in files:
            shard = safetensors.torch.load_file(path / file)
            assert not set(shard) & set(stored)
            stored.update(shard)
            with safe_open(path / file, "pt") as f:
                metadata = f.metadata() or {}
            aliases.update(json.loads(metadata.get("torchkeep.aliases", "{}")))
            assert {k: metadata.get(k) for k in want["metadata"]} == want["metadata"]
        assert set(stored) | set(aliases) == set(want["tensors"])
        assert not set(stored) & set(aliases)
        for key, tensor in stored.items():
            assert fm.describe_tensor(tensor) == want["tensors"][key], key
        for alias, target in aliases.items():
            assert want["tensors"][alias] == want["tensors"][target]
            assert sorted([alias, target]) in [sorted(g) for g in want["tied"]]
    else:
        loaded = torch.load(path, weights_only=True)
        assert list(loaded) == list(want["tensors"])
        assert describe_state(loaded) == want["tensors"]
        for group in want["tied"]:
            assert len({loaded[n].data_ptr() for n in group}) == 1, group


@pytest.mark.parametrize(
    ("generation", "name"),
    [c for c in cases("weights") if "class" in expected("weights", *c.values)],
)
def test_saved_model_rebuilds(generation: str, name: str) -> None:
    want = expected("weights", generation, name)
    module, qualname = want["class"].split(":")
    model = tk.load_model(golden(generation, name))
    assert type(model) is getattr(sys.modules[module], qualname)
    assert not model.training
    init = {k: getattr(model, k) for k in fm.TIED_INIT}
    assert fm.describe(init) == want["init"]
    assert describe_state(model.state_dict()) == want["tensors"]
    assert model.head.weight is model.emb.weight


@pytest.mark.parametrize(("generation", "name"), [*cases("weights"), *cases("checkpoints")])
def test_verify_command_passes(generation: str, name: str) -> None:
    verify_command(golden(generation, name))


# --------------------------------------------------------------------- training checkpoints


@pytest.mark.parametrize(("generation", "name"), cases("checkpoints"))
def test_checkpoint_values_read_back_exactly(generation: str, name: str) -> None:
    want = expected("checkpoints", generation, name)
    values = tk.load_checkpoint(golden(generation, name), rng=False)
    assert list(values) == list(want["entries"])
    for key, entry in want["entries"].items():
        assert fm.describe(values[key]) == entry["value"], key
    versions = getattr(values["model"], "_metadata", None)
    assert {k: dict(v) for k, v in (versions or {}).items()} == want["module_metadata"]
    # Tensors saved twice are one tensor, and one the model holds is that tensor.
    extra = values["extra"]
    assert extra["alias_a"] is extra["alias_b"]
    assert torch.equal(extra["first_layer"], values["model"]["fc1.weight"])


@pytest.mark.parametrize(("generation", "name"), cases("checkpoints"))
def test_checkpoint_restores_fresh_objects(generation: str, name: str) -> None:
    want = expected("checkpoints", generation, name)
    entries = want["entries"]
    run = fresh_training()
    gen = torch.Generator().manual_seed(0)
    np_gen = np.random.default_rng(0)
    counter = fm.Counter()
    scaler = torch.amp.GradScaler("cpu")
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    rest = tk.load_checkpoint(
        golden(generation, name),
        verify=True,
        model=run.model,
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        generator=gen,
        numpy_generator=np_gen,
        counter=counter,
        scaler=scaler,
        config=fm.Config(),
        args=argparse.Namespace(),
    )
    assert describe_state(run.model.state_dict()) == fields(entries["model"]["value"])
    assert_optimizer_restored(run.optimizer.state_dict(), entries["optimizer"]["value"])
    assert_options_kept(
        fm.describe(run.scheduler.state_dict()), entries["scheduler"]["value"], "scheduler"
    )
    assert_options_kept(fm.describe(scaler.state_dict()), entries["scaler"]["value"], "scaler")
    assert run.scheduler.last_epoch == 3
    assert [g["lr"] for g in run.optimizer.param_groups] == run.scheduler.get_last_lr()
    # Objects that are pure functions of their seed are rebuilt here and compared whole.
    assert fm.describe(gen.get_state()) == entries["generator"]["value"]
    assert torch.equal(gen.get_state(), fm.generator().get_state())
    assert np_gen.bit_generator.state == fm.numpy_generator().bit_generator.state
    assert counter.state_dict() == fm.counter().state_dict()
    assert type(rest["config"]) is fm.Config and rest["config"] == fm.config()
    assert type(rest["args"]) is argparse.Namespace and rest["args"] == fm.args()
    assert type(rest["args"].sched) is argparse.Namespace
    assert list(rest) == [k for k in entries if k in rest]
    assert set(rest) == {"epoch", "config", "args", "extra", "tensors", "ema"}
    for key in ("epoch", "extra", "tensors", "ema"):
        assert fm.describe(rest[key]) == entries[key]["value"], key
    assert_global_rngs(want["rng"])


@pytest.mark.parametrize(("generation", "name"), cases("checkpoints"))
def test_checkpoint_weights_read_as_weights(generation: str, name: str) -> None:
    want = expected("checkpoints", generation, name)
    path = golden(generation, name)
    model_tensors = fields(want["entries"]["model"]["value"])
    info = tk.inspect(path)
    assert info.format == ("torchkeep-checkpoint" if want["layout"] == "native" else "torch-zip")
    assert info.entry == "model"
    assert {t.name: list(t.shape) for t in info.tensors} == {
        k: v["tensor"]["shape"] for k, v in model_tensors.items()
    }
    assert describe_state(tk.load_state_dict(path, verify=True)) == model_tensors
    net = fm.Net()
    report = tk.load(net, path)
    assert report.ok and report.entry == "model"
    assert describe_state(net.state_dict()) == model_tensors


@pytest.mark.parametrize(
    ("generation", "name"),
    [c for c in cases("checkpoints") if expected("checkpoints", *c.values)["layout"] == "native"],
)
def test_native_checkpoint_read_without_torchkeep(generation: str, name: str) -> None:
    """checkpoint.json is plain JSON; every shard is plain safetensors with the recorded xxh3."""
    want = expected("checkpoints", generation, name)
    path = golden(generation, name)
    document = json.loads((path / "checkpoint.json").read_text(encoding="utf-8"))
    assert (document["format"], document["version"]) == ("torchkeep-checkpoint", 1)
    assert fm.describe(document["metrics"]) == want["metrics"]
    assert fm.describe(document["metadata"]) == want["metadata"]
    assert {k: e["kind"] for k, e in document["state"].items()} == {
        k: e["kind"] for k, e in want["entries"].items()
    }
    stored: dict[str, torch.Tensor] = {}
    for file, record in document["files"].items():
        assert (path / file).stat().st_size == record["bytes"]
        stored.update(safetensors.torch.load_file(path / file))
    assert set(stored) == set(document["tensors"])
    for key, record in document["tensors"].items():
        tensor = stored[key]
        assert str(tensor.dtype).removeprefix("torch.") == record["dtype"]
        assert list(tensor.shape) == record["shape"]
        assert xxhash.xxh3_64_hexdigest(fm.tensor_bytes(tensor)) == record["xxh3"], key
    names = tensor_nodes(document["state"]["model"]["value"])
    model = OrderedDict((k, stored[n]) for k, n in names.items())
    assert describe_state(model) == fields(want["entries"]["model"]["value"])


@pytest.mark.parametrize(
    ("generation", "name"),
    [c for c in cases("checkpoints") if expected("checkpoints", *c.values)["layout"] == "torch"],
)
def test_pt_checkpoint_read_by_torch_load(generation: str, name: str) -> None:
    want = expected("checkpoints", generation, name)
    loaded = torch.load(golden(generation, name), weights_only=True)
    meta = loaded.pop("__torchkeep__")
    assert (meta["format"], meta["version"]) == ("torchkeep-checkpoint", 1)
    assert meta["kinds"] == {k: e["kind"] for k, e in want["entries"].items()}
    assert fm.describe(meta["metrics"]) == want["metrics"]
    assert fm.describe(meta["metadata"]) == want["metadata"]
    assert list(loaded) == list(want["entries"])
    for key, entry in want["entries"].items():
        assert fm.describe(loaded[key]) == without_namespaces(entry["value"]), key
    rng = meta["rng"]
    python = rng["python"]
    internal = tuple(python["state"].tolist())
    assert (
        fm.python_rng_state((python["version"], internal, python["gauss_next"]))
        == want["rng"]["python"]
    )
    numpy = rng["numpy"]
    keys = np.asarray(numpy["keys"].numpy(), dtype=np.uint32)
    state = (numpy["algorithm"], keys, numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"])
    assert fm.numpy_rng_state(state) == want["rng"]["numpy"]
    assert fm.sha256(fm.tensor_bytes(rng["torch"])) == want["rng"]["torch"]


# ------------------------------------------------------------------------------ managers


@pytest.mark.parametrize(("generation", "name"), cases("runs"))
def test_manager_lists_its_checkpoints(generation: str, name: str) -> None:
    want = expected("runs", generation, name)
    mgr = tk.CheckpointManager(golden(generation, name), monitor=want["monitor"], mode=want["mode"])
    try:
        assert mgr.steps() == want["steps"]
        assert mgr.latest() == want["steps"][-1]
        assert mgr.torn() == []
        if want["monitor"] is not None:
            assert mgr.best() == want["best"]
        listed = {str(c.step): fm.describe(c.metrics) for c in mgr.checkpoints()}
        assert listed == {s: c["metrics"] for s, c in want["checkpoints"].items()}
    finally:
        mgr.close()


def _restore(mgr: tk.CheckpointManager, which: Any, distributed: bool, **kw: Any) -> Any:
    run = fresh_training()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*TypedStorage is deprecated")
        rest = mgr.restore(which, model=run.model, optimizer=run.optimizer, **kw)
    if distributed:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        optimizer = get_optimizer_state_dict(run.model, run.optimizer)
    else:
        optimizer = run.optimizer.state_dict()
    return run, optimizer, rest


@pytest.mark.parametrize(("generation", "name"), cases("runs"))
def test_manager_restores_every_step(generation: str, name: str) -> None:
    want = expected("runs", generation, name)
    distributed = want["distributed"]
    mgr = tk.CheckpointManager(golden(generation, name), monitor=want["monitor"], mode=want["mode"])
    try:
        for step, saved in want["checkpoints"].items():
            entries = saved["entries"]
            run, optimizer, rest = _restore(mgr, int(step), distributed, rng=False)
            assert describe_state(run.model.state_dict()) == fields(entries["model"]["value"])
            assert_optimizer_restored(optimizer, entries["optimizer"]["value"])
            others = {k: e["value"] for k, e in entries.items() if k not in ("model", "optimizer")}
            assert {k: fm.describe(v) for k, v in rest.items()} == others
            # Read without targets, every entry is what was saved.
            values = mgr.restore(int(step), rng=False)
            assert list(values) == list(entries)
            for key, entry in entries.items():
                assert fm.describe(values[key]) == entry["value"], key
        latest = want["checkpoints"][str(want["steps"][-1])]["entries"]
        run, _, _ = _restore(mgr, "latest", distributed)
        assert describe_state(run.model.state_dict()) == fields(latest["model"]["value"])
        if "rng" in want:
            assert_global_rngs(want["rng"])
        if want["monitor"] is not None:
            best = want["checkpoints"][str(want["best"])]["entries"]
            run, _, _ = _restore(mgr, "best", distributed, rng=False)
            assert describe_state(run.model.state_dict()) == fields(best["model"]["value"])
    finally:
        mgr.close()


@pytest.mark.parametrize(("generation", "name"), cases("runs"))
def test_manager_steps_read_as_weights(generation: str, name: str) -> None:
    want = expected("runs", generation, name)
    for step, saved in want["checkpoints"].items():
        path = golden(generation, name) / f"step-{int(step):08d}"
        model_tensors = fields(saved["entries"]["model"]["value"])
        info = tk.inspect(path)
        assert info.format == (
            "torch-distributed-checkpoint" if want["distributed"] else "torchkeep-checkpoint"
        )
        assert info.entry == "model"
        assert describe_state(tk.load_state_dict(path)) == model_tensors
        net = fm.Net()
        assert tk.load(net, path).ok
        assert describe_state(net.state_dict()) == model_tensors
        verify_command(path)


@pytest.mark.parametrize(
    ("generation", "name"),
    [c for c in cases("runs") if expected("runs", *c.values)["distributed"]],
)
def test_distributed_checkpoint_read_by_torch(generation: str, name: str) -> None:
    """torch.distributed.checkpoint's own reader gives the model torchkeep's marker names."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    want = expected("runs", generation, name)
    for step, saved in want["checkpoints"].items():
        path = golden(generation, name) / f"step-{int(step):08d}"
        marker = json.loads((path / "torchkeep-dcp.json").read_text(encoding="utf-8"))
        assert (marker["format"], marker["version"], marker["step"]) == (
            "torchkeep-dcp",
            1,
            int(step),
        )
        assert fm.describe(marker["metrics"]) == saved["metrics"]
        names = tensor_nodes(marker["state"]["model"]["value"])
        items = FileSystemReader(path).read_metadata().state_dict_metadata
        dest = {
            n: torch.empty(tuple(items[n].size), dtype=items[n].properties.dtype)
            for n in names.values()
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(dest, storage_reader=FileSystemReader(path), no_dist=True)
        model = OrderedDict((k, dest[n]) for k, n in names.items())
        assert describe_state(model) == fields(saved["entries"]["model"]["value"])


# ------------------------------------------------------------- last: nothing was changed


@pytest.mark.parametrize("generation", GENERATIONS)
def test_golden_files_are_the_ones_written(generation: str) -> None:
    """The files are byte for byte what was generated: a rewritten old file is noticed."""
    folder = FORMATS / generation
    on_disk = {
        p.relative_to(folder).as_posix(): {
            "bytes": p.stat().st_size,
            "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
        }
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }
    assert on_disk == manifest(generation)["files"]
