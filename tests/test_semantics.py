"""Loads follow torch's own path: entry choice, module load machinery, tied weights, prefixes.

Every load here is compared with ``model.load_state_dict(torch.load(...))`` on the same file:
same tensors, same outputs on a fixed input. A report that claims a load is checked against
the model's tensors before and after.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import torchkeep as tk
from torchkeep.tools.convert import convert

X = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))


def same_value(a: object, b: object, name: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), name
        if a.is_quantized:
            assert b.is_quantized and torch.equal(a.int_repr(), b.int_repr()), name
            assert torch.equal(a.dequantize(), b.dequantize()), name
        else:
            assert torch.equal(a, b), name
    elif isinstance(a, (tuple, list)):
        assert isinstance(b, (tuple, list)) and len(a) == len(b), name
        for x, y in zip(a, b, strict=True):
            same_value(x, y, name)
    else:
        assert a == b, name


def same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        same_value(sa[name], sb[name], name)


def built(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return factory()


def both_ways(
    factory: Callable[[], nn.Module], path: Path, pick: Callable[[object], object] = lambda o: o
) -> tuple[nn.Module, nn.Module, tk.LoadReport]:
    """The model loaded by torch's path and by torchkeep (strict, no trust, no renames)."""
    theirs = built(factory, 1)
    theirs.load_state_dict(pick(torch.load(path, weights_only=False)))  # type: ignore[arg-type]
    ours = built(factory, 1)
    report = tk.load(ours, path)
    same_state(theirs, ours)
    theirs.eval(), ours.eval()
    with torch.no_grad():
        assert torch.equal(theirs(X), ours(X))
    return theirs, ours, report


# ------------------------------------------------------------------------- entry choice


def test_tutorial_dict_takes_the_model_state_not_the_loss(tmp_path: Path) -> None:
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "tutorial.pt"
    torch.save(
        {
            "epoch": 3,
            "model_state_dict": model.state_dict(),
            "optimizer_state_dict": opt.state_dict(),
            "loss": torch.tensor(0.25),
        },
        path,
    )
    state = tk.load_state_dict(path)
    assert list(state) == ["weight", "bias"] and torch.equal(state["weight"], model.weight)
    assert tk.inspect(path).entry == "model_state_dict"
    both_ways(lambda: nn.Linear(4, 2), path, lambda o: o["model_state_dict"])  # type: ignore[index]
    convert(path, tmp_path / "w.safetensors")
    written = tk.load_state_dict(tmp_path / "w.safetensors")
    assert set(written) == {"weight", "bias"}


def test_imagenet_best_acc_and_module_prefix(tmp_path: Path) -> None:
    model = nn.DataParallel(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
    path = tmp_path / "checkpoint.pth.tar"
    torch.save(
        {
            "epoch": 2,
            "arch": "mlp",
            "state_dict": model.state_dict(),
            "best_acc1": torch.tensor(71.5),
            "optimizer": torch.optim.SGD(model.parameters(), lr=0.1).state_dict(),
        },
        path,
    )
    assert tk.inspect(path).entry == "state_dict"
    both_ways(
        lambda: nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)),
        path,
        lambda o: {k.removeprefix("module."): v for k, v in o["state_dict"].items()},  # type: ignore[index]
    )


def test_own_pt_checkpoint_with_a_generator(tmp_path: Path) -> None:
    model = nn.Linear(4, 2)
    path = tk.save_checkpoint(tmp_path / "c.pt", model=model, generator=torch.Generator())
    assert tk.inspect(path).entry == "model"
    assert set(tk.load_state_dict(path)) == {"weight", "bias"}


def test_model_and_ema_the_conventional_one_wins_and_the_other_is_named(tmp_path: Path) -> None:
    model, ema = nn.Linear(4, 2), nn.Linear(4, 2)
    path = tmp_path / "ref.pth"
    args = argparse.Namespace(lr=0.1)
    torch.save({"model": model.state_dict(), "model_ema": ema.state_dict(), "args": args}, path)
    info = tk.inspect(path)
    assert info.entry == "model" and info.alternatives == ("model_ema",)
    target = nn.Linear(4, 2)
    report = tk.load(target, path)
    assert report.entry == "model" and report.alternatives == ("model_ema",)
    assert "model_ema" in report.summary()
    assert torch.equal(target.weight, model.weight)
    assert tk.load(target, path, entry="model_ema").entry == "model_ema"
    assert torch.equal(target.weight, ema.weight)


def test_convert_refuses_a_file_of_scalars_only(tmp_path: Path) -> None:
    path = tmp_path / "metrics.pt"
    torch.save({"loss": torch.tensor(0.5), "epoch": 2}, path)
    with pytest.raises(tk.InvalidStateError, match="no model weights"):
        convert(path, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
    convert(path, tmp_path / "out.safetensors", entry="")  # asked for explicitly
    assert set(tk.load_state_dict(tmp_path / "out.safetensors")) == {"loss"}


def test_unknown_entry_is_a_typed_key_error(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save({"model": nn.Linear(2, 2).state_dict()}, path)
    with pytest.raises(tk.EntryNotFoundError, match="'model'") as info:
        tk.load_state_dict(path, entry="nope")
    assert isinstance(info.value, KeyError)


# ----------------------------------------------------------------- module load machinery


def weight_norm_old() -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return nn.Sequential(nn.utils.weight_norm(nn.Linear(4, 3)), nn.Tanh(), nn.Linear(3, 2))


def weight_norm_new() -> nn.Module:
    return nn.Sequential(
        nn.utils.parametrizations.weight_norm(nn.Linear(4, 3)), nn.Tanh(), nn.Linear(3, 2)
    )


def test_weight_norm_old_names_load_through_the_modules_pre_hook(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    torch.save(built(weight_norm_old, 0).state_dict(), path)
    _, _, report = both_ways(weight_norm_new, path)
    assert report.ok and "0" in report.modules
    assert "0.parametrizations.weight.original0" in report.loaded


def test_dynamic_quantized_model_really_changes(tmp_path: Path) -> None:
    def quantized() -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            float_model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
            return torch.ao.quantization.quantize_dynamic(
                float_model, {nn.Linear}, dtype=torch.qint8
            )

    path = tmp_path / "q.pt"
    torch.save(built(quantized, 0).state_dict(), path)
    fresh = built(quantized, 1)
    before = fresh(X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, ours, report = both_ways(quantized, path)
    assert not torch.equal(before, ours(X))
    assert "0._packed_params._packed_params" in report.loaded


def test_averaged_model_keeps_n_averaged(tmp_path: Path) -> None:
    base = nn.Linear(4, 2)
    averaged = torch.optim.swa_utils.AveragedModel(base)
    for _ in range(3):
        averaged.update_parameters(base)
    path = tmp_path / "swa.pt"
    torch.save(averaged.state_dict(), path)
    _, ours, _ = both_ways(lambda: torch.optim.swa_utils.AveragedModel(nn.Linear(4, 2)), path)
    assert int(ours.n_averaged) == 3


class Converting(nn.Module):
    """A module whose _load_from_state_dict converts a stored fp16 'scale' to its buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.register_buffer("scale", torch.ones(2))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        key = prefix + "scale_half"
        if key in state_dict:
            state_dict[prefix + "scale"] = state_dict.pop(key).float() * 2
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.scale


class Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = Converting()
        self.head = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_custom_load_from_state_dict_runs(tmp_path: Path) -> None:
    state = built(Holder, 0).state_dict()
    state["body.scale_half"] = state.pop("body.scale").half() + 1
    path = tmp_path / "conv.pt"
    torch.save(state, path)
    _, ours, report = both_ways(Holder, path)
    assert torch.equal(ours.body.scale, torch.full((2,), 4.0))
    assert report.modules == ("body",)


def test_batchnorm_version_fixups_match_torch(tmp_path: Path) -> None:
    factory = lambda: nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))  # noqa: E731
    state = built(factory, 0).state_dict()
    del state["1.num_batches_tracked"]
    state._metadata["1"]["version"] = 1  # type: ignore[attr-defined]
    path = tmp_path / "bn.pt"
    torch.save(state, path)
    both_ways(factory, path)


def test_extra_state_is_restored(tmp_path: Path) -> None:
    class WithExtra(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 2)
            self.calls = 0

        def get_extra_state(self) -> dict[str, int]:
            return {"calls": self.calls}

        def set_extra_state(self, state: dict[str, int]) -> None:
            self.calls = state["calls"]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x)

    source = WithExtra()
    source.calls = 7
    path = tmp_path / "extra.pt"
    torch.save(source.state_dict(), path)
    target = WithExtra()
    report = tk.load(target, path)
    assert target.calls == 7 and "_extra_state" in report.loaded
    assert torch.equal(target.lin.weight, source.lin.weight)


def test_lazy_module_takes_shapes_from_the_file(tmp_path: Path) -> None:
    source = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    path = tmp_path / "w.safetensors"
    tk.save(source, path)
    target = nn.Sequential(nn.LazyLinear(3), nn.Linear(3, 2))
    assert tk.load(target, path).ok
    assert torch.equal(target(X), source(X))


def test_strict_refusal_leaves_custom_modules_untouched(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    state = built(weight_norm_old, 0).state_dict()
    state["2.extra"] = torch.zeros(1)
    torch.save(state, path)
    target = built(weight_norm_new, 1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(tk.KeyMismatchError, match="2.extra"):
        tk.load(target, path)
    for name, value in target.state_dict().items():
        assert torch.equal(value, before[name]), name
    report = tk.load(target, path, strict=False)
    assert report.unexpected == ("2.extra",)
    reference = built(weight_norm_new, 1)
    del state["2.extra"]
    reference.load_state_dict(state)
    same_state(reference, target)


# ------------------------------------------------------------------------- tied weights


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(self.emb(x)))


def test_tied_weight_absent_from_the_file_is_tied_not_missing(tmp_path: Path) -> None:
    state = built(TiedLM, 0).state_dict()
    del state["head.weight"]
    path = tmp_path / "tied.safetensors"
    tk.save(state, path)
    target = built(TiedLM, 1)
    report = tk.load(target, path)
    assert report.ok and report.tied == (("head.weight", "emb.weight"),)
    assert target.head.weight is target.emb.weight
    assert torch.equal(target.emb.weight, state["emb.weight"])


def test_tied_weight_with_different_values_in_the_file_is_refused(tmp_path: Path) -> None:
    state = {k: v.clone() for k, v in built(TiedLM, 0).state_dict().items()}
    state["head.weight"] += 1
    path = tmp_path / "untied.pt"
    torch.save(state, path)
    with pytest.raises(tk.KeyMismatchError, match="tied"):
        tk.load(built(TiedLM, 1), path)
    target = built(TiedLM, 1)
    with pytest.warns(tk.TorchkeepWarning, match="tied"):
        tk.load(target, path, strict=False)
    assert torch.equal(target.emb.weight, state["emb.weight"])


def test_tied_weights_survive_low_memory_assignment(tmp_path: Path) -> None:
    state = built(TiedLM, 0).state_dict()
    del state["head.weight"]
    path = tmp_path / "tied.safetensors"
    tk.save(state, path)
    with torch.device("meta"):
        target = TiedLM()
    assert tk.load(target, path, assign=True).ok
    assert target.head.weight is target.emb.weight
    assert torch.equal(target.emb.weight, state["emb.weight"])


# ------------------------------------------------------------------------------ prefixes


class Base(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embeddings = nn.Linear(4, 4)
        self.encoder = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embeddings(x))


class Task(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bert = Base()
        self.classifier = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.bert(x))


def test_base_model_into_task_model_finds_the_prefix(tmp_path: Path) -> None:
    base = built(Base, 0)
    path = tmp_path / "base.safetensors"
    tk.save(base, path)
    target = built(Task, 1)
    head = target.classifier.weight.clone()
    report = tk.load(target, path, strict=False)
    assert report.prefixes == ("", "bert.")
    assert set(report.missing) == {"classifier.weight", "classifier.bias"}
    assert "'bert.'" in report.summary()
    assert torch.equal(target.bert(X), base(X))
    assert torch.equal(target.classifier.weight, head)
    back = built(Base, 2)
    task_path = tmp_path / "task.safetensors"
    tk.save(target, task_path)
    report = tk.load(back, task_path, strict=False)
    assert report.prefixes == ("bert.", "")
    assert set(report.unexpected) == {"classifier.weight", "classifier.bias"}
    assert torch.equal(back(X), base(X))


def test_lightning_attribute_prefix(tmp_path: Path) -> None:
    net = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    path = tmp_path / "lit.pt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}, path)
    _, _, report = both_ways(
        lambda: nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)),
        path,
        lambda o: {k.removeprefix("net."): v for k, v in o["state_dict"].items()},  # type: ignore[index]
    )
    assert report.prefixes == ("net.", "")


def test_equally_good_prefixes_are_not_guessed(tmp_path: Path) -> None:
    part = nn.Linear(4, 4)
    path = tmp_path / "two.safetensors"
    tk.save(
        {f"encoder.{k}": v for k, v in part.state_dict().items()}
        | {f"decoder.{k}": v + 1 for k, v in part.state_dict().items()},
        path,
    )
    target = nn.Linear(4, 4)
    with pytest.raises(tk.KeyMismatchError, match="several prefixes"):
        tk.load(target, path)


def test_by_position_pairs_in_order_and_checks_shapes(tmp_path: Path) -> None:
    source = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    path = tmp_path / "seq.pt"
    torch.save(source.state_dict(), path)
    target = nn.Sequential(nn.Linear(4, 2), nn.Linear(2, 3))
    with pytest.raises(tk.KeyMismatchError, match="shapes differ"):
        tk.load(target, path, rename="by_position")

    class Named(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = nn.Linear(4, 3)
            self.second = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.second(self.first(x))

    named = Named()
    report = tk.load(named, path, rename="by_position")
    assert report.ok and ("0.weight", "first.weight") in report.renamed
    assert torch.equal(named(X), source(X))


# ---------------------------------------------------------------------------- guardrails


def test_include_matching_nothing_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    tk.save(nn.Linear(4, 2), path)
    with pytest.raises(tk.InvalidArgumentError, match="include='backbone'"):
        tk.load(nn.Linear(4, 2), path, include="backbone")


def test_exclude_matching_nothing_warns(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    tk.save(nn.Linear(4, 2), path)
    with pytest.warns(tk.TorchkeepWarning, match="exclude='head'"):
        assert tk.load(nn.Linear(4, 2), path, exclude="head").ok


def test_non_strict_load_of_nothing_raises(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    tk.save(nn.Linear(4, 2), path)
    target = nn.Conv1d(3, 5, 2)
    with pytest.raises(tk.KeyMismatchError, match="nothing in the file fits"):
        tk.load(target, path, strict=False)


def test_rename_that_changes_the_entry_warns(tmp_path: Path) -> None:
    model = nn.Linear(4, 2)
    path = tmp_path / "two.pt"
    torch.save(
        {"model": model.state_dict(), "other": {"a.w": model.weight, "a.b": model.bias}}, path
    )
    renames = {"a.w": "weight", "a.b": "bias"}
    with pytest.warns(tk.TorchkeepWarning, match="changed which tensor dict"):
        report = tk.load(nn.Linear(4, 2), path, rename=renames.get)
    assert report.entry == "other"


# ------------------------------------------------------------------ the report is honest


@pytest.mark.parametrize(
    "factory",
    [weight_norm_new, Holder, TiedLM, lambda: nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))],
    ids=["weight_norm", "custom", "tied", "batchnorm"],
)
def test_every_name_reported_loaded_was_written(
    tmp_path: Path, factory: Callable[[], nn.Module]
) -> None:
    source = built(factory, 0)
    state = source.state_dict()
    dropped = next(iter(state))
    del state[dropped]
    path = tmp_path / "partial.pt"
    torch.save(state, path)
    target = built(factory, 1)
    with torch.no_grad():
        for tensor in target.state_dict(keep_vars=True).values():
            if tensor.is_floating_point():
                tensor.fill_(float("nan"))
    report = tk.load(target, path, strict=False)
    after = target.state_dict()
    for name in report.loaded:
        value = after[name]
        if value.is_floating_point():
            assert not value.isnan().any(), name
    for name in report.missing:
        value = after[name]
        if value.is_floating_point():
            assert value.isnan().all(), name
    assert dropped in report.missing or dropped in dict(report.tied)


# ------------------------------------------------------------------ files from the wild


class _OldTensor:
    """Pickles as torch 0.4 wrote tensors: backward hooks ``None``, not an empty dict."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def __reduce__(self) -> tuple[object, ...]:
        t = self.tensor
        storage = torch.storage.TypedStorage(
            wrap_storage=t.untyped_storage(), dtype=t.dtype, _internal=True
        )
        return (
            torch._utils._rebuild_tensor_v2,
            (storage, 0, tuple(t.shape), t.stride(), False, None),
        )


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_tensors_with_none_hooks_load_as_torch_loads_them(tmp_path: Path, legacy: bool) -> None:
    weight = torch.randn(3, 4)
    path = tmp_path / "old.pth"
    torch.save(
        {"net.weight": _OldTensor(weight)},  # type: ignore[dict-item]
        path,
        _use_new_zipfile_serialization=not legacy,
    )
    theirs = torch.load(path, weights_only=True)
    ours = tk.load_state_dict(path)
    assert list(ours) == list(theirs) == ["net.weight"]
    assert torch.equal(ours["net.weight"], theirs["net.weight"])
    assert torch.equal(ours["net.weight"], weight)


def test_a_bare_tensor_file_reads_as_one_named_tensor(tmp_path: Path) -> None:
    tensor = torch.randn(4, 4)
    path = tmp_path / "matrix.pt"
    torch.save(tensor, path)
    assert torch.equal(torch.load(path, weights_only=True), tensor)
    state = tk.load_state_dict(path)
    assert list(state) == ["tensor"] and torch.equal(state["tensor"], tensor)
    assert tk.inspect(path).tensors[0].shape == (4, 4)
    convert(path, tmp_path / "m.safetensors")
    assert torch.equal(tk.load_state_dict(tmp_path / "m.safetensors")["tensor"], tensor)
