"""torchkeep, end to end: `make demo` runs this.

Trains the tutorials' small CNN on synthetic data, then saves and loads its weights the ways
people need to: any format, through DataParallel and torch.compile prefixes, into a model with
a new head, from a tutorial-style checkpoint dict, refusing a booby-trapped pickle, out of a
whole-model pickle whose class is gone, and exported for deployment.
Everything it writes goes to ./demo-output.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

import torchkeep as tk

OUT = Path("demo-output")


class CNN(nn.Module):
    """The tutorials' CNN: conv, batch norm, pooling, linear."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(16 * 7 * 7, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def section(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 70 - len(title)))


def synthetic_batches(steps: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        labels = torch.randint(0, 10, (32,), generator=generator)
        # Each class brightens its own band of rows, so the task is learnable.
        images = torch.randn(32, 1, 28, 28, generator=generator) * 0.5
        for i, label in enumerate(labels.tolist()):
            images[i, 0, label * 2 : label * 2 + 4] += 2.0
        batches.append((images, labels))
    return batches


def train(model: nn.Module, steps: int) -> float:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    loss = torch.tensor(0.0)
    for images, labels in synthetic_batches(steps):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def pickle_with_vanished_class(model: nn.Module) -> Path:
    """torch.save a model whose class lives in a module that is then deleted."""
    project = OUT / "old_project"
    project.mkdir()
    (project / "old_models.py").write_text(
        "from torch import nn\n\n"
        "class OldCNN(nn.Module):\n"
        "    def __init__(self, features, classifier):\n"
        "        super().__init__()\n"
        "        self.features = features\n"
        "        self.classifier = classifier\n"
    )
    sys.path.insert(0, str(project))
    try:
        old = importlib.import_module("old_models").OldCNN(model.features, model.classifier)
        torch.save(old, OUT / "old_whole_model.pt")
    finally:
        sys.path.remove(str(project))
        sys.modules.pop("old_models", None)
    shutil.rmtree(project)
    return OUT / "old_whole_model.pt"


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    torch.manual_seed(0)

    section("train a small CNN on synthetic data")
    model = CNN()
    print(f"final training loss after 60 steps: {train(model, 60):.3f}")

    section("save: the format comes from the suffix; writes are atomic")
    for name in ("cnn.safetensors", "cnn.pt"):
        path = tk.save(model, OUT / name)
        print(f"  {path}  {path.stat().st_size:>8,} bytes")
    folder = tk.save(model, OUT / "cnn-sharded", max_shard_size="10KB")
    print(f"  {folder}/  {len(list(folder.iterdir()))} files (shards + index.json)")

    section("inspect: what is inside, without reading tensor data")
    info = tk.inspect(OUT / "cnn.safetensors")
    print(f"  format {info.format}, {len(info.tensors)} tensors, {info.num_params:,} values")
    for tensor in info.tensors[:4]:
        print(f"    {tensor.name:<28} {tensor.dtype:<8} {list(tensor.shape)}")
    print("    ...")

    section("load: any file, any wrapper, with a report")
    for source in (OUT / "cnn.pt", OUT / "cnn.safetensors", folder):
        fresh = CNN()
        report = tk.load(fresh, source)
        print(f"  {report.summary()}  identical={same_weights(fresh, model)}")

    dp_path = OUT / "dataparallel.pth"
    torch.save(nn.DataParallel(model).state_dict(), dp_path)  # the classic 'module.' file
    compiled = torch.compile(CNN())
    report = tk.load(compiled, dp_path)
    print(f"  DataParallel file -> torch.compile model: {report.summary()}")
    print(f"    e.g. {report.renamed[0][0]}  ->  {report.renamed[0][1]}")

    section("the tutorials' checkpoint dict")
    ckpt = OUT / "tutorial_checkpoint.pt"
    optimizer = torch.optim.Adam(model.parameters())
    torch.save(
        {
            "epoch": 5,
            "model_state_dict": model.state_dict(),
            "optimizer_state_dict": optimizer.state_dict(),
            "loss": 0.12,
        },
        ckpt,
    )
    info = tk.inspect(ckpt)
    print(f"  weights found under {info.entry!r}; other entries: {info.extras}")
    print(f"  {tk.load(CNN(), ckpt).summary()}")

    section("fine-tuning: a new 3-class head")
    finetune = CNN(classes=3)
    try:
        tk.load(finetune, OUT / "cnn.safetensors")
    except tk.KeyMismatchError as error:
        print("  strict load refuses, loading nothing:")
        print("    " + str(error).replace("\n", "\n    "))
    report = tk.load(finetune, OUT / "cnn.safetensors", strict=False)
    print(f"  strict=False loads what fits: {report.summary()}")
    report = tk.load(finetune, OUT / "cnn.safetensors", exclude="classifier")
    print(f"  or say what to leave out:     {report.summary()}")

    section("safety: a pickle that would run a command is refused")
    marker = OUT / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {marker}",))

    evil = OUT / "innocent_looking.pt"
    torch.save({"classifier.weight": torch.zeros(10, 784), "x": Exploit()}, evil)
    try:
        tk.load(CNN(), evil)
    except tk.UnsafeFileError as error:
        print("  " + str(error).replace("\n", "\n  "))
    print(f"  command ran: {marker.exists()}")

    section("a whole-model pickle whose class no longer exists")
    legacy = pickle_with_vanished_class(model)
    info = tk.inspect(legacy)
    print(f"  {legacy.name}: classes not imported: {', '.join(info.stubbed[:2])}, ...")
    for module in info.modules[:6]:
        label = module.name or "(root)"
        print(f"    {'  ' * module.depth}{label:<14} {module.type:<40} {module.params:>7,}")
    rebuilt = CNN()
    report = tk.load(rebuilt, legacy)
    print(f"  weights into a model built in code: {report.summary()}")
    print(f"  identical to the original: {same_weights(rebuilt, model)}")

    section("save_model / load_model: no pickle, no class code in the file")
    tk.save_model(model, OUT / "cnn-model.safetensors", init={"classes": 10})
    restored = tk.load_model(OUT / "cnn-model.safetensors")
    print(
        f"  rebuilt {type(restored).__name__}, eval mode: {not restored.training}, "
        f"identical: {same_weights(restored, model)}"
    )

    section("export for deployment, each checked against the eager model")
    example = synthetic_batches(1)[0][0][:4]
    exports = ["cnn.pt2", "cnn.ts"]
    if importlib.util.find_spec("onnxruntime") is not None:
        exports.append("cnn.onnx")
    for name in exports:
        print(f"  {tk.export(restored, (example,), OUT / name)}")
    deployed = tk.load_for_inference(OUT / "cnn.pt2")
    with torch.no_grad():
        predictions = deployed(example).argmax(1).tolist()
    print(f"  load_for_inference(cnn.pt2) predicts {predictions}")

    section("bad files get clear errors")
    truncated = OUT / "truncated.safetensors"
    truncated.write_bytes((OUT / "cnn.safetensors").read_bytes()[:5000])
    for bad in (truncated, OUT / "missing.pt"):
        try:
            tk.load_state_dict(bad)
        except tk.TorchkeepError as error:
            print(f"  {type(error).__name__}: {error}")

    print("\ndemo finished; files are in", OUT.resolve())


if __name__ == "__main__":
    main()
