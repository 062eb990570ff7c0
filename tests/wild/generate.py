"""Write the wild-layouts corpus: checkpoint files made by the tools people train with.

Run ``.venv/bin/python tests/wild/generate.py [outdir]`` (default ``tests/data/wild``). Each
writer below uses the real library where one is installed here (Lightning's Trainer and
ModelCheckpoint, transformers' ``save_pretrained``, accelerate's ``save_state``,
``torch.ao`` dynamic quantization, TorchScript, torchkeep's own ``save_checkpoint``) and
reproduces the exact dict layout of the training scripts that only call ``torch.save`` (the
PyTorch tutorial, the ImageNet example, torchvision's and timm's reference scripts, mmengine,
DeepSpeed, FSDP). ``cases.json`` records, for each file, how torch's own path reads it and
which model it belongs in; ``tests/test_wild.py`` reads it.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import sys
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The pickles must name wild.models.<Class>, never __main__.<Class>.
import torchkeep
from wild import models
from wild.models import GEN_SEED, LIT_HPARAMS, MLP, ClassNet, WeightNormNet

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "data" / "wild"

Case = dict[str, Any]


def _trained(cls: Callable[[], nn.Module], steps: int = 2) -> tuple[nn.Module, Any, Any]:
    torch.manual_seed(GEN_SEED)
    model = cls()
    optimizer = models.sgd(model)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    for _ in range(steps):
        models.train_steps(model, optimizer, steps=1)
        scheduler.step()
    return model.eval(), optimizer, scheduler


def _ema(model: nn.Module, decay: float = 0.9) -> nn.Module:
    """A plain copy whose values are an exponential moving average (timm's ModelEmaV2)."""
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for tensor in [*ema.parameters(), *ema.buffers()]:
            if tensor.is_floating_point():
                tensor.mul_(decay).add_(torch.randn_like(tensor), alpha=1 - decay)
    return ema


def _torch_ref(key: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"read": "torch", "key": key, **extra}


# ---------------------------------------------------------------------------------- Lightning


def lightning(out: Path) -> list[Case]:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from omegaconf import OmegaConf
    from torch.utils.data import DataLoader, TensorDataset

    cases = []
    for name, hparams in (
        ("lightning_omegaconf", OmegaConf.create(LIT_HPARAMS)),
        ("lightning_dict", dict(LIT_HPARAMS)),
    ):
        torch.manual_seed(GEN_SEED)
        module = models.LitNet(hparams)
        g = torch.Generator().manual_seed(GEN_SEED)
        data = TensorDataset(torch.randn(8, models.IN_DIM, generator=g), torch.randint(0, 4, (8,)))
        with tempfile.TemporaryDirectory() as tmp:
            checkpoints = ModelCheckpoint(dirpath=tmp, filename="last")
            trainer = L.Trainer(
                accelerator="cpu",
                devices=1,
                max_steps=2,
                logger=False,
                enable_checkpointing=True,
                callbacks=[checkpoints],
                enable_progress_bar=False,
                enable_model_summary=False,
                default_root_dir=tmp,
            )
            trainer.fit(module, DataLoader(data, batch_size=4))
            if not checkpoints.best_model_path:
                raise RuntimeError("Lightning's ModelCheckpoint wrote no checkpoint")
            shutil.copyfile(checkpoints.best_model_path, out / f"{name}.ckpt")
        cases.append(
            {
                "name": name,
                "path": f"{name}.ckpt",
                "tool": f"lightning {L.__version__}",
                "layout": "Trainer + ModelCheckpoint .ckpt; LightningModule.net -> 'net.*' names; "
                + (
                    "save_hyperparameters(omegaconf DictConfig)"
                    if name.endswith("omegaconf")
                    else "save_hyperparameters(dict)"
                ),
                "entry": "state_dict",
                "weights": _torch_ref("state_dict"),
                "not_weights": ["epoch", "global_step", "hyper_parameters"],
                "needs": ["lightning", "omegaconf"],
                "targets": [
                    {"model": "lit_net", "reference": {"read": "lightning"}},
                    {"model": "mlp", "reference": _torch_ref("state_dict", strip="net.")},
                ],
            }
        )
    return cases


# ------------------------------------------------------------------------------- transformers


def transformers_files(out: Path) -> list[Case]:
    import transformers

    version = f"transformers {transformers.__version__}"
    torch.manual_seed(GEN_SEED)
    mlm = models.bert_mlm()
    models.jitter(mlm)
    mlm.eval()
    mlm.save_pretrained(out / "bert_mlm")
    (out / "bert_mlm_bin").mkdir()
    mlm.config.save_pretrained(out / "bert_mlm_bin")
    torch.save(mlm.state_dict(), out / "bert_mlm_bin" / "pytorch_model.bin")

    torch.manual_seed(GEN_SEED + 1)
    base = models.bert_base()
    models.jitter(base)
    base.eval().save_pretrained(out / "bert_base")
    return [
        {
            "name": "bert_mlm_safetensors",
            "path": "bert_mlm/model.safetensors",
            "tool": version,
            "layout": "BertForMaskedLM.save_pretrained: tied decoder weight stored once",
            "entry": "",
            "weights": {"read": "safetensors", "key": None},
            "not_weights": [],
            "needs": ["transformers"],
            "targets": [{"model": "bert_mlm", "reference": {"read": "hf", "dir": "bert_mlm"}}],
        },
        {
            "name": "bert_mlm_bin",
            "path": "bert_mlm_bin/pytorch_model.bin",
            "tool": version,
            "layout": "torch.save(BertForMaskedLM.state_dict()): both tied names present",
            "entry": "",
            "weights": _torch_ref(),
            "not_weights": [],
            "needs": ["transformers"],
            "targets": [{"model": "bert_mlm", "reference": _torch_ref()}],
        },
        {
            "name": "bert_base_to_task",
            "path": "bert_base/model.safetensors",
            "tool": version,
            "layout": "BertModel.save_pretrained (no 'bert.' prefix) loaded into "
            "BertForSequenceClassification (a new classifier head)",
            "entry": "",
            "weights": {"read": "safetensors", "key": None},
            "not_weights": [],
            "needs": ["transformers"],
            "targets": [
                {
                    "model": "bert_seq_cls",
                    "reference": {"read": "safetensors", "key": None, "into": "bert"},
                    "load": {"exclude": ["classifier"]},
                    "untouched": ["classifier.weight", "classifier.bias"],
                },
                {"model": "bert_base", "reference": {"read": "hf", "dir": "bert_base"}},
            ],
        },
    ]


# --------------------------------------------------------------------------------- accelerate


def accelerate_files(out: Path) -> list[Case]:
    import accelerate
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    models.seed_all(GEN_SEED)
    model = MLP()
    optimizer = models.sgd(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    models.train_steps(model, optimizer)
    accelerator.save_state(out / "accelerate_state")
    accelerator.save_state(out / "accelerate_state_bin", safe_serialization=False)
    cases = []
    for folder, weights, read in (
        ("accelerate_state", "model.safetensors", "safetensors"),
        ("accelerate_state_bin", "pytorch_model.bin", "torch"),
    ):
        cases.append(
            {
                "name": folder,
                "path": f"{folder}/{weights}",
                "tool": f"accelerate {accelerate.__version__}",
                "layout": f"Accelerator.save_state folder ({weights}, optimizer.bin, "
                "random_states_0.pkl)",
                "entry": "",
                "weights": {"read": read, "key": None},
                "not_weights": [],
                "needs": ["accelerate"],
                "targets": [
                    {"model": "mlp", "reference": {"read": "accelerate", "dir": folder}},
                ],
            }
        )
    return cases


# ------------------------------------------------------------------------------ torch itself


def quantized(out: Path) -> list[Case]:
    model, _, _ = _trained(MLP)
    q = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    torch.save(q.state_dict(), out / "quantized_dynamic.pt")
    return [
        {
            "name": "quantized_dynamic",
            "path": "quantized_dynamic.pt",
            "tool": f"torch {torch.__version__} (torch.ao.quantization.quantize_dynamic)",
            "layout": "state dict with LinearPackedParams: '_packed_params._packed_params' "
            "(qint8 weight, bias) tuples and a dtype value",
            "entry": "",
            "weights": _torch_ref(),
            "not_weights": [],
            "needs": [],
            "targets": [{"model": "quantized_mlp", "reference": _torch_ref()}],
        }
    ]


def weight_norm(out: Path) -> list[Case]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model, _, _ = _trained(lambda: WeightNormNet(old=True))
    torch.save(model.state_dict(), out / "weight_norm_old.pt")
    return [
        {
            "name": "weight_norm_old",
            "path": "weight_norm_old.pt",
            "tool": f"torch {torch.__version__} (nn.utils.weight_norm)",
            "layout": "old weight_norm names 'weight_g'/'weight_v' loaded into "
            "parametrizations.weight_norm (a load_state_dict pre-hook renames them)",
            "entry": "",
            "weights": _torch_ref(),
            "not_weights": [],
            "needs": [],
            "targets": [{"model": "weight_norm_new", "reference": _torch_ref()}],
        }
    ]


def averaged(out: Path) -> list[Case]:
    torch.manual_seed(GEN_SEED)
    model = MLP()
    swa = torch.optim.swa_utils.AveragedModel(model)
    optimizer = models.sgd(model)
    for _ in range(3):
        models.train_steps(model, optimizer, steps=1)
        swa.update_parameters(model)
    torch.save(swa.state_dict(), out / "averaged_model.pt")
    return [
        {
            "name": "averaged_model",
            "path": "averaged_model.pt",
            "tool": f"torch {torch.__version__} (optim.swa_utils.AveragedModel)",
            "layout": "AveragedModel.state_dict(): 'n_averaged' and 'module.*'",
            "entry": "",
            "weights": _torch_ref(),
            "not_weights": [],
            "needs": [],
            "targets": [
                {"model": "averaged_mlp", "reference": _torch_ref()},
                {
                    "model": "mlp",
                    "reference": _torch_ref(strip="module.", drop=["n_averaged"]),
                },
            ],
        }
    ]


def tutorials(out: Path) -> list[Case]:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    cases = []
    version = f"torch {torch.__version__}"

    # pytorch.org "Saving and loading a general checkpoint"; the loss is the real loss tensor.
    model, optimizer, _ = _trained(ClassNet)
    loss = models.train_steps(model, optimizer, steps=1)
    model.eval()
    general = {
        "epoch": 5,
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "loss": loss,
    }
    torch.save(general, out / "tutorial_general.pt")
    torch.save({**general, "model": model}, out / "tutorial_with_model.pt")
    for name, layout in (
        ("tutorial_general", "{'epoch','model_state_dict','optimizer_state_dict','loss'}"),
        ("tutorial_with_model", "the tutorial dict plus 'model': the whole ClassNet pickled"),
    ):
        cases.append(
            {
                "name": name,
                "path": f"{name}.pt",
                "tool": f"{version} (pytorch.org tutorial)",
                "layout": layout,
                "entry": "model_state_dict",
                "weights": _torch_ref("model_state_dict"),
                "not_weights": ["epoch", "loss"],
                "needs": [],
                "targets": [{"model": "classnet", "reference": _torch_ref("model_state_dict")}],
            }
        )

    # pytorch/examples imagenet/main.py: a DataParallel model, best_acc1 from accuracy().
    model, optimizer, scheduler = _trained(ClassNet)
    parallel = nn.DataParallel(model)
    torch.save(
        {
            "epoch": 3,
            "arch": "classnet",
            "state_dict": parallel.state_dict(),
            "best_acc1": torch.tensor([37.5]),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
        },
        out / "imagenet_example.pth.tar",
    )
    cases.append(
        {
            "name": "imagenet_example",
            "path": "imagenet_example.pth.tar",
            "tool": f"{version} (pytorch/examples imagenet/main.py)",
            "layout": "{'epoch','arch','state_dict' (module. names),'best_acc1' tensor,"
            "'optimizer','scheduler'}",
            "entry": "state_dict",
            "weights": _torch_ref("state_dict"),
            "not_weights": ["epoch", "arch", "best_acc1"],
            "needs": [],
            "targets": [
                {"model": "classnet", "reference": _torch_ref("state_dict", strip="module.")},
                {"model": "dataparallel_classnet", "reference": _torch_ref("state_dict")},
            ],
        }
    )

    # torchvision references/classification/train.py with --model-ema.
    model, optimizer, scheduler = _trained(ClassNet)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.99), use_buffers=True)
    models.train_steps(model, optimizer, steps=1)
    ema.update_parameters(model)
    model.eval()
    args = argparse.Namespace(
        model="classnet", lr=0.05, epochs=3, batch_size=4, model_ema=True, output_dir="."
    )
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": scheduler.state_dict(),
            "epoch": 2,
            "args": args,
            "model_ema": ema.state_dict(),
        },
        out / "torchvision_reference.pth",
    )
    cases.append(
        {
            "name": "torchvision_reference",
            "path": "torchvision_reference.pth",
            "tool": f"{version} (torchvision references/classification)",
            "layout": "{'model','model_ema' (module.* + n_averaged),'optimizer','lr_scheduler',"
            "'epoch','args': Namespace}",
            "entry": "model",
            "weights": _torch_ref("model"),
            "not_weights": ["epoch", "args"],
            "needs": [],
            "targets": [{"model": "classnet", "reference": _torch_ref("model")}],
        }
    )

    # timm train.py CheckpointSaver with --model-ema.
    model, optimizer, _ = _trained(ClassNet)
    torch.save(
        {
            "epoch": 4,
            "arch": "classnet",
            "state_dict": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "version": 2,
            "args": argparse.Namespace(model="classnet", lr=0.05, model_ema=True, epochs=5),
            "state_dict_ema": _ema(model).state_dict(),
            "metric": 41.25,
        },
        out / "timm_checkpoint.pth.tar",
    )
    cases.append(
        {
            "name": "timm_checkpoint",
            "path": "timm_checkpoint.pth.tar",
            "tool": f"{version} (timm CheckpointSaver layout)",
            "layout": "{'epoch','arch','state_dict','state_dict_ema','optimizer','version',"
            "'args','metric'}",
            "entry": "state_dict",
            "weights": _torch_ref("state_dict"),
            "not_weights": ["epoch", "arch", "version", "args", "metric"],
            "needs": [],
            "targets": [{"model": "classnet", "reference": _torch_ref("state_dict")}],
        }
    )

    # mmengine Runner.save_checkpoint: message_hub holds HistoryBuffer objects.
    model, optimizer, scheduler = _trained(ClassNet)
    with models.mmlike_importable() as mm:
        loss_buffer = mm.HistoryBuffer()
        for value in (2.5, 2.25):
            loss_buffer.update(value)
        torch.save(
            {
                "meta": {
                    "mmengine_version": "0.10.4",
                    "epoch": 1,
                    "iter": 2,
                    "cfg": "model = dict(type='ClassNet')\noptim_wrapper = dict(lr=0.05)\n",
                    "seed": GEN_SEED,
                    "experiment_name": "classnet_20240101_000000",
                    "time": "20240101_000000",
                    "dataset_meta": {"classes": ("cat", "dog")},
                },
                "state_dict": model.state_dict(),
                "message_hub": {
                    "log_scalars": {
                        "train/loss": loss_buffer,
                        "train/lr": mm.HistoryBuffer([0.05, 0.05], [1, 1]),
                    },
                    "runtime_info": {"epoch": 1, "iter": 2, "max_iters": 2},
                    "resumed_keys": {"epoch": True, "iter": True},
                },
                "optimizer": optimizer.state_dict(),
                "param_schedulers": [scheduler.state_dict()],
            },
            out / "mmengine_style.pth",
        )
    cases.append(
        {
            "name": "mmengine_style",
            "path": "mmengine_style.pth",
            "tool": f"{version} (mmengine Runner.save_checkpoint layout)",
            "layout": "{'meta','state_dict','message_hub' (objects of a class that is not "
            "importable when loading),'optimizer','param_schedulers'}",
            "entry": "state_dict",
            "weights": _torch_ref("state_dict"),
            "not_weights": ["meta", "message_hub"],
            "needs": ["mmlike"],
            "targets": [{"model": "classnet", "reference": _torch_ref("state_dict")}],
        }
    )
    return cases


def distributed_exports(out: Path) -> list[Case]:
    """DeepSpeed and FSDP outputs, written with the dict layout those libraries produce."""
    version = f"torch {torch.__version__}"
    model, _, _ = _trained(MLP)
    half = copy.deepcopy(model).half()
    state = half.state_dict()
    folder = out / "deepspeed" / "global_step2"
    folder.mkdir(parents=True)
    torch.save(
        {
            "module": state,
            "buffer_names": [name for name, _ in half.named_buffers()],
            "optimizer": None,
            "lr_scheduler": None,
            "data_sampler": None,
            "random_ltd": None,
            "sparse_tensor_module_names": set(),
            "skipped_steps": 0,
            "global_steps": 2,
            "global_samples": 8,
            "dp_world_size": 1,
            "mp_world_size": 1,
            "ds_config": {
                "train_micro_batch_size_per_gpu": 4,
                "fp16": {"enabled": True},
                "zero_optimization": {"stage": 2},
            },
            "ds_version": "0.14.4",
            "param_shapes": [OrderedDict((n, p.shape) for n, p in half.named_parameters())],
            "frozen_param_shapes": None,
            "shared_params": {},
            "frozen_param_fragments": None,
        },
        folder / "mp_rank_00_model_states.pt",
    )
    torch.save(
        OrderedDict((k, v.float() if v.is_floating_point() else v) for k, v in state.items()),
        out / "deepspeed_zero_to_fp32.bin",
    )
    torch.save(model.state_dict(), out / "fsdp_full_state_dict.pt")
    common = {"not_weights": [], "needs": []}
    return [
        {
            "name": "deepspeed_model_states",
            "path": "deepspeed/global_step2/mp_rank_00_model_states.pt",
            "tool": f"{version} (DeepSpeed engine.save_checkpoint layout, fp16)",
            "layout": "{'module': fp16 state dict,'buffer_names','optimizer': None,"
            "'ds_config','ds_version','param_shapes',...}",
            "entry": "module",
            "weights": _torch_ref("module"),
            **common,
            "not_weights": ["ds_version", "global_steps", "param_shapes"],
            "targets": [{"model": "mlp", "reference": _torch_ref("module")}],
        },
        {
            "name": "deepspeed_zero_to_fp32",
            "path": "deepspeed_zero_to_fp32.bin",
            "tool": f"{version} (DeepSpeed zero_to_fp32.py output layout)",
            "layout": "a flat fp32 OrderedDict",
            "entry": "",
            "weights": _torch_ref(),
            **common,
            "targets": [{"model": "mlp", "reference": _torch_ref()}],
        },
        {
            "name": "fsdp_full_state_dict",
            "path": "fsdp_full_state_dict.pt",
            "tool": f"{version} (FSDP1 FULL_STATE_DICT consolidated layout)",
            "layout": "a flat state dict with clean names",
            "entry": "",
            "weights": _torch_ref(),
            **common,
            "targets": [{"model": "mlp", "reference": _torch_ref()}],
        },
    ]


def whole_models(out: Path) -> list[Case]:
    model, _, _ = _trained(ClassNet)
    torch.save(model, out / "whole_model.pt")
    torch.save(nn.DataParallel(model), out / "whole_model_dataparallel.pt")
    torch.save(model, out / "whole_model_legacy.pt", _use_new_zipfile_serialization=False)
    scripted_source, _, _ = _trained(MLP)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(scripted_source).save(str(out / "torchscript.pt"))
    version = f"torch {torch.__version__}"
    whole = {"read": "whole_model", "attr": None}
    return [
        {
            "name": "whole_model",
            "path": "whole_model.pt",
            "tool": f"{version} (torch.save(model))",
            "layout": "a pickled wild.models.ClassNet",
            "entry": "",
            "weights": whole,
            "not_weights": [],
            "needs": [],
            "targets": [{"model": "classnet", "reference": whole}],
        },
        {
            "name": "whole_model_dataparallel",
            "path": "whole_model_dataparallel.pt",
            "tool": f"{version} (torch.save(nn.DataParallel(model)))",
            "layout": "a pickled DataParallel around a wild.models.ClassNet",
            "entry": "",
            # Read back under the wrapped model's own names, as torchkeep.save writes them.
            "weights": {"read": "whole_model", "attr": "module"},
            "not_weights": [],
            "needs": [],
            "targets": [
                {"model": "classnet", "reference": {"read": "whole_model", "attr": "module"}},
                {"model": "dataparallel_classnet", "reference": whole},
            ],
        },
        {
            "name": "whole_model_legacy",
            "path": "whole_model_legacy.pt",
            "tool": f"{version} (torch.save(model, _use_new_zipfile_serialization=False))",
            "layout": "a pickled wild.models.ClassNet in the legacy (pre-zip) format",
            "entry": "",
            "weights": whole,
            "not_weights": [],
            "needs": [],
            "targets": [{"model": "classnet", "reference": whole}],
        },
        {
            "name": "torchscript",
            "path": "torchscript.pt",
            "tool": f"{version} (torch.jit.script(model).save)",
            "layout": "a TorchScript archive of the MLP",
            "entry": "",
            "weights": {"read": "torchscript"},
            "not_weights": [],
            "needs": [],
            "targets": [{"model": "mlp", "reference": {"read": "torchscript"}}],
        },
    ]


def torchkeep_own(out: Path) -> list[Case]:
    model, optimizer, _ = _trained(MLP)
    torchkeep.save_checkpoint(
        out / "torchkeep_checkpoint.pt",
        model=model,
        optimizer=optimizer,
        generator=torch.Generator().manual_seed(GEN_SEED),
        epoch=2,
    )
    return [
        {
            "name": "torchkeep_checkpoint",
            "path": "torchkeep_checkpoint.pt",
            "tool": f"torchkeep {torchkeep.__version__} (save_checkpoint, .pt layout)",
            "layout": "{'model','optimizer','generator','epoch','__torchkeep__'}",
            "entry": "model",
            "weights": _torch_ref("model"),
            "not_weights": ["epoch"],
            "needs": [],
            "targets": [{"model": "mlp", "reference": _torch_ref("model")}],
        }
    ]


WRITERS = (
    lightning,
    transformers_files,
    accelerate_files,
    quantized,
    weight_norm,
    averaged,
    tutorials,
    distributed_exports,
    whole_models,
    torchkeep_own,
)


def generate(out: Path) -> list[Case]:
    """Write every file into ``out`` (which must not exist or be empty) and ``cases.json``."""
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise SystemExit(f"{out} is not empty; remove it first (the corpus is written whole)")
    cases: list[Case] = []
    for writer in WRITERS:
        cases.extend(writer(out))
    (out / "cases.json").write_text(json.dumps(cases, indent=1) + "\n")
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    cases = generate(args.out)
    total = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"wrote {len(cases)} cases into {args.out} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
