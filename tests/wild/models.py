"""Models of the wild-layouts corpus, and the builders of each destination model.

Every destination model is built by :func:`build` under :data:`DEST_SEED`, a seed the files
were not written with, so a name that is not loaded keeps a value that differs from the
file's. :func:`outputs` runs a model on a fixed input for the output comparisons.
"""

from __future__ import annotations

import contextlib
import importlib
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

GEN_SEED = 0
DEST_SEED = 1234
INPUT_SEED = 99

IN_DIM, HIDDEN, OUT_DIM = 8, 16, 4
LIT_HPARAMS: dict[str, Any] = {"in_dim": IN_DIM, "hidden": HIDDEN, "out_dim": OUT_DIM, "lr": 0.01}
BERT_CONFIG: dict[str, Any] = {
    "vocab_size": 100,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 37,
    "max_position_embeddings": 64,
    "type_vocab_size": 2,
}
BERT_LABELS = 3


class MLP(nn.Module):
    """Linear, BatchNorm (running statistics and an integer counter), Linear."""

    def __init__(self, in_dim: int = IN_DIM, hidden: int = HIDDEN, out_dim: int = OUT_DIM) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


class ClassNet(nn.Module):
    """The PyTorch tutorials' small CNN, shrunk: two convolutions, pooling, two Linears."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 6, 3)
        self.fc1 = nn.Linear(6 * 3 * 3, 16)
        self.fc2 = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = F.relu(self.conv2(x))
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


class WeightNormNet(nn.Module):
    """Two weight-normalised Linears: ``old=True`` uses ``nn.utils.weight_norm`` (names
    ``weight_g``/``weight_v``), otherwise ``nn.utils.parametrizations.weight_norm``."""

    def __init__(self, old: bool = False) -> None:
        super().__init__()
        norm = nn.utils.weight_norm if old else nn.utils.parametrizations.weight_norm
        self.fc1 = norm(nn.Linear(IN_DIM, HIDDEN))
        self.fc2 = norm(nn.Linear(HIDDEN, OUT_DIM), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer of every file that holds one (accelerate's load_state needs the same)."""
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 2) -> torch.Tensor:
    """A few real optimizer steps on random data (the model's input shape is inferred)."""
    model.train()
    loss = torch.zeros(())
    for _ in range(steps):
        x = example_input_for(model)
        out = model(x)
        loss = out.float().pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss


def example_input_for(model: nn.Module) -> torch.Tensor:
    inner = getattr(model, "module", model)
    if isinstance(inner, ClassNet):
        return torch.randn(4, 3, 12, 12)
    return torch.randn(4, IN_DIM)


def jitter(model: nn.Module, scale: float = 0.05) -> None:
    """Move every floating parameter and buffer off its initial value (LayerNorm's ones and
    zeros, zero biases), so a name left unloaded cannot pass for a loaded one."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.add_(torch.randn_like(tensor) * scale)


# ---------------------------------------------------------------------------------- Lightning

try:
    import lightning as L
except ImportError:  # the committed files are still read; their Lightning targets skip
    L = None

if L is not None:

    class LitNet(L.LightningModule):
        """A LightningModule whose network is ``self.net`` (state names ``net.*``)."""

        def __init__(self, cfg: Any) -> None:
            super().__init__()
            self.save_hyperparameters(cfg)
            self.net = MLP(int(cfg["in_dim"]), int(cfg["hidden"]), int(cfg["out_dim"]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self) -> Any:
            optimizer = torch.optim.Adam(self.parameters(), lr=float(self.hparams["lr"]))
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
            return {"optimizer": optimizer, "lr_scheduler": scheduler}


def lit_net() -> nn.Module:
    if L is None:
        import pytest

        pytest.skip("lightning is not installed (pip install torchkeep[test])")
    return LitNet(dict(LIT_HPARAMS))


# ------------------------------------------------------------------------------- transformers


def _transformers() -> Any:
    try:
        return importlib.import_module("transformers")
    except ImportError:
        import pytest

        pytest.skip("transformers is not installed (pip install torchkeep[test])")


def bert_config(**extra: Any) -> Any:
    return _transformers().BertConfig(**BERT_CONFIG, **extra)


def bert_mlm() -> nn.Module:
    return _transformers().BertForMaskedLM(bert_config())


def bert_base() -> nn.Module:
    return _transformers().BertModel(bert_config())


def bert_seq_cls() -> nn.Module:
    return _transformers().BertForSequenceClassification(bert_config(num_labels=BERT_LABELS))


# ------------------------------------------------------------------------ mmengine look-alike

#: A stand-in for mmengine's ``HistoryBuffer``, written to a throwaway package at generation
#: time; at test time the package is not importable, so its objects must stay inert data.
MMLIKE_PACKAGE = "mmlike_engine"
MMLIKE_SOURCES = {
    "__init__.py": "",
    "logging/__init__.py": "from .history_buffer import HistoryBuffer\n",
    "logging/history_buffer.py": '''
import numpy as np


class HistoryBuffer:
    """Scalars logged during training and how many samples each one covered."""

    _statistics_methods: dict = {}

    def __init__(self, log_history=(), count_history=(), max_length=1000000):
        self.max_length = max_length
        self._log_history = np.array(log_history)
        self._count_history = np.array(count_history)

    def update(self, value, count=1):
        self._log_history = np.append(self._log_history, value)
        self._count_history = np.append(self._count_history, count)
''',
}


@contextlib.contextmanager
def mmlike_importable() -> Iterator[Any]:
    """Make the look-alike package importable for the duration (for torch's own loader, which
    needs the class), then remove every trace of it from ``sys.path`` and ``sys.modules``."""
    root = Path(tempfile.mkdtemp(prefix="mmlike-"))
    for rel, text in MMLIKE_SOURCES.items():
        target = root / MMLIKE_PACKAGE / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module(f"{MMLIKE_PACKAGE}.logging")
    finally:
        sys.path.remove(str(root))
        for name in [m for m in sys.modules if m.split(".")[0] == MMLIKE_PACKAGE]:
            del sys.modules[name]
        shutil.rmtree(root, ignore_errors=True)


# ----------------------------------------------------------------------- destination builders


def quantized_mlp() -> nn.Module:
    return torch.ao.quantization.quantize_dynamic(MLP().eval(), {nn.Linear}, dtype=torch.qint8)


def averaged_mlp() -> nn.Module:
    return torch.optim.swa_utils.AveragedModel(MLP())


BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "mlp": MLP,
    "classnet": ClassNet,
    "dataparallel_classnet": lambda: nn.DataParallel(ClassNet()),
    "weight_norm_new": WeightNormNet,
    "quantized_mlp": quantized_mlp,
    "averaged_mlp": averaged_mlp,
    "lit_net": lit_net,
    "bert_mlm": bert_mlm,
    "bert_base": bert_base,
    "bert_seq_cls": bert_seq_cls,
}

_INPUT_KIND = {
    "classnet": "image",
    "dataparallel_classnet": "image",
    "bert_mlm": "tokens",
    "bert_base": "tokens",
    "bert_seq_cls": "tokens",
}


def seed_all(seed: int = GEN_SEED) -> None:
    """Seed torch, Python and numpy (accelerate saves all three generators)."""
    import random

    import numpy as np

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def build(name: str, seed: int = DEST_SEED) -> nn.Module:
    """The destination model ``name``, built under ``seed`` and in eval mode."""
    torch.manual_seed(seed)
    model = BUILDERS[name]()
    return model.eval()


def example_input(name: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(INPUT_SEED)
    kind = _INPUT_KIND.get(name, "vector")
    if kind == "image":
        return torch.randn(2, 3, 12, 12, generator=generator)
    if kind == "tokens":
        return torch.randint(0, BERT_CONFIG["vocab_size"], (2, 7), generator=generator)
    return torch.randn(3, IN_DIM, generator=generator)


def outputs(model: nn.Module, name: str) -> torch.Tensor:
    """The model's output on the fixed input of ``name`` (logits or last hidden state)."""
    x = example_input(name)
    with torch.no_grad():
        out = model(x) if _INPUT_KIND.get(name) != "tokens" else model(input_ids=x)
    for field in ("logits", "last_hidden_state"):
        if hasattr(out, field):
            return getattr(out, field)
    return out
