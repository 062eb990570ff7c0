"""convert: every format to every format, options, atomicity and streaming memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import assert_convert_streams, write_big_state

import torchkeep as tk
from torchkeep.errors import ChecksumError, UnsupportedTensorError
from torchkeep.tools.convert import convert, parse_dtype, parse_rename, rename_map

GOLDEN = Path(__file__).parent / "data" / "golden"

# golden input -> prefix its names carry
INPUTS = {
    "net_state_dict.pt": "",
    "net_state_dict_legacy.pt": "",
    "net.safetensors": "",
    "net_sharded": "",
    "net_sharded_bin": "",
    "net_checkpoint.pt": "",
    "net_lightning.ckpt": "model.",
    "net_dataparallel.pth": "module.",
    "cuda_saved.pt": "",
}
# output name -> (format argument, format torchkeep then detects)
OUTPUTS = {
    "out.safetensors": (None, "safetensors"),
    "out.pt": (None, "torch-zip"),
    "legacy.pt": ("torch-legacy", "torch-legacy"),
    "shards": ("sharded", "sharded"),
}


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return torch.load(GOLDEN / "net_state_dict.pt", weights_only=True)


@pytest.mark.parametrize("output", sorted(OUTPUTS))
@pytest.mark.parametrize("source", sorted(INPUTS))
def test_every_input_to_every_output(
    tmp_path: Path, source: str, output: str, reference: dict[str, torch.Tensor]
) -> None:
    fmt, detected = OUTPUTS[output]
    prefix = INPUTS[source]
    dest = tmp_path / output
    result = convert(GOLDEN / source, dest, format=fmt, strip_prefix=[prefix] if prefix else [])
    assert result.format == ("torch-zip" if detected == "torch-zip" else detected)
    assert result.tensors == 9
    assert result.nbytes == 724
    assert len(result.renamed) == (9 if prefix else 0)
    assert tk.inspect(dest).format == detected
    state = tk.load_state_dict(dest, verify=True)
    assert sorted(state) == sorted(reference)
    for name, value in reference.items():
        assert torch.equal(state[name], value), name
        assert state[name].dtype == value.dtype


def test_output_loads_in_other_tools(tmp_path: Path, reference: dict[str, torch.Tensor]) -> None:
    convert(GOLDEN / "net_checkpoint.pt", tmp_path / "m.safetensors")
    state = safetensors.torch.load_file(tmp_path / "m.safetensors")
    assert all(torch.equal(state[k], v) for k, v in reference.items())
    convert(GOLDEN / "net.safetensors", tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=True)
    assert all(torch.equal(loaded[k], v) for k, v in reference.items())


@pytest.mark.parametrize("output", ["tied.safetensors", "tied.pt", "tied_shards"])
def test_tied_weights_stay_tied(tmp_path: Path, output: str) -> None:
    dest = tmp_path / output
    result = convert(GOLDEN / "tied.pt", dest, max_shard_size="1GB" if "shards" in output else None)
    assert result.tensors == 2
    assert result.nbytes == 160  # stored once
    state = tk.load_state_dict(dest)
    assert torch.equal(state["emb.weight"], state["head.weight"])
    assert state["emb.weight"].data_ptr() == state["head.weight"].data_ptr()


def test_dtype_casts_floats_only(tmp_path: Path, reference: dict[str, torch.Tensor]) -> None:
    dest = tmp_path / "half.safetensors"
    result = convert(GOLDEN / "net.safetensors", dest, dtype="bf16")
    assert sorted(result.cast) == sorted(k for k in reference if k != "bn.num_batches_tracked")
    assert result.nbytes == (724 - 8) // 2 + 8
    state = tk.load_state_dict(dest, verify=True)
    assert state["conv.weight"].dtype == torch.bfloat16
    assert torch.equal(state["conv.weight"], reference["conv.weight"].bfloat16())
    assert state["bn.num_batches_tracked"].dtype == torch.int64


def test_sharding_respects_the_limit(tmp_path: Path) -> None:
    source = tmp_path / "m.safetensors"
    tk.save({f"w{i}": torch.randn(100) for i in range(10)}, source)  # 400 bytes each
    dest = tmp_path / "shards"
    result = convert(source, dest, max_shard_size=1000)
    assert result.files == 5
    index = json.loads((dest / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 4000
    for shard in set(index["weight_map"].values()):
        assert (dest / shard).stat().st_size < 1000 + 1000  # data under the limit + header
    assert tk.load_state_dict(dest, verify=True).keys() == tk.load_state_dict(source).keys()


def test_metadata_is_carried_over(tmp_path: Path) -> None:
    source = tmp_path / "m.safetensors"
    tk.save({"w": torch.ones(2)}, source, metadata={"author": "me"})
    dest = tmp_path / "o.safetensors"
    convert(source, dest, metadata={"note": "converted"})
    info = tk.inspect(dest)
    assert info.metadata["author"] == "me"
    assert info.metadata["note"] == "converted"


def test_checksums_in_the_output_catch_damage(tmp_path: Path) -> None:
    dest = tmp_path / "m.safetensors"
    convert(GOLDEN / "net_state_dict.pt", dest)
    data = bytearray(dest.read_bytes())
    data[-1] ^= 0x10
    dest.write_bytes(bytes(data))
    with pytest.raises(ChecksumError):
        tk.load_state_dict(dest, verify=True)


def test_failure_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchkeep.tools import convert as _convert

    calls = {"n": 0}
    original = _convert._Writer.fetch

    def failing(self: _convert._Writer, name: str) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full (simulated)")
        return original(self, name)

    monkeypatch.setattr(_convert._Writer, "fetch", failing)
    dest = tmp_path / "m.safetensors"
    dest.write_bytes(b"previous contents")
    with pytest.raises(OSError, match="simulated"):
        convert(GOLDEN / "net.safetensors", dest)
    assert dest.read_bytes() == b"previous contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    calls["n"] = 0
    with pytest.raises(OSError, match="simulated"):
        convert(GOLDEN / "net.safetensors", tmp_path / "shards", max_shard_size=300)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_unstorable_dtype_is_refused_for_safetensors(tmp_path: Path) -> None:
    source = tmp_path / "c.pt"
    torch.save({"c": torch.zeros(2, dtype=torch.complex128)}, source)
    with pytest.raises(UnsupportedTensorError, match="safetensors cannot store"):
        convert(source, tmp_path / "c.safetensors")
    assert not (tmp_path / "c.safetensors").exists()
    convert(source, tmp_path / "c2.pt")  # torch files hold it


def test_parse_helpers() -> None:
    assert parse_dtype("bf16") is torch.bfloat16
    assert parse_dtype("torch.float16") is torch.float16
    with pytest.raises(ValueError, match="floating point"):
        parse_dtype("int8")
    assert parse_rename(r"^a(?=b)=c") == (r"^a(?=b)", "c")
    with pytest.raises(ValueError):
        parse_rename("abc")
    names = ["module.a.w", "module.b.w", "c"]
    assert rename_map(names, strip_prefix=["module."], rename=[(r"^a\.", "x.")]) == {
        "x.w": "module.a.w",
        "b.w": "module.b.w",
        "c": "c",
    }
    with pytest.raises(ValueError, match="empty name"):
        rename_map(["module."], strip_prefix=["module."])


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_streaming_peak_memory_stays_near_the_largest_tensor(tmp_path: Path) -> None:
    source = tmp_path / "big.safetensors"
    write_big_state(safetensors.torch.save_file, source)
    assert_convert_streams(source, tmp_path, ["inspect", str(source)])
    assert (
        tk.load_state_dict(tmp_path / "shards", verify=True).keys()
        == tk.load_state_dict(tmp_path / "o.safetensors", verify=True).keys()
    )
