"""Mid-epoch resume: the data position is saved, and restoring it is bit-exact.

In-process checks replay a saved position into a fresh loader and compare the remaining
batches *and* the random numbers drawn after them with the uninterrupted run; the end-to-end
checks kill a training run (dropout, shuffling loader with two workers, background saves)
with SIGKILL mid-epoch and resume it in a new process (tests/helpers/data_resume_worker.py).
"""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import torchkeep as tk

HELPERS = Path(__file__).parent / "helpers"
sys.path.insert(0, str(HELPERS))
import data_resume_worker  # noqa: E402

stateful_dataloader = pytest.importorskip("torchdata.stateful_dataloader")
StatefulDataLoader = stateful_dataloader.StatefulDataLoader

DATA = TensorDataset(torch.arange(40).float().unsqueeze(1))
Make = Callable[[], Any]


def plain(workers: int = 0, generator: bool = False, batch_size: int | None = 4) -> Make:
    def make() -> Any:
        own = torch.Generator().manual_seed(5) if generator else None
        return DataLoader(
            DATA, batch_size=batch_size, shuffle=True, num_workers=workers, generator=own
        )

    return make


def stateful(workers: int = 0) -> Make:
    return lambda: StatefulDataLoader(DATA, batch_size=4, shuffle=True, num_workers=workers)


def flat(batch: Any) -> list[float]:
    (values,) = batch
    return values.flatten().tolist()


def run(loader: Any, save_at: tuple[int, int]) -> tuple[list[Any], Any]:
    """Two epochs; after each batch a random number (standing in for dropout) is drawn.

    Returns every (batch, number) and, taken after batch ``save_at`` of that epoch, what a
    checkpoint would hold: the loader's state, the global RNG state and how far it was.
    """
    seen: list[Any] = []
    saved: Any = None
    for epoch in range(2):
        for i, batch in enumerate(loader):
            seen.append((flat(batch), torch.rand(1).item()))
            if (epoch, i) == save_at:
                saved = (copy.deepcopy(loader.state_dict()), torch.get_rng_state(), len(seen))
    return seen, saved


def resume(loader: Any, saved: Any, epochs: int = 1) -> list[Any]:
    """The rest of the saved epoch, then ``epochs - 1`` more, as :func:`run` saw them."""
    state, rng, _ = saved
    loader.load_state_dict(state)
    torch.set_rng_state(rng)
    return [(flat(batch), torch.rand(1).item()) for _ in range(epochs) for batch in loader]


CASES = {
    "plain": plain(),
    "plain-own-generator": plain(generator=True),
    "plain-unbatched": plain(batch_size=None),
    "stateful": stateful(),
}
# Worker processes take a while to start: the middle of an epoch only.
WORKERS = {
    "plain-workers": plain(workers=2),
    "plain-workers-own-generator": plain(workers=2, generator=True),
    "stateful-workers": stateful(workers=2),
}
POSITIONS = {"first": (0, 0), "mid": (1, 3), "last": (1, 9)}


@pytest.mark.parametrize(
    ("make", "save_at"),
    [
        *((make, at) for make in CASES.values() for at in POSITIONS.values()),
        *((make, POSITIONS["mid"]) for make in WORKERS.values()),
    ],
    ids=[
        *(f"{name}-{at}" for name in CASES for at in POSITIONS),
        *(f"{name}-mid" for name in WORKERS),
    ],
)
def test_a_restored_position_continues_with_the_same_batches_and_random_numbers(
    make: Make, save_at: tuple[int, int]
) -> None:
    if make is CASES["plain-unbatched"] and save_at == POSITIONS["last"]:
        save_at = (1, 39)  # one sample a batch: 40 of them an epoch
    torch.manual_seed(0)
    seen, saved = run(tk.ResumableLoader(make()), save_at)
    assert saved is not None
    torch.manual_seed(99)  # a new process: its own generator state until the restore
    rest = resume(tk.ResumableLoader(make()), saved, epochs=2 - save_at[0])
    assert rest == seen[saved[2] :]
    assert len(rest) == len(seen) - saved[2]


@pytest.mark.parametrize("make", [plain(workers=2), stateful(workers=2)], ids=["plain", "stateful"])
def test_the_wrapper_changes_nothing_in_an_uninterrupted_run(make: Make) -> None:
    torch.manual_seed(0)
    wrapped, _ = run(tk.ResumableLoader(make()), (9, 9))
    torch.manual_seed(0)
    bare, _ = run(make(), (9, 9))
    assert wrapped == bare


def test_a_bare_stateful_loader_resumes_its_batches_but_not_the_random_numbers() -> None:
    """Why the wrapper exists: the restored iterator draws fresh seeds from the restored
    global generator, and a warning says so when the manager restores such a loader."""
    torch.manual_seed(0)
    seen, saved = run(stateful()(), (1, 3))
    torch.manual_seed(99)
    rest = resume(stateful()(), saved)
    assert [batch for batch, _ in rest] == [batch for batch, _ in seen[saved[2] :]]
    assert [number for _, number in rest] != [number for _, number in seen[saved[2] :]]


def test_restoring_a_bare_stateful_loader_warns(tmp_path: Path) -> None:
    loader = stateful()()
    for _ in zip(range(2), loader, strict=False):
        pass
    tk.save_checkpoint(tmp_path / "ckpt", data=loader)
    with pytest.warns(tk.TorchkeepWarning, match="ResumableLoader"):
        tk.load_checkpoint(tmp_path / "ckpt", data=stateful()())


def test_saving_a_plain_loader_says_how_to_keep_its_position(tmp_path: Path) -> None:
    with pytest.raises(tk.InvalidStateError, match=r"ResumableLoader\(DataLoader"):
        tk.save_checkpoint(tmp_path / "ckpt", data=plain()())
    assert not (tmp_path / "ckpt").exists()


class Stream(IterableDataset[int]):
    def __iter__(self) -> Iterator[int]:
        return iter(range(10))


def test_an_iterable_dataset_needs_a_stateful_loader() -> None:
    with pytest.raises(tk.InvalidArgumentError, match="StatefulDataLoader"):
        tk.ResumableLoader(DataLoader(Stream(), batch_size=2))
    with pytest.raises(tk.InvalidArgumentError, match="DataLoader"):
        tk.ResumableLoader([1, 2, 3])  # type: ignore[arg-type]


def test_a_position_restores_only_into_a_loader_of_its_kind() -> None:
    saved = tk.ResumableLoader(plain()()).state_dict()
    with pytest.raises(tk.InvalidStateError, match="kind"):
        tk.ResumableLoader(stateful()()).load_state_dict(saved)
    with pytest.raises(tk.InvalidStateError, match="generator states"):
        tk.ResumableLoader(plain(generator=True)()).load_state_dict(saved)


def test_the_wrapper_reads_like_the_loader() -> None:
    loader = plain()()
    wrapped = tk.ResumableLoader(loader)
    assert len(wrapped) == len(loader) == 10
    assert wrapped.dataset is DATA and wrapped.batch_size == 4 and wrapped.sampler is loader.sampler
    assert tk.ResumableLoader(wrapped).loader is loader


def worker(*args: str) -> None:
    subprocess.run(
        [sys.executable, str(HELPERS / "data_resume_worker.py"), *args],
        check=True,
        capture_output=True,
        timeout=120,
    )


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["plain", "stateful"])
def test_a_run_killed_mid_epoch_resumes_bit_exact_in_a_new_process(
    tmp_path: Path, mode: str
) -> None:
    threads = torch.get_num_threads()
    try:  # the uninterrupted run, here: the same code as the worker's, without a kill
        reference: dict[str, Any] = data_resume_worker.train(mode, str(tmp_path / "reference"))
    finally:
        torch.set_num_threads(threads)
    kill_at = 9  # the fourth of six batches in the second epoch
    with pytest.raises(subprocess.CalledProcessError) as killed:
        worker(mode, str(tmp_path / "run"), str(tmp_path / "unused.pt"), str(kill_at))
    assert killed.value.returncode == -9  # SIGKILL, during or right after a background save
    assert not (tmp_path / "unused.pt").exists()
    steps = tk.CheckpointManager(tmp_path / "run").steps()
    assert steps and steps[-1] in (kill_at - 1, kill_at)  # the save in flight may be lost

    worker(mode, str(tmp_path / "run"), str(tmp_path / "resumed.pt"))
    resumed = torch.load(tmp_path / "resumed.pt")
    first = resumed["first_step"]
    assert first == steps[-1] and first % 6 != 0  # mid-epoch
    assert resumed["losses"] == reference["losses"][first:]
    assert resumed["model"].keys() == reference["model"].keys()
    for name, tensor in reference["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name
