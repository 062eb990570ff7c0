"""Bad files give typed errors that name the file; unsafe pickles never run."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import GOLDEN, Net

import torchkeep as tk

CORRUPT = {
    "empty.pt": (tk.CorruptFileError, "empty"),
    "truncated.pt": (tk.CorruptFileError, "truncated"),
    "truncated.safetensors": (tk.CorruptFileError, "truncated"),
    "bad_header.safetensors": (tk.CorruptFileError, "header length"),
    "bad_json.safetensors": (tk.CorruptFileError, "not valid JSON"),
    "lying_offsets.safetensors": (tk.CorruptFileError, "fc.weight"),
    "flipped_byte.pt": (tk.CorruptFileError, "CRC"),
    "garbage.bin": (tk.UnknownFormatError, "not a format torchkeep reads"),
    "not_a_checkpoint.txt": (tk.UnknownFormatError, "not a format torchkeep reads"),
}


@pytest.mark.parametrize("name", sorted(CORRUPT))
@pytest.mark.parametrize("verb", ["load", "load_state_dict", "inspect"])
def test_bad_files_raise_typed_errors_naming_the_file(name: str, verb: str) -> None:
    error, text = CORRUPT[name]
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=text) as info:
        if verb == "load":
            tk.load(model, GOLDEN / name)
        else:
            getattr(tk, verb)(GOLDEN / name)
    assert isinstance(info.value, tk.TorchkeepError)
    assert isinstance(info.value, ValueError)
    assert name in str(info.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_missing_path_is_file_not_found_with_similar_names(tmp_path: Path) -> None:
    (tmp_path / "model-best.safetensors").write_bytes(b"")
    with pytest.raises(tk.CheckpointNotFoundError, match="model-best.safetensors") as info:
        tk.load_state_dict(tmp_path / "model.safetensors")
    assert isinstance(info.value, FileNotFoundError)


def test_a_folder_without_weights_is_explained(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(tk.CheckpointNotFoundError, match="index.json"):
        tk.load_state_dict(tmp_path)


def test_sharded_folder_with_a_missing_shard(tmp_path: Path) -> None:
    folder = tk.save(Net(), tmp_path / "out", max_shard_size=200)
    shard = sorted(folder.glob("*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(tk.CheckpointNotFoundError, match=shard.name):
        tk.load(Net(), folder)


def test_sharded_index_pointing_outside_its_folder_is_refused(tmp_path: Path) -> None:
    folder = tk.save(Net(), tmp_path / "out", max_shard_size=200)
    index = folder / "model.safetensors.index.json"
    index.write_text(index.read_text().replace("model-00001", "../model-00001"))
    with pytest.raises(tk.CorruptFileError, match="outside"):
        tk.load_state_dict(folder)


def test_a_torchscript_archive_gives_its_weights_without_running_it(tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    torch.jit.save(scripted, path)
    state = tk.load_state_dict(path)
    reference = torch.jit.load(path).state_dict()
    assert list(state) == list(reference)
    assert all(torch.equal(state[k], reference[k]) for k in reference)


def test_a_zip_that_is_not_a_torch_file(tmp_path: Path) -> None:
    path = tmp_path / "photos.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("a.txt", "hello")
    with pytest.raises(tk.UnknownFormatError):
        tk.load_state_dict(path)


MALICIOUS = ["malicious.pt", "malicious_legacy.pt", "malicious.pkl"]


@pytest.mark.parametrize("name", MALICIOUS)
def test_golden_malicious_files_are_refused_listing_their_globals(name: str) -> None:
    marker = Path("/tmp/torchkeep_pwned_marker")
    marker.unlink(missing_ok=True)
    with pytest.raises(tk.UnsafeFileError) as info:
        tk.load(Net(), GOLDEN / name)
    assert "posix.system" in info.value.globals
    assert "DANGEROUS" in str(info.value)
    assert "Nothing was executed" in str(info.value)
    assert isinstance(info.value, pickle.UnpicklingError)
    assert not marker.exists()


class _Exploit:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("how", ["load", "load_state_dict", "inspect"])
def test_reduce_payload_never_runs(tmp_path: Path, legacy: bool, how: str) -> None:
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save(
        {"fc.weight": torch.zeros(3, 16), "x": _Exploit(target)},
        path,
        _use_new_zipfile_serialization=not legacy,
    )
    with pytest.raises(tk.UnsafeFileError, match="system"):
        if how == "load":
            tk.load(Net(), path, strict=False)
        else:
            getattr(tk, how)(path)
    assert not target.exists()
    # The refusal is not a fallback to an unsafe path: allowing other globals changes nothing.
    with pytest.raises(tk.UnsafeFileError):
        tk.load_state_dict(path, allow_globals=["collections.OrderedDict"])
    assert not target.exists()


@pytest.mark.parametrize("protocol", range(6))
def test_a_reduce_payload_in_a_plain_pickle_is_refused_at_every_protocol(
    tmp_path: Path, protocol: int
) -> None:
    from torchkeep.safety.unpickle import safe_pickle_load

    target = tmp_path / "pwned"
    data = pickle.dumps(_Exploit(target), protocol=protocol)
    with pytest.raises(tk.UnsafeFileError) as info:
        safe_pickle_load(data, path="payload.pkl", stubs=True)
    assert info.value.globals in (("posix.system",), ("os.system",))
    assert not target.exists()


class Custom:  # a user's class, importable from this test module
    def __init__(self, value: int) -> None:
        self.value = value


def test_user_classes_are_inert_stubs_unless_allowed(tmp_path: Path) -> None:
    from torchkeep.safety.stubs import StubObject
    from torchkeep.safety.unpickle import safe_torch_load

    path = tmp_path / "custom.pt"
    torch.save({"w": torch.ones(2), "meta": Custom(3)}, path)
    assert torch.equal(tk.load_state_dict(path)["w"], torch.ones(2))
    qualname = f"{__name__}.Custom"
    assert tk.inspect(path).stubbed == (qualname,)
    stub = safe_torch_load(str(path), map_location="cpu", stubs=True)["meta"]
    assert isinstance(stub, StubObject) and not isinstance(stub, Custom)
    assert stub.__dict__["value"] == 3  # its state, as data; none of its code
    # Without stubs the class is refused by name, with the ways forward.
    with pytest.raises(tk.UnsafeFileError) as info:
        safe_torch_load(str(path), map_location="cpu")
    assert info.value.globals == (qualname,)
    assert "trust=True" in str(info.value) and f"allow_globals=['{qualname}']" in str(info.value)
    real = safe_torch_load(str(path), map_location="cpu", allow_globals=[qualname])["meta"]
    assert isinstance(real, Custom) and real.value == 3
    assert torch.equal(tk.load_state_dict(path, trust=True)["w"], torch.ones(2))


def test_harmless_values_load_without_trust(tmp_path: Path) -> None:
    import argparse
    import collections

    import numpy as np

    path = tmp_path / "values.pt"
    torch.save(
        {
            "state_dict": collections.OrderedDict(w=torch.ones(2)),
            "args": argparse.Namespace(lr=0.1, layers=[1, 2]),
            "array": np.arange(4),
            "scalar": np.float64(0.5),
            "dtype": torch.bfloat16,
            "device": torch.device("cpu"),
            "size": torch.Size([2, 3]),
            "set": {1, 2},
            "bytes": b"\x00\x01",
            "complex": 1 + 2j,
        },
        path,
    )
    info = tk.inspect(path)
    assert info.entry == "state_dict"
    assert "Namespace(lr=0.1" in info.extras["args"]
    assert info.extras["dtype"] == "torch.bfloat16"
