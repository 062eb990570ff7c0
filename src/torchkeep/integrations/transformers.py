"""torchkeep inside the transformers ``Trainer``: checkpoints without pickle, committed whole.

One line switches a run over::

    import torchkeep as tk

    trainer = tk.transformers.Trainer(model=model, args=args, train_dataset=train)
    trainer.train()                                # checkpoint-N folders written by torchkeep
    trainer.train(resume_from_checkpoint=True)     # and restored from them

Every ``checkpoint-N`` folder holds what ``from_pretrained`` reads (``config.json``,
``generation_config.json``, the tokenizer's files, ``model.safetensors.index.json`` and its
safetensors shards, written by :func:`torchkeep.save`), the Trainer's ``trainer_state.json``,
``training_args.json``, and ``training_state/``: a native torchkeep checkpoint
(:func:`torchkeep.save_checkpoint`'s folder layout) with the optimizer, the LR scheduler, the
gradient scaler and the RNG states. Nothing in it is a pickle. The folder is filled under a
hidden temporary name and renamed into place by :mod:`torchkeep.storage.commit`, so a crash
mid-save never leaves a ``checkpoint-N`` that ``get_last_checkpoint`` or a resume would take.

Why a Trainer subclass and not a ``TrainerCallback``: ``on_save`` runs after the Trainer has
already written ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth`` and ``training_args.bin``
(pickles) straight into the visible folder and pruned older checkpoints, and resuming
``torch.load``-s those files before any callback event. Neither can be changed from a
callback. The subclass overrides only the Trainer's checkpoint methods (``_save_checkpoint``
and the ``_load_*`` methods of resuming); training itself is the Trainer's, untouched.
A project with its own Trainer subclass mixes :class:`CheckpointingMixin` in first.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from torchkeep._common import MANIFEST, SAFETENSORS_SUFFIX, TEMP_MARKER, parse_size, unwrap
from torchkeep.errors import InvalidArgumentError, MissingDependencyError
from torchkeep.formats.native import NativeCheckpoint
from torchkeep.formats.sharded import SAFETENSORS_INDEX
from torchkeep.formats.tree import Unflattener
from torchkeep.storage import commit
from torchkeep.storage.local import temp_sibling
from torchkeep.training.checkpoint import (
    DEFAULT_SHARD_SIZE,
    Snapshot,
    StagingPool,
    load_checkpoint,
    take_snapshot,
    write_native,
)
from torchkeep.training.state import restore_rng
from torchkeep.training.steps import LocalSteps
from torchkeep.weights.api import load, save

try:
    import transformers
    from transformers.modeling_utils import PreTrainedModel, remove_tied_weights_from_state_dict
    from transformers.trainer_callback import ExportableState
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy, sort_checkpoints
    from transformers.utils.import_utils import is_sagemaker_mp_enabled, is_torch_xla_available
except ImportError as exc:  # pragma: no cover - exercised with transformers hidden
    raise MissingDependencyError(
        f"torchkeep.transformers needs the transformers package ({exc}): pip install "
        "'torchkeep[transformers]'"
    ) from exc

# The native checkpoint of the training state inside each checkpoint-N folder. The Trainer
# takes sub-folders named like its optimizer or FSDP files for its own: this name is neither.
STATE_DIR = "training_state"
TRAINER_STATE = "trainer_state.json"
TRAINING_ARGS = "training_args.json"
WEIGHTS_FILE = "model" + SAFETENSORS_SUFFIX

# The Trainer methods this module replaces or calls; a Trainer without them is refused.
_NEEDED = (
    "_save_checkpoint",
    "_load_from_checkpoint",
    "_load_optimizer_and_scheduler",
    "_load_rng_state",
    "_load_best_model",
    "_get_output_dir",
    "store_flos",
)


def is_torchkeep_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a ``checkpoint-N`` folder holding torchkeep's training state."""
    return (Path(path) / STATE_DIR / MANIFEST).is_file()


if TYPE_CHECKING:
    _TrainerBase = transformers.Trainer
else:
    _TrainerBase = object


@dataclasses.dataclass
class _Save:
    """One checkpoint, captured: everything the writer needs, nothing live."""

    final: Path
    scratch: Path  # small files written at capture time, moved in by the writer
    weights: dict[str, torch.Tensor]
    state: Snapshot | None
    run_dir: Path
    keep: int | None
    best: str | None


class CheckpointingMixin(_TrainerBase):
    """Makes a ``transformers.Trainer`` write and resume checkpoints through torchkeep.

    Put it before the Trainer class: ``class MyTrainer(CheckpointingMixin, SFTTrainer)``.
    :class:`Trainer` is the mixin on ``transformers.Trainer`` itself.

    Args:
        *args: passed to the Trainer.
        max_shard_size: largest safetensors shard, for the weights and the training state.
        blocking: False writes each checkpoint in a background thread: the weights, the
            optimizer and the other state are copied into reusable CPU buffers first (so
            training may change them at once), then written and committed while training
            goes on. The next save, the end of ``train()`` and loading the best model wait
            for it and raise its error if it failed.
        **kwargs: passed to the Trainer.

    Raises:
        InvalidArgumentError: a run these checkpoints cannot hold (several processes,
            DeepSpeed, FSDP, TPU, SageMaker model parallelism, PEFT adapters).
        MissingDependencyError: a transformers whose Trainer lacks the checkpoint methods
            this class replaces.
    """

    def __init__(
        self,
        *args: Any,
        max_shard_size: int | str = DEFAULT_SHARD_SIZE,
        blocking: bool = True,
        **kwargs: Any,
    ) -> None:
        parse_size(max_shard_size)  # a bad size fails here, not in the first save
        self._tk_shard_size = max_shard_size
        self._tk_blocking = blocking
        self._tk_lock = threading.Lock()
        self._tk_pending: Future[None] | None = None
        self._tk_executor: ThreadPoolExecutor | None = None
        self._tk_weights_pool = StagingPool()
        self._tk_state_pool = StagingPool()
        super().__init__(*args, **kwargs)
        missing = [name for name in _NEEDED if not hasattr(self, name)]
        if not isinstance(self, transformers.Trainer) or missing:
            raise MissingDependencyError(
                f"{type(self).__name__} needs a transformers.Trainer with the checkpoint "
                f"methods {', '.join(_NEEDED)}; missing: {', '.join(missing) or 'the Trainer'}. "
                f"transformers {transformers.__version__} is installed; upgrade it: pip install "
                "-U 'torchkeep[transformers]', and put CheckpointingMixin before the Trainer "
                "class in the bases"
            )
        self._tk_check_setup()

    # ------------------------------------------------------------------------- checks

    def _tk_check_setup(self) -> None:
        unsupported = {
            "several processes": self.args.world_size > 1,
            "DeepSpeed": getattr(self, "is_deepspeed_enabled", False),
            "FSDP": getattr(self, "is_fsdp_enabled", False)
            or getattr(self, "is_fsdp_xla_enabled", False),
            "TPU": is_torch_xla_available(),
            "SageMaker model parallelism": is_sagemaker_mp_enabled(),
            "PEFT adapters": getattr(self._tk_model(), "_hf_peft_config_loaded", False)
            or hasattr(self.model, "peft_config"),
        }
        found = [what for what, present in unsupported.items() if present]
        if found:
            raise InvalidArgumentError(
                f"{type(self).__name__} writes checkpoints of single-process runs of a whole "
                f"model, and this run uses {', '.join(found)}; train it with "
                "transformers.Trainer, whose checkpoints cover these setups"
            )

    def _tk_model(self) -> torch.nn.Module:
        if self.model is None:
            raise InvalidArgumentError(
                f"{type(self).__name__} has no model to checkpoint: pass model= or model_init="
            )
        return unwrap(self.model)

    # ------------------------------------------------------------------------- saving

    def _save_checkpoint(self, model: Any, trial: Any, *args: Any, **kwargs: Any) -> None:
        """Capture a checkpoint now; write and commit it (in the background if not blocking)."""
        self._tk_wait()
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        run_dir = Path(self._get_output_dir(trial=trial))
        step = self.state.global_step
        final = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{step}"
        _remove_torn(run_dir)
        self._tk_mark_best(run_dir, step)
        blocking = self._tk_blocking or bool(self.args.push_to_hub)
        job = self._tk_capture(final, run_dir, blocking)
        executor = self._tk_executor
        if executor is None:
            executor = self._tk_executor = ThreadPoolExecutor(1, "torchkeep-trainer-save")
        with self._tk_lock:
            self._tk_pending = executor.submit(self._tk_write, job)
        if blocking:
            self._tk_wait()
        if self.args.push_to_hub:
            self._push_from_checkpoint(str(final))

    def _tk_mark_best(self, run_dir: Path, step: int) -> None:
        """Point the state at the best checkpoint before the state is written (as the
        Trainer does; the checkpoint being saved counts although it is not renamed yet)."""
        best = self.state.best_global_step
        strategies = (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST)
        if self.args.save_strategy in strategies and best:
            folder = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{best}"
            if best == step or folder.is_dir():
                self.state.best_model_checkpoint = str(folder)

    def _tk_capture(self, final: Path, run_dir: Path, blocking: bool) -> _Save:
        model = self._tk_model()
        weights = _weights_of(model)
        state: Snapshot | None = None
        if not self.args.save_only_model:
            entries: dict[str, object] = {
                "optimizer": self.optimizer,
                "lr_scheduler": self.lr_scheduler,
            }
            scaler = getattr(self.accelerator, "scaler", None)
            if scaler is not None:
                entries["scaler"] = scaler
            state = take_snapshot(
                entries,
                step=self.state.global_step,
                metadata={"transformers_version": transformers.__version__},
                # A blocking save holds training until the files are written: no copy needed.
                staging=None if blocking else self._tk_state_pool,
            )
        if not blocking:
            weights = self._tk_weights_pool.stage(weights)
        scratch = temp_sibling(final)
        scratch.mkdir(parents=True)
        try:
            self._tk_write_small_files(model, scratch)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        limit = self.args.save_total_limit
        return _Save(
            final=final,
            scratch=scratch,
            weights=weights,
            state=state,
            run_dir=run_dir,
            keep=limit if limit is not None and limit > 0 else None,
            best=self.state.best_model_checkpoint,
        )

    def _tk_write_small_files(self, model: torch.nn.Module, folder: Path) -> None:
        """The configuration, tokenizer and Trainer state, as they are at this step."""
        if isinstance(model, PreTrainedModel):
            # What save_pretrained records, so that AutoModel classes find the architecture.
            model.config.dtype = str(model.dtype).removeprefix("torch.")
            model.config.architectures = [type(model).__name__]
            model.config.save_pretrained(folder)
            if model.can_generate() and model.generation_config is not None:
                model.generation_config.save_pretrained(folder)
        tokenizer = self.processing_class
        if tokenizer is None:
            tokenizer = getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(folder))
        self._tk_record_callbacks()
        text = json.dumps(dataclasses.asdict(self.state), indent=2, sort_keys=True) + "\n"
        (folder / TRAINER_STATE).write_text(text, encoding="utf-8")
        args_text = self.args.to_json_string()  # type: ignore[no-untyped-call]
        (folder / TRAINING_ARGS).write_text(args_text + "\n", encoding="utf-8")

    def _tk_record_callbacks(self) -> None:
        """Store the state of every exportable callback (and the control) in the state."""
        for callback in [*self.callback_handler.callbacks, self.control]:
            if not isinstance(callback, ExportableState):
                continue
            name = type(callback).__name__
            # A dict of states by class name once the Trainer set it up, whatever its type says.
            records: dict[str, Any] = self.state.stateful_callbacks  # type: ignore[assignment]
            stored = records.get(name)
            if isinstance(stored, list):
                stored.append(callback.state())
            else:
                records[name] = callback.state()

    def _tk_write(self, job: _Save) -> None:
        """Write a captured checkpoint, commit it, then apply ``save_total_limit``."""
        try:
            with commit.folder(job.final) as target:
                folder = Path(target.where)
                # The commit fsyncs every file of the folder, so this save need not.
                save(job.weights, folder, max_shard_size=self._tk_shard_size, durable=False)
                for item in job.scratch.iterdir():
                    item.replace(folder / item.name)
                if job.state is not None:
                    write_native(job.state, folder / STATE_DIR, max_shard_size=self._tk_shard_size)
        finally:
            shutil.rmtree(job.scratch, ignore_errors=True)
        if job.keep is not None:
            _retain(job.run_dir, job.keep, job.best)

    def _tk_wait(self) -> None:
        """Wait for the checkpoint being written, raising its error if it failed."""
        with self._tk_lock:
            pending, self._tk_pending = self._tk_pending, None
        if pending is not None:
            pending.result()

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """``transformers.Trainer.train``; returns once every checkpoint is committed."""
        try:
            result = super().train(*args, **kwargs)
        except BaseException:
            with self._tk_lock:
                pending, self._tk_pending = self._tk_pending, None
            if pending is not None:
                # The training error is the one to see; the save's own error stays on it.
                pending.exception()
            raise
        finally:
            self._tk_stop_writer()
        self._tk_wait()
        return result

    def _tk_stop_writer(self) -> None:
        """Let the writer thread end once its work is done; the next save starts another."""
        executor, self._tk_executor = self._tk_executor, None
        if executor is not None:
            executor.shutdown(wait=False)

    def _finalize_training(self, *args: Any, **kwargs: Any) -> Any:
        # Before the Trainer loads the best model or prunes checkpoints at the end.
        self._tk_wait()
        return super()._finalize_training(*args, **kwargs)  # type: ignore[no-untyped-call]

    # ----------------------------------------------------------------------- resuming

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: torch.nn.Module | None = None
    ) -> None:
        """Load the weights of a checkpoint with :func:`torchkeep.load` (no pickle)."""
        target = unwrap(model) if model is not None else self._tk_model()
        if not self._tk_load_weights(target, Path(resume_from_checkpoint)):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _tk_load_weights(self, model: torch.nn.Module, folder: Path) -> bool:
        """Load the safetensors weights of ``folder`` into ``model``; False when it has none."""
        if (folder / SAFETENSORS_INDEX).is_file():
            source = folder
        elif (folder / WEIGHTS_FILE).is_file():
            source = folder / WEIGHTS_FILE
        else:
            return False
        # Names a model leaves out of its saves on purpose come back from elsewhere.
        ignored = getattr(model, "_keys_to_ignore_on_save", None)
        load(model, source, strict=not ignored)
        return True

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Restore the optimizer, the LR scheduler and the scaler from ``training_state/``."""
        if checkpoint is None:
            return
        if not is_torchkeep_checkpoint(checkpoint):
            super()._load_optimizer_and_scheduler(checkpoint)
            return
        folder = Path(checkpoint) / STATE_DIR
        targets: dict[str, Any] = {
            "optimizer": self.optimizer,
            "lr_scheduler": self.lr_scheduler,
        }
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and "scaler" in _entries(folder):
            targets["scaler"] = scaler
        # The RNG states wait for _load_rng_state: the Trainer restores them only after the
        # data loader has drawn its own random numbers for the resumed epoch.
        load_checkpoint(folder, rng=False, **targets)

    def _load_scaler(self, checkpoint: str | None) -> None:
        if checkpoint is not None and not is_torchkeep_checkpoint(checkpoint):
            super()._load_scaler(checkpoint)
        # torchkeep's checkpoints restore the scaler with the optimizer.

    def _load_rng_state(self, checkpoint: str | None) -> None:
        """Restore the Python, numpy, torch and CUDA RNG states of ``training_state/``."""
        if checkpoint is None:
            return
        if not is_torchkeep_checkpoint(checkpoint):
            super()._load_rng_state(checkpoint)
            return
        folder = Path(checkpoint) / STATE_DIR
        with NativeCheckpoint(folder) as native:
            # Only the RNG node is decoded: the optimizer's tensors are not read again.
            rng = Unflattener(native.tensor, where=str(folder)).decode(
                native.manifest["rng"], "__rng__"
            )
        if isinstance(rng, Mapping):
            restore_rng(rng)

    def _load_best_model(self) -> None:
        self._tk_wait()
        best = self.state.best_model_checkpoint
        if best is None or not self._tk_load_weights(self._tk_model(), Path(best)):
            super()._load_best_model()


class Trainer(CheckpointingMixin, transformers.Trainer):
    """``transformers.Trainer`` whose checkpoints torchkeep writes and restores.

    Takes every argument of ``transformers.Trainer`` plus the keywords of
    :class:`CheckpointingMixin` (``max_shard_size=``, ``blocking=``).

    Example:
        >>> trainer = Trainer(model=model, args=args, train_dataset=train, blocking=False)
        >>> trainer.train(resume_from_checkpoint=True)
    """


# --------------------------------------------------------------------------- helpers


def _weights_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors ``save_pretrained`` would write: one of each tied group, none ignored."""
    weights = dict(model.state_dict())
    for name in getattr(model, "_keys_to_ignore_on_save", None) or ():
        weights.pop(name, None)
    if isinstance(model, PreTrainedModel):
        weights = remove_tied_weights_from_state_dict(weights, model)
    return weights


def _entries(folder: Path) -> set[str]:
    with NativeCheckpoint(folder) as native:
        return set(native.manifest["state"])


def _remove_torn(run_dir: Path) -> None:
    """Remove what interrupted saves left: hidden ``.checkpoint-*`` temporary folders."""
    if not run_dir.is_dir():
        return
    prefix = f"{PREFIX_CHECKPOINT_DIR}-"
    for entry in run_dir.iterdir():
        name = entry.name
        # Nested temporary names (a weights folder inside a checkpoint's) start with "..".
        if name.startswith(".") and name.lstrip(".").startswith(prefix) and TEMP_MARKER in name:
            shutil.rmtree(entry, ignore_errors=True)


def _retain(run_dir: Path, keep: int, best: str | None) -> None:
    """Delete the oldest checkpoints beyond ``keep``, sparing the newest and the best.

    The order is the Trainer's (``sort_checkpoints``), so the same folders remain as with
    ``transformers.Trainer``. Each is renamed out of sight before it is removed, so a crash
    mid-deletion leaves no half-deleted ``checkpoint-N``.
    """
    ordered = sort_checkpoints(str(run_dir), use_mtime=True)
    if len(ordered) <= keep:
        return
    spared = {ordered[-1]} | ({str(Path(best))} if best is not None else set())
    surplus = len(ordered) - max(keep, len(spared))
    steps = LocalSteps(run_dir)
    for folder in ordered:
        if surplus <= 0:
            break
        if folder not in spared:
            steps.delete(Path(folder))
            surplus -= 1


__all__ = ["STATE_DIR", "CheckpointingMixin", "Trainer", "is_torchkeep_checkpoint"]
