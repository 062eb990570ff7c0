"""torchkeep, end to end: `make demo` runs this.

Trains the tutorials' small CNN on synthetic data with a CheckpointManager, is killed mid-run,
resumes and matches an uninterrupted run bit for bit. Then saves and loads the weights the
ways people need to: any format, through DataParallel and torch.compile prefixes, into a model
with a new head, from a tutorial-style checkpoint dict, refusing a booby-trapped pickle, out of
a whole-model pickle whose class is gone, and exported for deployment.
Everything it writes goes to ./demo-output.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

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


# ----------------------------------------------------------------- training that can resume

EPOCHS = 4
BATCHES_PER_EPOCH = 6


def build_run() -> tuple[nn.Module, torch.optim.Optimizer, Any, torch.Generator, list]:
    """Model, Adam, a step LR schedule and a shuffling DataLoader's generator, all seeded."""
    torch.set_num_threads(1)  # the same reduction order in every process
    torch.manual_seed(0)
    model = CNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=8, gamma=0.5)
    generator = torch.Generator().manual_seed(42)
    images, labels = zip(*synthetic_batches(BATCHES_PER_EPOCH, seed=1), strict=True)
    dataset = torch.utils.data.TensorDataset(torch.cat(images), torch.cat(labels))
    loader = torch.utils.data.DataLoader(dataset, batch_size=32, shuffle=True, generator=generator)
    return model, optimizer, scheduler, generator, [loader]


def train_epochs(
    first_epoch: int,
    run: tuple[nn.Module, torch.optim.Optimizer, Any, torch.Generator, list],
    manager: tk.CheckpointManager | None = None,
    crash_at_step: int | None = None,
) -> list[float]:
    """Train from ``first_epoch`` to the end, saving each epoch; return the losses."""
    model, optimizer, scheduler, generator, (loader,) = run
    losses: list[float] = []
    for epoch in range(first_epoch, EPOCHS):
        model.train()  # dropout-free CNN, but batch norm uses batch statistics here
        for step, (images, labels) in enumerate(loader, start=epoch * BATCHES_PER_EPOCH):
            if step == crash_at_step:
                print(f"  [child] killing itself with SIGKILL at step {step}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
        if manager is not None:
            # blocking=False: the state is snapshotted now, written in the background.
            manager.save(
                epoch + 1,
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                loader_generator=generator,
                losses=losses,
                metrics={"loss": losses[-1]},
                blocking=False,
            )
    if manager is not None:
        manager.wait()
    return losses


def crashing_child(run_dir: str, crash_at_step: int) -> None:
    manager = tk.CheckpointManager(run_dir, keep_last=2)
    train_epochs(0, build_run(), manager, crash_at_step)


def crash_and_resume() -> nn.Module:
    section("train with checkpoints, get killed, resume exactly")
    run_dir = OUT / "run"
    crash_step = 2 * BATCHES_PER_EPOCH + 3  # in the middle of the third epoch
    child = subprocess.run(
        [sys.executable, __file__, "--crash-child", str(run_dir), str(crash_step)], check=False
    )
    print(f"  child exited with signal {-child.returncode} (SIGKILL); checkpoints left:")
    manager = tk.CheckpointManager(run_dir, keep_last=2)
    for checkpoint in manager.checkpoints():
        print(f"    step {checkpoint.step}: {checkpoint.path.name}  metrics {checkpoint.metrics}")

    run = build_run()  # fresh objects, as a new process would have
    model, optimizer, scheduler, generator, _ = run
    restored = manager.restore(
        model=model, optimizer=optimizer, scheduler=scheduler, loader_generator=generator
    )
    assert restored is not None
    epoch = manager.latest()
    assert epoch is not None
    print(f"  resumed from epoch {epoch} (lr now {scheduler.get_last_lr()[0]:.2e})")
    resumed_losses = restored["losses"] + train_epochs(epoch, run)

    reference_run = build_run()
    reference_losses = train_epochs(0, reference_run)
    same_losses = resumed_losses == reference_losses
    same_params = same_weights(model, reference_run[0])
    same_optimizer = all(
        torch.equal(a, b)
        for s1, s2 in zip(
            optimizer.state_dict()["state"].values(),
            reference_run[1].state_dict()["state"].values(),
            strict=True,
        )
        for a, b in zip(s1.values(), s2.values(), strict=True)
    )
    print(f"  {len(reference_losses)} losses identical to an uninterrupted run: {same_losses}")
    print(f"  parameters bit-identical: {same_params}; Adam state bit-identical: {same_optimizer}")
    if not (same_losses and same_params and same_optimizer):
        raise SystemExit("resume was not exact")
    return model


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    model = crash_and_resume()

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
    # An exported program runs code from its file: trust=True says this one is our own.
    deployed = tk.load_for_inference(OUT / "cnn.pt2", trust=True)
    with torch.no_grad():
        predictions = deployed(example).argmax(1).tolist()
    print(f"  load_for_inference(cnn.pt2) predicts {predictions}")

    section("the torchkeep command: the same functions from a terminal")
    for args in (
        ["ls", str(OUT / "run")],
        ["inspect", str(OUT / "tutorial_checkpoint.pt")],
        [
            "convert",
            str(OUT / "tutorial_checkpoint.pt"),
            str(OUT / "from_tutorial.safetensors"),
            "--dtype",
            "bfloat16",
        ],
        ["verify", str(OUT / "from_tutorial.safetensors")],
        ["diff", str(OUT / "cnn.safetensors"), str(OUT / "from_tutorial.safetensors")],
        ["scan", str(OUT / "innocent_looking.pt")],
    ):
        print(f"$ torchkeep {' '.join(args)}")
        done = subprocess.run(
            [sys.executable, "-m", "torchkeep", *args], capture_output=True, text=True, check=False
        )
        output = (done.stdout + done.stderr).rstrip()
        print("  " + output.replace("\n", "\n  "))
        print(f"  (exit code {done.returncode})")

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
    if len(sys.argv) == 4 and sys.argv[1] == "--crash-child":
        crashing_child(sys.argv[2], int(sys.argv[3]))
    else:
        main()
