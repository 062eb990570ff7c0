"""Files written by torch.save, safetensors and other tools load into the model they came from."""

from __future__ import annotations

import pytest
import torch
from conftest import GOLDEN, Net, Tied, assert_same_state, needs_cuda

import torchkeep as tk

# file -> (format torchkeep detects, entry holding the weights, prefix the file adds)
GOOD = {
    "net_state_dict.pt": ("torch-zip", "", ""),
    "net_state_dict.bin": ("torch-zip", "", ""),
    "net_state_dict.pkl": ("torch-zip", "", ""),
    "net_state_dict_legacy.pt": ("torch-legacy", "", ""),
    "net_dataparallel.pth": ("torch-zip", "", "module."),
    "net_compiled.pt": ("torch-zip", "", "_orig_mod."),
    "net_checkpoint.pt": ("torch-zip", "model_state_dict", ""),
    "net_lightning.ckpt": ("torch-zip", "state_dict", "model."),
    "net.safetensors": ("safetensors", "", ""),
    "net_sharded": ("sharded", "", ""),
    "net_sharded_bin": ("sharded", "", ""),
    "cuda_saved.pt": ("torch-zip", "", ""),
    "cuda1_saved.pt": ("torch-zip", "", ""),
}


@pytest.mark.parametrize("name", sorted(GOOD))
def test_golden_file_loads_strictly_into_the_model(name: str, reference: dict) -> None:
    fmt, entry, prefix = GOOD[name]
    model = Net()
    report = tk.load(model, GOLDEN / name)
    assert report.ok
    assert report.format == fmt
    assert report.entry == entry
    assert sorted(report.loaded) == sorted(reference)
    assert len(report.renamed) == (len(reference) if prefix else 0)
    assert all(src == prefix + dst for src, dst in report.renamed)
    assert_same_state(model, reference)


@pytest.mark.parametrize("name", sorted(GOOD))
def test_golden_file_reads_as_a_flat_dict(name: str, reference: dict) -> None:
    _, _, prefix = GOOD[name]
    state = tk.load_state_dict(GOLDEN / name)
    assert sorted(state) == sorted(prefix + k for k in reference)
    for key, value in reference.items():
        assert torch.equal(state[prefix + key], value)
        assert state[prefix + key].device.type == "cpu"


@pytest.mark.parametrize("name", sorted(GOOD))
def test_inspect_reads_shapes_without_data(name: str, reference: dict) -> None:
    info = tk.inspect(GOLDEN / name)
    _, entry, prefix = GOOD[name]
    assert info.entry == entry
    shapes = {t.name: t.shape for t in info.tensors}
    assert shapes == {prefix + k: tuple(v.shape) for k, v in reference.items()}
    assert info.num_params == sum(v.numel() for v in reference.values())
    assert info.size > 0


def test_checkpoint_dict_extras_are_listed() -> None:
    info = tk.inspect(GOLDEN / "net_checkpoint.pt")
    assert info.extras["epoch"] == "3"
    assert info.extras["loss"] == "0.25"
    assert "Namespace(" in info.extras["args"]
    assert set(info.entries) >= {"model_state_dict"}


def test_tied_weights_from_torch_save_stay_tied() -> None:
    state = tk.load_state_dict(GOLDEN / "tied.pt")
    assert state["emb.weight"].data_ptr() == state["head.weight"].data_ptr()
    model = Tied()
    assert tk.load(model, GOLDEN / "tied.pt").ok
    assert model.head.weight is model.emb.weight
    assert torch.equal(model.emb.weight, state["emb.weight"])


def test_cuda_saved_file_maps_with_a_location_dict(reference: dict) -> None:
    state = tk.load_state_dict(GOLDEN / "cuda1_saved.pt", device={"cuda:1": "cpu"})
    assert all(t.device.type == "cpu" for t in state.values())
    assert torch.equal(state["fc.weight"], reference["fc.weight"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_cuda_request_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(tk.DeviceError, match="CUDA is not available"):
        tk.load_state_dict(GOLDEN / "cuda_saved.pt", device="cuda")
    with pytest.raises(tk.DeviceError, match="'cuda:0': CUDA is not available"):
        tk.load_state_dict(GOLDEN / "cuda1_saved.pt", device={"cuda:1": "cuda:0"})


@needs_cuda
def test_cuda_location_map_on_a_gpu_machine(reference: dict) -> None:
    state = tk.load_state_dict(GOLDEN / "cuda1_saved.pt", device={"cuda:1": "cuda:0"})
    assert all(t.device == torch.device("cuda:0") for t in state.values())
    model = Net().cuda()
    tk.load(model, GOLDEN / "cuda_saved.pt")
    assert model.fc.weight.device.type == "cuda"
    assert torch.equal(model.fc.weight.cpu(), reference["fc.weight"])


def test_lightning_checkpoint_loads_into_a_lightning_style_wrapper(reference: dict) -> None:
    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = Net()

    wrapper = Wrapper()
    report = tk.load(wrapper, GOLDEN / "net_lightning.ckpt")
    assert report.ok and not report.renamed
    assert_same_state(wrapper.model, reference)
