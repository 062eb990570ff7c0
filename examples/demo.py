"""torchkeep, end to end: `make demo` runs this.

Trains the tutorials' small CNN on synthetic data, checkpointing every few steps. The training
process is killed with SIGKILL in the middle of writing a checkpoint; the previous checkpoint is
intact, the half-written one is never loaded, and the run resumes from the middle of an epoch
to the same losses and weights, bit for bit, as a run that was never interrupted. Then the
weights are saved, inspected, loaded, converted and exported the ways people need to.
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchkeep as tk

OUT = Path("demo-output")
RUN = OUT / "run"


class CNN(nn.Module):
    """The tutorials' CNN: conv, batch norm, pooling, dropout, linear."""

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
            nn.Dropout(0.25),
        )
        self.classifier = nn.Linear(16 * 7 * 7, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def section(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 70 - len(title)))


def synthetic_images(count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """28x28 images where each class brightens its own band of rows: a learnable task."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (count,), generator=generator)
    images = torch.randn(count, 1, 28, 28, generator=generator) * 0.5
    for i, label in enumerate(labels.tolist()):
        images[i, 0, label * 2 : label * 2 + 4] += 2.0
    return images, labels


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------- training that can resume

# One unit throughout: a step is one batch trained; the manager numbers checkpoints by step.
EPOCHS = 4
BATCHES_PER_EPOCH = 8
TOTAL_STEPS = EPOCHS * BATCHES_PER_EPOCH
SAVE_EVERY = 5  # steps; and once more at the last step
KEEP_LAST = 3
KILL_AT_STEP = 20  # the training process is killed while writing this step's checkpoint
KILL_AFTER_BYTES = 64 * 1024


def where(step: int) -> str:
    """``step`` as an epoch and a batch within it (both counted from 1)."""
    epoch, batch = divmod(step - 1, BATCHES_PER_EPOCH)
    return f"epoch {epoch + 1}, batch {batch + 1} of {BATCHES_PER_EPOCH}"


@dataclass
class Run:
    """Everything a resume must restore: model, optimizer, LR schedule and data position."""

    model: CNN
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: tk.ResumableLoader


def build_run() -> Run:
    """A seeded run, built the same way in every process."""
    torch.set_num_threads(1)  # the same reduction order in every process
    torch.manual_seed(0)
    model = CNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=8, gamma=0.5)
    dataset = TensorDataset(*synthetic_images(BATCHES_PER_EPOCH * 32, seed=1))
    shuffled = DataLoader(
        dataset, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(42)
    )
    # ResumableLoader saves the position inside the epoch, so a resume continues mid-epoch.
    return Run(model, optimizer, scheduler, tk.ResumableLoader(shuffled))


def train(
    run: Run,
    step: int,
    manager: tk.CheckpointManager | None = None,
    before_save: Callable[[int], None] | None = None,
) -> list[float]:
    """Train from ``step`` to TOTAL_STEPS, checkpointing every SAVE_EVERY steps; the losses."""
    losses: list[float] = []
    run.model.train()  # dropout on, batch norm on batch statistics
    while step < TOTAL_STEPS:
        for images, labels in run.loader:  # after a restore: the rest of the saved epoch
            run.optimizer.zero_grad()
            loss = nn.functional.cross_entropy(run.model(images), labels)
            loss.backward()
            run.optimizer.step()
            run.scheduler.step()
            step += 1
            losses.append(float(loss.detach()))
            if manager is not None and (step % SAVE_EVERY == 0 or step == TOTAL_STEPS):
                if before_save is not None:
                    before_save(step)
                # blocking=False: the state is copied now and written by a background thread.
                manager.save(
                    step,
                    model=run.model,
                    optimizer=run.optimizer,
                    scheduler=run.scheduler,
                    data=run.loader,
                    metrics={"loss": losses[-1]},
                    blocking=False,
                )
    if manager is not None:
        manager.wait()
    return losses


def kill_during_writes(step: int, after_bytes: int) -> None:
    """SIGKILL this process from inside its own writes, once ``after_bytes`` are on disk.

    This stands in for a crash, an out-of-memory kill or a preempted machine at the worst
    moment: part of the checkpoint's data is written, and its commit is not.
    """
    written = [0]

    def wrap(real: Callable[..., int], size: Callable[..., int]) -> Callable[..., int]:
        def write(fd: int, data: Any, *rest: Any) -> int:
            if written[0] + size(data) > after_bytes:
                print(
                    f"  [training] step {step} ({where(step)}): saving a checkpoint; killed "
                    f"with SIGKILL after {written[0]:,} bytes of it were written",
                    flush=True,
                )
                os.kill(os.getpid(), signal.SIGKILL)
            written[0] += size(data)
            return real(fd, data, *rest)

        return write

    os.write = wrap(os.write, len)  # type: ignore[assignment]
    os.pwrite = wrap(os.pwrite, len)  # type: ignore[assignment]
    os.pwritev = wrap(os.pwritev, lambda views: sum(len(v) for v in views))  # type: ignore[assignment]


def training_process() -> None:
    """The run that gets killed: started as a separate process by :func:`crash_and_resume`."""

    def before_save(step: int) -> None:
        if step == KILL_AT_STEP:
            kill_during_writes(step, KILL_AFTER_BYTES)
        else:
            print(f"  [training] step {step} ({where(step)}): saving a checkpoint", flush=True)

    manager = tk.CheckpointManager(RUN, keep_last=KEEP_LAST)
    train(build_run(), 0, manager, before_save)
    raise SystemExit(f"the training process was not killed at step {KILL_AT_STEP}")


def torchkeep_cli(args: list[str], *, lines: int = 12) -> int:
    """Run ``torchkeep ARGS`` as in a terminal; print at most ``lines`` lines of its output."""
    print(f"  $ torchkeep {' '.join(args)}")
    done = subprocess.run(
        [sys.executable, "-m", "torchkeep", *args], capture_output=True, text=True, check=False
    )
    output = (done.stdout + done.stderr).rstrip().splitlines()
    if len(output) > lines:
        hidden = len(output) - lines + 1
        output = [*output[: lines - 2], f"... ({hidden} more lines)", output[-1]]
    for line in output:
        print(f"    {line}")
    return done.returncode


def crash_and_resume() -> CNN:
    section("train, get killed while saving, resume exactly")
    print(
        f"  {EPOCHS} epochs of {BATCHES_PER_EPOCH} batches: a step is one batch, "
        f"{TOTAL_STEPS} steps in all; a checkpoint every {SAVE_EVERY} steps, the last "
        f"{KEEP_LAST} kept"
    )
    child = subprocess.run([sys.executable, __file__, "--training-process"], check=False)
    if child.returncode != -signal.SIGKILL:
        raise SystemExit(f"the training process ended with status {child.returncode}")

    print("  what the killed run left (a save writes into a hidden folder, renamed when done):")
    torchkeep_cli(["ls", str(RUN)])
    manager = tk.CheckpointManager(RUN, keep_last=KEEP_LAST)
    latest = manager.latest()
    assert latest is not None
    verified = tk.verify(manager.path(latest))
    status = "OK" if verified.ok else f"DAMAGED: {verified.problems}"
    print(
        f"  the checkpoint of step {latest} is intact: tk.verify says {status} "
        f"({verified.checksums} checksums); step {KILL_AT_STEP}'s torn folder is never "
        "loaded, and the next save removes it"
    )
    if not verified.ok or latest != KILL_AT_STEP - SAVE_EVERY:
        raise SystemExit("the checkpoint before the kill is not intact")

    run = build_run()  # fresh objects, as a new process has them
    manager.restore(
        model=run.model, optimizer=run.optimizer, scheduler=run.scheduler, data=run.loader
    )
    print(
        f"  resumed from the checkpoint of step {latest} ({where(latest)}), mid-epoch: "
        "model, Adam, LR schedule, data position and random state restored"
    )
    resumed_losses = train(run, latest, manager)
    print(f"  trained on to step {TOTAL_STEPS}, checkpointing as before")

    reference = build_run()
    reference_losses = train(reference, 0)[latest:]
    same_losses = resumed_losses == reference_losses
    same_model = same_weights(run.model, reference.model)
    adam_a = [t for s in run.optimizer.state_dict()["state"].values() for t in s.values()]
    adam_b = [t for s in reference.optimizer.state_dict()["state"].values() for t in s.values()]
    same_adam = len(adam_a) == len(adam_b) and all(map(torch.equal, adam_a, adam_b))
    exact = same_losses and same_model and same_adam
    print(
        f"  compared with a run of the same {TOTAL_STEPS} steps that was never interrupted:\n"
        f"    the {len(resumed_losses)} losses after the resume (steps {latest + 1}-"
        f"{TOTAL_STEPS}), all {len(run.model.state_dict())} tensors of the model (weights and "
        f"batch-norm statistics)\n    and Adam's {len(adam_a)} state tensors are "
        + ("bit-for-bit identical" if exact else "NOT identical")
    )
    if not exact:
        raise SystemExit("the resume was not exact")
    run.model.eval()
    return run.model


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


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    model = crash_and_resume()

    section("save: the format comes from the suffix")
    for name in ("cnn.safetensors", "cnn.pt"):
        path = tk.save(model, OUT / name)
        print(f"  {path}  {path.stat().st_size:>8,} bytes")
    folder = tk.save(model, OUT / "cnn-sharded", max_shard_size="10KB")
    print(f"  {folder}/  {len(list(folder.iterdir()))} files (shards of at most 10 KB + index)")

    section("inspect: what is inside, from the header alone")
    info = tk.inspect(OUT / "cnn.safetensors")
    print(f"  format {info.format}, {len(info.tensors)} tensors, {info.num_params:,} values:")
    for tensor in info.tensors[:3]:
        print(f"    {tensor.name:<28} {tensor.dtype:<8} {list(tensor.shape)}")
    print("    ...")

    section("load: any format, any wrapper, with a report")
    for source in (OUT / "cnn.pt", OUT / "cnn.safetensors", folder):
        fresh = CNN()
        report = tk.load(fresh, source)
        print(f"  {report.summary()}; same as the trained model: {same_weights(fresh, model)}")
    dp_path = OUT / "dataparallel.pth"
    torch.save(nn.DataParallel(model).state_dict(), dp_path)  # the classic 'module.' file
    report = tk.load(torch.compile(CNN()), dp_path)
    print("  a DataParallel file into a torch.compile model, names matched:")
    print(f"    {report.summary()}")
    print(f"    e.g. {report.renamed[0][0]}  ->  {report.renamed[0][1]}")

    section("the tutorials' checkpoint dict")
    ckpt = OUT / "tutorial_checkpoint.pt"
    torch.save(
        {
            "epoch": 5,
            "model_state_dict": model.state_dict(),
            "optimizer_state_dict": torch.optim.Adam(model.parameters()).state_dict(),
            "loss": 0.12,
        },
        ckpt,
    )
    info = tk.inspect(ckpt)
    others = ", ".join(f"{k} ({v})" for k, v in info.extras.items() if k != info.entry)
    print(f"  the weights are under {info.entry!r}; the other entries: {others}")
    print(f"  {tk.load(CNN(), ckpt).summary()}")

    section("fine-tuning: a new 3-class head")
    finetune = CNN(classes=3)
    try:
        tk.load(finetune, OUT / "cnn.safetensors")
    except tk.KeyMismatchError as error:
        print("  a strict load refuses, and loads nothing:")
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
    print(f"  the command ran: {marker.exists()}")

    section("a whole-model pickle whose class no longer exists")
    legacy = pickle_with_vanished_class(model)
    info = tk.inspect(legacy)
    gone = [name for name in info.stubbed if not name.startswith("torch.")]
    print(
        f"  {legacy.name} was written by torch.save(model); its class {', '.join(gone)} "
        "cannot be imported.\n  Its module tree, read without importing or running anything:"
    )
    for module in info.modules[:5]:
        label = module.name or "(root)"
        print(f"    {'  ' * module.depth}{label:<14} {module.type:<40} {module.params:>6,} params")
    print("    ...")
    rebuilt = CNN()
    report = tk.load(rebuilt, legacy)
    print(f"  its weights, into a model built in code: {report.summary()}")
    print(f"  the same as the trained model: {same_weights(rebuilt, model)}")

    section("save_model / load_model: weights plus how to rebuild, no pickle")
    tk.save_model(model, OUT / "cnn-model.safetensors", init={"classes": 10})
    restored = tk.load_model(OUT / "cnn-model.safetensors")
    print(
        f"  load_model rebuilt {type(restored).__name__}(classes=10) in eval mode: "
        f"{not restored.training}; the same weights: {same_weights(restored, model)}"
    )

    section("export for deployment, each checked against the eager model")
    example = synthetic_images(4)[0]
    exports = ["cnn.pt2", "cnn.ts"]
    if importlib.util.find_spec("onnxruntime") is not None:
        exports.append("cnn.onnx")
    for name in exports:
        print(f"  {tk.export(restored, (example,), OUT / name)}")
    # An exported program runs code from its file: trust=True says this one is our own.
    deployed = tk.load_for_inference(OUT / "cnn.pt2", trust=True)
    with torch.no_grad():
        predicted = deployed(example).argmax(1).tolist()
    print(f"  load_for_inference(cnn.pt2, trust=True) predicts {predicted} for 4 images")

    section("the torchkeep command: the same functions from a terminal")
    print(f"  the run's checkpoints: the resumed run saved on, the last {KEEP_LAST} are kept")
    torchkeep_cli(["ls", str(RUN)])
    print("\n  the tutorial checkpoint, read without unpickling anything unsafe:")
    torchkeep_cli(["inspect", str(ckpt)], lines=15)
    bf16 = OUT / "from_tutorial.safetensors"
    print("\n  its weights as bfloat16 safetensors, half the size:")
    torchkeep_cli(["convert", str(ckpt), str(bf16), "--dtype", "bfloat16"])
    torchkeep_cli(["verify", str(bf16)])
    print(
        "\n  bfloat16 keeps about 3 significant digits, so the values differ from float32's;"
        "\n  diff's exit code is 1 when it finds differences, as diff(1)'s is:"
    )
    code = torchkeep_cli(["diff", str(OUT / "cnn.safetensors"), str(bf16)], lines=6)
    print(f"  (exit code {code}: differences found, as expected after a dtype conversion)")
    print("  within a tolerance of 1% and ignoring the dtype, they are the same (exit code 0):")
    code = torchkeep_cli(
        ["diff", str(OUT / "cnn.safetensors"), str(bf16), "--ignore-dtypes", "--rtol", "0.01"],
        lines=5,
    )
    print(f"  (exit code {code})")
    print("\n  the booby-trapped pickle, checked without loading it (exit code 3: dangerous):")
    torchkeep_cli(["scan", str(evil)])

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
    if sys.argv[1:] == ["--training-process"]:
        training_process()
    else:
        main()
