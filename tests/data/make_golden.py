"""Regenerate the golden checkpoint files in tests/data/golden/.

Run from anywhere:

    python tests/data/make_golden.py

Everything is deterministic (fixed seeds, single thread, no timestamps of our
own), so rerunning with the same torch / safetensors versions gives
byte-identical files.  The file list, formats, tensor names and hashes are
written to golden/MANIFEST.json.

When run as a script this file re-imports itself as the module ``make_golden``
and runs ``make_golden.main()``, so the classes pickled into whole_model.pt are
always recorded as ``make_golden.Net`` (never ``__main__.Net``).  To unpickle
whole_model.pt, put tests/data on sys.path first.

Some of the files written here are deliberately malicious or corrupt.  The
malicious ones (malicious.pt, malicious.pkl, malicious_legacy.pt) run
``touch /tmp/torchkeep_pwned_marker`` when unpickled: never load them with a
full unpickler.  Writing them is harmless.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import pickle
import pickletools
import shutil
import struct
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "golden"
SEED = 1234
MARKER = "/tmp/torchkeep_pwned_marker"


# ---------------------------------------------------------------------------
# Tiny models
# ---------------------------------------------------------------------------


class Net(nn.Module):
    """conv(3->4, k3) + BatchNorm2d(4) + Linear(4*2*2 -> 3); input 3x4x4."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, kernel_size=3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(x.flatten(1))


class Tied(nn.Module):
    """Embedding(10, 4) and an output Linear(4, 10) whose weight IS emb.weight."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight  # tie

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(idx))


class Evil:
    """Pickles to a call of os.system. Saving is harmless; NEVER unpickle."""

    def __reduce__(self):
        return (os.system, ("touch " + MARKER,))


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def tensor_info(t: torch.Tensor) -> dict:
    return {"shape": list(t.shape), "dtype": str(t.dtype)}


# Loader ids used in "expected_error" entries (check_golden.py maps them):
#   torch_wo      torch.load(f, weights_only=True)
#   torch_full    torch.load(f, weights_only=False)
#   st_load_file  safetensors.torch.load_file(f)
#   zipfile_read  zipfile.ZipFile(f).read(<data.pkl member>)
# Messages were observed with torch 2.13.0 / safetensors 0.8.0.
def err(loader: str, exception: str, contains: str) -> dict:
    return {"loader": loader, "exception": exception, "message_contains": contains}


def names_info(sd) -> dict:
    return {k: tensor_info(v) for k, v in sd.items()}


def flatten_tensors(obj, prefix: str = "") -> dict:
    """Every tensor inside nested dicts/lists/tuples, keyed by a '/'-joined path.

    The keys of the containers are used verbatim, so a model key such as
    "conv.weight" stays one path component: "model_state_dict/conv.weight".
    """
    out: dict = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = tensor_info(obj)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten_tensors(v, f"{prefix}/{k}" if prefix else str(k)))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(flatten_tensors(v, f"{prefix}/{i}" if prefix else str(i)))
    return out


def dump_json(obj, level: int = 0, width: int = 100) -> str:
    """Indented JSON that keeps short containers on one line."""
    flat = json.dumps(obj)
    if not isinstance(obj, (dict, list)) or len(flat) + 2 * level <= width:
        return flat
    pad = "  " * (level + 1)
    if isinstance(obj, dict):
        items = [f"{pad}{json.dumps(k)}: {dump_json(v, level + 1, width)}"
                 for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + "  " * level + "}"
    items = [pad + dump_json(v, level + 1, width) for v in obj]
    return "[\n" + ",\n".join(items) + "\n" + "  " * level + "]"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pickle_globals(data: bytes, start: int = 0) -> tuple[list[str], int]:
    """Statically list the globals ("module.name") one pickle references.

    Handles GLOBAL / INST (protocol <= 3) and STACK_GLOBAL (protocol >= 4,
    whose two string operands may come from the memo).  Never executes
    anything.  Returns (globals in order of first use, offset after STOP).
    """
    buf = io.BytesIO(data)
    buf.seek(start)
    found: list[str] = []
    memo: dict = {}
    strings: list = []  # recent string pushes (None for non-string pushes)
    last_pushed = None
    end = start
    for op, arg, pos in pickletools.genops(buf):
        name = op.name
        if name in ("GLOBAL", "INST"):
            g = arg.replace(" ", ".", 1)
            if g not in found:
                found.append(g)
            last_pushed = None
        elif name == "STACK_GLOBAL":
            if len(strings) >= 2 and None not in strings[-2:]:
                g = f"{strings[-2]}.{strings[-1]}"
            else:
                g = "<unresolved STACK_GLOBAL>"
            if g not in found:
                found.append(g)
            last_pushed = None
        elif name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8",
                      "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"):
            last_pushed = arg
            strings.append(arg)
        elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[arg] = last_pushed
        elif name == "MEMOIZE":
            memo[len(memo)] = last_pushed
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            last_pushed = memo.get(arg)
            strings.append(last_pushed)
        elif name == "STOP":
            end = pos + 1
        else:
            if name not in ("FRAME",):
                last_pushed = None
                strings.append(None)
        del strings[:-4]
    return found, end


def zip_member_data_offset(path: Path, member: str) -> tuple[int, int]:
    """(absolute offset of a stored member's data, its length) in a zip."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        hdr = f.read(30)
    assert hdr[:4] == b"PK\x03\x04", "not a local file header"
    n_name, n_extra = struct.unpack("<HH", hdr[26:30])
    return info.header_offset + 30 + n_name + n_extra, info.compress_size


def zip_pickle_member(path: Path) -> str:
    with zipfile.ZipFile(path) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith("/data.pkl")]
    return name


def torch_file_globals(path: Path) -> list[str]:
    """Globals referenced by a torch.save file (zip or legacy), statically."""
    data = path.read_bytes()
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            return pickle_globals(zf.read(zip_pickle_member(path)))[0]
    # legacy: magic, protocol, sys_info, payload, storage keys, raw storages
    found: list[str] = []
    pos = 0
    for _ in range(5):
        g, pos = pickle_globals(data, pos)
        found += [x for x in g if x not in found]
    return found


def legacy_or_plain_pickle_globals(path: Path) -> list[str]:
    return pickle_globals(path.read_bytes())[0]


def rewrite_pickle_strings(data: bytes, start: int,
                           mapping: dict) -> tuple[bytes, int, int]:
    """Rewrite the string opcodes of one unframed (protocol <= 3) pickle.

    Every BINUNICODE / SHORT_BINUNICODE whose value is a key of `mapping` is
    re-emitted as BINUNICODE ('X' + u32 little-endian length + utf-8) with the
    new value, so length prefixes stay right.  Memoized repeats (BINGET) follow
    automatically.  Returns (new pickle bytes, offset after STOP in `data`,
    number of opcodes rewritten).
    """
    buf = io.BytesIO(data)
    buf.seek(start)
    out = bytearray()
    last = start
    count = 0
    end = None
    for op, arg, pos in pickletools.genops(buf):
        if op.name in ("FRAME", "BINUNICODE8"):
            raise RuntimeError(f"unsupported opcode for rewriting: {op.name}")
        if op.name in ("BINUNICODE", "SHORT_BINUNICODE") and arg in mapping:
            old_len = len(arg.encode("utf-8"))
            oplen = 1 + (4 if op.name == "BINUNICODE" else 1) + old_len
            enc = mapping[arg].encode("utf-8")
            out += data[last:pos]
            out += b"X" + struct.pack("<I", len(enc)) + enc
            last = pos + oplen
            count += 1
        elif arg in mapping:
            raise RuntimeError(f"unexpected string encoding: {op.name}")
        if op.name == "STOP":
            end = pos + 1
    out += data[last:end]
    return bytes(out), end, count


_LEGACY_ELEMENT_SIZE = {
    "DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2,
    "BFloat16Storage": 2, "LongStorage": 8, "IntStorage": 4,
    "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1, "BoolStorage": 1,
}


def canonicalize_legacy(data: bytes) -> bytes:
    """Make a legacy-format torch.save blob deterministic.

    Layout: five pickles (magic number, protocol version, sys_info, payload,
    sorted list of storage keys), then for each key in list order the raw
    storage as <int64 numel><numel * element_size bytes>.  torch names each
    storage str(storage._cdata), i.e. its memory address, so both the keys and
    the order of the raw storages change from run to run.  Here the keys are
    replaced by equal-width address-like numbers in order of first use in the
    payload, the key list is re-pickled (pickle protocol 2, as torch does) in
    that order and the raw storages are reordered to match.
    """
    pos = 0
    for _ in range(3):
        _, pos = pickle_globals(data, pos)
    head = data[:pos]
    payload_start = pos

    first_use: list[str] = []
    elsize: dict = {}
    # persistent id: ('storage', <torch.XStorage>, key, location, numel, view)
    # where the storage class is a GLOBAL or, when repeated, a BINGET of it.
    pending = None
    last_global = None
    memo: dict = {}
    for op, arg, _ in pickletools.genops(data[payload_start:]):
        cls = None
        if op.name == "GLOBAL":
            cls = arg
        elif op.name in ("BINGET", "LONG_BINGET"):
            cls = memo.get(arg)
        if op.name in ("BINPUT", "LONG_BINPUT"):
            memo[arg] = last_global
        last_global = cls
        if cls and cls.startswith("torch ") and cls.endswith("Storage"):
            pending = _LEGACY_ELEMENT_SIZE[cls.split()[1]]
        elif op.name in ("BINUNICODE", "SHORT_BINUNICODE") and pending is not None:
            if arg not in elsize:
                first_use.append(arg)
                elsize[arg] = pending
            pending = None
        elif op.name not in ("BINPUT", "LONG_BINPUT"):
            pending = None
        if op.name == "STOP":
            break

    _, keys_start = pickle_globals(data, payload_start)
    old_keys = [arg for op, arg, _ in pickletools.genops(data[keys_start:])
                if op.name in ("BINUNICODE", "SHORT_BINUNICODE")]
    assert sorted(old_keys) == sorted(first_use), (old_keys, first_use)
    _, raw_start = pickle_globals(data, keys_start)

    blocks = {}
    p = raw_start
    for k in old_keys:
        (numel,) = struct.unpack("<q", data[p:p + 8])
        n = 8 + numel * elsize[k]
        blocks[k] = data[p:p + n]
        p += n
    assert p == len(data), "unexpected trailing bytes in legacy file"

    mapping = {k: str(140000000000000 + 64 * i) for i, k in enumerate(first_use)}
    payload, end, _ = rewrite_pickle_strings(data, payload_start, mapping)
    assert end == keys_start
    key_list = pickle.dumps([mapping[k] for k in first_use], protocol=2)
    raw = b"".join(blocks[k] for k in first_use)
    return head + payload + key_list + raw


def save_legacy(obj, path: Path) -> None:
    """torch.save(obj, path, _use_new_zipfile_serialization=False), with the
    run-dependent storage keys made deterministic (see canonicalize_legacy)."""
    b = io.BytesIO()
    torch.save(obj, b, _use_new_zipfile_serialization=False)
    path.write_bytes(canonicalize_legacy(b.getvalue()))


class _CanonicalPickler(pickle.Pickler):
    """pickle.Pickler that differs from plain pickle.dump only in making the
    legacy torch.save blob embedded for each tensor storage deterministic."""

    def reducer_override(self, obj):
        if isinstance(obj, torch.storage.TypedStorage):
            fn, (blob,) = obj.__reduce__()  # (_load_from_bytes, (bytes,))
            return fn, (canonicalize_legacy(blob),)
        return NotImplemented


def rewrite_location(src: Path, dst: Path, new_location: str) -> int:
    """Copy torch zip `src` to `dst`, changing the storage location tag 'cpu'.

    In data.pkl each storage is a persistent id tuple
    ('storage', <StorageType>, key, location, numel); the location is a
    BINUNICODE string (opcode 'X' + 4-byte little-endian length + utf-8).  We
    rebuild those opcodes with the new length instead of a blind byte replace,
    then rebuild the zip: every other member is copied byte-identically, and
    each member's data is padded (with a torch-style 'FB' extra field in the
    local header) to start on a 64-byte boundary as torch's reader expects.
    Returns the number of location strings rewritten.
    """
    pkl_name = zip_pickle_member(src)
    with zipfile.ZipFile(src) as zf:
        infos = zf.infolist()
        members = {i.filename: zf.read(i.filename) for i in infos}
    new, _, count = rewrite_pickle_strings(members[pkl_name], 0,
                                           {"cpu": new_location})
    members[pkl_name] = new
    if count == 0:
        raise RuntimeError("no 'cpu' location found in data.pkl")

    alignment = 64
    with open(dst, "wb") as raw, \
            zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_STORED) as out:
        for info in infos:
            name_len = len(info.filename.encode("utf-8"))
            offset = raw.tell()
            base = offset + 30 + name_len + 4  # 4 = extra field header
            pad = (-base) % alignment
            zi = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            zi.compress_type = zipfile.ZIP_STORED
            zi.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
            out.writestr(zi, members[info.filename])
    return count


# ---------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------


def build_models():
    torch.manual_seed(SEED)
    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=0.001)
    x = torch.randn(8, 3, 4, 4)
    y = torch.randint(0, 3, (8,))
    for _ in range(2):  # two Adam steps; BatchNorm running stats move too
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
    net.eval()
    torch.manual_seed(SEED + 1)
    tied = Tied()
    return net, opt, tied


def main() -> None:
    torch.set_num_threads(1)
    if GOLDEN.exists():
        shutil.rmtree(GOLDEN)
    GOLDEN.mkdir(parents=True)

    net, opt, tied = build_models()
    sd = net.state_dict()
    net_names = names_info(sd)
    entries: list[dict] = []

    def add(filename, written_by, fmt, top_level, tensors=None, **extra):
        e = {"filename": filename, "written_by": written_by, "format": fmt,
             "top_level": top_level}
        if tensors is not None:
            e["tensors"] = tensors
        e.update(extra)
        entries.append(e)

    sd_top = ("collections.OrderedDict (from nn.Module.state_dict(); carries a "
              "_metadata attribute restored via BUILD) mapping name -> Tensor")

    # -- plain state dicts -------------------------------------------------
    torch.save(sd, GOLDEN / "net_state_dict.pt")
    add("net_state_dict.pt", "torch.save(net.state_dict(), f)", "torch-zip",
        sd_top, net_names, weights_entry=None, load="weights_only=True",
        reference=True)

    save_legacy(sd, GOLDEN / "net_state_dict_legacy.pt")
    add("net_state_dict_legacy.pt",
        "torch.save(net.state_dict(), f, _use_new_zipfile_serialization=False)",
        "torch-legacy", sd_top, net_names, weights_entry=None,
        load="weights_only=True",
        notes="Pre-1.6 format: concatenated pickles (magic number, protocol "
              "version, sys_info, payload, storage key list) followed by raw "
              "storage bytes. torch names legacy storages by memory address "
              "(str(storage._cdata)); make_golden.py replaces those keys with "
              "fixed address-like numbers so the file is reproducible.")

    for ext in ("bin", "pkl"):
        torch.save(sd, GOLDEN / f"net_state_dict.{ext}")
        add(f"net_state_dict.{ext}", "torch.save(net.state_dict(), f)",
            "torch-zip", sd_top, net_names, weights_entry=None,
            load="weights_only=True",
            notes="Same content as net_state_dict.pt; only the extension "
                  "differs (the zip's internal root folder is "
                  "'net_state_dict' as torch derives it from the file stem).")

    # -- prefixed keys -----------------------------------------------------
    dp = nn.DataParallel(net)  # on a CPU-only machine this just wraps
    dp_sd = dp.state_dict()
    assert all(k.startswith("module.") for k in dp_sd)
    torch.save(dp_sd, GOLDEN / "net_dataparallel.pth")
    add("net_dataparallel.pth", "torch.save(nn.DataParallel(net).state_dict(), f)",
        "torch-zip", sd_top + "; every key prefixed 'module.'",
        names_info(dp_sd), weights_entry=None, load="weights_only=True",
        key_prefix="module.",
        notes="Built with a real nn.DataParallel on CPU (no CUDA: it wraps "
              "without replicating). Stripping 'module.' gives "
              "net_state_dict.pt's names and values.")

    comp_sd = OrderedDict(("_orig_mod." + k, v) for k, v in sd.items())
    torch.save(comp_sd, GOLDEN / "net_compiled.pt")
    add("net_compiled.pt",
        "torch.save({'_orig_mod.' + k: v for k, v in net.state_dict().items()}, f)",
        "torch-zip",
        "collections.OrderedDict (plain, built manually, no _metadata) "
        "name -> Tensor; every key prefixed '_orig_mod.'",
        names_info(comp_sd), weights_entry=None, load="weights_only=True",
        key_prefix="_orig_mod.",
        notes="torch.compile was NOT called: the '_orig_mod.' prefix (what "
              "state_dict() of a torch.compile'd module gives) was added "
              "manually.")

    # -- tutorial checkpoint dict ----------------------------------------
    ckpt = {
        "epoch": 3,
        "model_state_dict": sd,
        "optimizer_state_dict": opt.state_dict(),
        "loss": 0.25,
        "args": argparse.Namespace(lr=0.001, batch_size=8),
    }
    torch.save(ckpt, GOLDEN / "net_checkpoint.pt")
    add("net_checkpoint.pt", "torch.save(checkpoint_dict, f)", "torch-zip",
        "dict with keys epoch (int 3), model_state_dict (state dict), "
        "optimizer_state_dict (torch.optim.Adam state_dict after 2 steps: "
        "{'state': {0..5: {step, exp_avg, exp_avg_sq}}, 'param_groups': [...]}), "
        "loss (float 0.25), args (argparse.Namespace(lr=0.001, batch_size=8))",
        net_names, weights_entry="model_state_dict",
        all_tensors=flatten_tensors(ckpt),
        expected_error=[err("torch_wo", "UnpicklingError",
                            "argparse.Namespace was not an allowed global")],
        load="weights_only=True FAILS (argparse.Namespace is not an allowed "
             "global); loads with weights_only=True inside "
             "torch.serialization.safe_globals([argparse.Namespace]) or with "
             "weights_only=False",
        pickle_globals=torch_file_globals(GOLDEN / "net_checkpoint.pt"))

    # -- Lightning-style checkpoint ---------------------------------------
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    lightning = {
        "epoch": 1,
        "global_step": 10,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": OrderedDict(("model." + k, v) for k, v in sd.items()),
        "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [sched.state_dict()],
        "callbacks": {},
        "hyper_parameters": {"lr": 0.001},
    }
    torch.save(lightning, GOLDEN / "net_lightning.ckpt")
    add("net_lightning.ckpt", "torch.save(lightning_style_dict, f) "
        "(no lightning import)", "torch-zip",
        "dict with keys epoch, global_step, pytorch-lightning_version, "
        "state_dict ({'model.' + k: v}), optimizer_states ([Adam state_dict]; "
        "param_groups carry 'initial_lr' added by StepLR), lr_schedulers "
        "([StepLR(step_size=5, gamma=0.5).state_dict()]), callbacks ({}), "
        "hyper_parameters ({'lr': 0.001})",
        names_info(lightning["state_dict"]), weights_entry="state_dict",
        key_prefix="model.", all_tensors=flatten_tensors(lightning),
        load="weights_only=True")

    # -- safetensors -------------------------------------------------------
    st_meta = {"format": "pt"}
    safetensors.torch.save_file(dict(sd), str(GOLDEN / "net.safetensors"),
                                metadata=st_meta)
    add("net.safetensors",
        "safetensors.torch.save_file(net.state_dict(), f, metadata={'format': 'pt'})",
        "safetensors", "flat name -> tensor; __metadata__ {'format': 'pt'}",
        net_names, weights_entry=None, load="safetensors.torch.load_file")

    names = list(sd.keys())
    half = len(names) // 2
    shard_names = [names[:half], names[half:]]
    total_size = sum(sd[k].numel() * sd[k].element_size() for k in names)

    sdir = GOLDEN / "net_sharded"
    sdir.mkdir()
    weight_map = {}
    for i, part in enumerate(shard_names, start=1):
        fname = f"model-{i:05d}-of-{len(shard_names):05d}.safetensors"
        safetensors.torch.save_file({k: sd[k] for k in part}, str(sdir / fname),
                                    metadata=st_meta)
        weight_map.update({k: fname for k in part})
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (sdir / "model.safetensors.index.json").write_text(
        json.dumps(index, indent=2) + "\n")
    add("net_sharded/", "safetensors.torch.save_file per shard + index json",
        "hf-sharded-safetensors",
        "directory: model.safetensors.index.json = {'metadata': {'total_size': "
        "sum of tensor bytes}, 'weight_map': {name: shard file}}; shards "
        "model-00001-of-00002.safetensors, model-00002-of-00002.safetensors",
        net_names, weights_entry=None, index="model.safetensors.index.json",
        total_size=total_size, weight_map=weight_map,
        load="safetensors.torch.load_file per shard, merged")

    bdir = GOLDEN / "net_sharded_bin"
    bdir.mkdir()
    weight_map_bin = {}
    for i, part in enumerate(shard_names, start=1):
        fname = f"pytorch_model-{i:05d}-of-{len(shard_names):05d}.bin"
        torch.save({k: sd[k] for k in part}, bdir / fname)
        weight_map_bin.update({k: fname for k in part})
    index_bin = {"metadata": {"total_size": total_size},
                 "weight_map": weight_map_bin}
    (bdir / "pytorch_model.bin.index.json").write_text(
        json.dumps(index_bin, indent=2) + "\n")
    add("net_sharded_bin/", "torch.save (plain dict) per shard + index json",
        "hf-sharded-torch",
        "directory: pytorch_model.bin.index.json (same schema as the "
        "safetensors index); shards pytorch_model-00001-of-00002.bin, "
        "pytorch_model-00002-of-00002.bin, each a torch-zip plain dict",
        net_names, weights_entry=None, index="pytorch_model.bin.index.json",
        total_size=total_size, weight_map=weight_map_bin,
        load="torch.load(weights_only=True) per shard, merged")

    # -- tied weights ------------------------------------------------------
    tied_sd = tied.state_dict()
    torch.save(tied_sd, GOLDEN / "tied.pt")
    with zipfile.ZipFile(GOLDEN / "tied.pt") as zf:
        n_storages = sum(1 for n in zf.namelist() if "/data/" in n)
    add("tied.pt", "torch.save(tied.state_dict(), f)", "torch-zip", sd_top,
        names_info(tied_sd), weights_entry=None, load="weights_only=True",
        shared_storage=[["emb.weight", "head.weight"]],
        storage_records_in_zip=n_storages,
        notes="head.weight is emb.weight: one storage record in the zip; "
              "after torch.load both names view the same storage (equal "
              "data_ptr). safetensors.torch.save_file refuses such dicts.")

    # -- whole pickled module ---------------------------------------------
    torch.save(net, GOLDEN / "whole_model.pt")
    wm_globals = torch_file_globals(GOLDEN / "whole_model.pt")
    net_cls = [g for g in wm_globals if g.endswith(".Net")]
    add("whole_model.pt", "torch.save(net, f)  (whole nn.Module pickled)",
        "torch-zip", f"pickled module object of class {net_cls}",
        net_names, weights_entry=None,
        pickled_class=net_cls[0] if net_cls else None,
        pickle_globals=wm_globals,
        expected_error=[err("torch_wo", "UnpicklingError",
                            "make_golden.Net was not an allowed global")],
        load="weights_only=False only, with tests/data on sys.path so that "
             "'make_golden' imports (make_golden.py re-imports itself under "
             "that name, so the pickle never records '__main__'); "
             "weights_only=True fails on the non-allowlisted classes",
        notes="tensors lists the module's state_dict() names.")

    # -- storages tagged as CUDA -------------------------------------------
    for fname, loc in (("cuda_saved.pt", "cuda:0"), ("cuda1_saved.pt", "cuda:1")):
        dst = GOLDEN / fname
        torch.save(sd, dst)  # on CPU; root folder name follows the file name
        tmp = GOLDEN / (fname + ".tmp")
        n = rewrite_location(dst, tmp, loc)
        os.replace(tmp, dst)
        add(fname, "torch.save(net.state_dict(), f) on CPU, then data.pkl "
            f"rewritten so every storage location 'cpu' reads {loc!r}",
            "torch-zip", sd_top, net_names, weights_entry=None,
            storage_location=loc, locations_rewritten=n,
            expected_error=[err(w, "RuntimeError",
                                "Attempting to deserialize object on a CUDA "
                                "device but torch.cuda.is_available() is False")
                            for w in ("torch_wo", "torch_full")],
            expected_error_note="on a CPU-only machine; the message is the "
                                "same for cuda:0 and cuda:1",
            load="torch.load(map_location='cpu') works (same values as "
                 "net_state_dict.pt); without map_location it fails on a "
                 "machine without that CUDA device",
            notes="Only the BINUNICODE location strings in data.pkl were "
                  "changed (opcode length fields rewritten); every other zip "
                  "member is byte-identical, re-laid out with 64-byte aligned "
                  "data.")

    # -- malicious pickles (NEVER load) -----------------------------------
    payload = {"weight": torch.zeros(2), "payload": Evil()}
    torch.save(payload, GOLDEN / "malicious.pt")
    save_legacy(payload, GOLDEN / "malicious_legacy.pt")
    with open(GOLDEN / "malicious.pkl", "wb") as f:
        _CanonicalPickler(f).dump(payload)  # == pickle.dump(payload, f)
    mal_doc = ("dict {'weight': torch.zeros(2), 'payload': Evil()}; Evil."
               "__reduce__ returns (os.system, ('touch " + MARKER + "',))")
    dangerous = [f"{os.system.__module__}.system"]
    add("malicious.pt", "torch.save(payload, f)", "torch-zip", mal_doc,
        {"weight": tensor_info(payload["weight"])}, weights_entry=None,
        malicious=True, dangerous_globals=dangerous,
        pickle_globals=torch_file_globals(GOLDEN / "malicious.pt"),
        load="NEVER load. A full unpickler runs os.system.")
    add("malicious_legacy.pt",
        "torch.save(payload, f, _use_new_zipfile_serialization=False)",
        "torch-legacy", mal_doc, {"weight": tensor_info(payload["weight"])},
        weights_entry=None, malicious=True, dangerous_globals=dangerous,
        pickle_globals=torch_file_globals(GOLDEN / "malicious_legacy.pt"),
        load="NEVER load. A full unpickler runs os.system.",
        notes="Legacy storage keys made deterministic as in "
              "net_state_dict_legacy.pt.")
    add("malicious.pkl", "pickle.dump(payload, f) (default protocol "
        f"{pickle.DEFAULT_PROTOCOL}; the legacy blob embedded for the tensor's "
        "storage has its address-based storage key made deterministic)", "plain-pickle", mal_doc,
        {"weight": tensor_info(payload["weight"])}, weights_entry=None,
        malicious=True,
        dangerous_globals=[*dangerous, "torch.storage._load_from_bytes"],
        pickle_globals=legacy_or_plain_pickle_globals(GOLDEN / "malicious.pkl"),
        load="NEVER load. A full unpickler runs os.system.",
        notes="Plain pickle of a tensor goes through "
              "torch.storage._load_from_bytes, which itself calls "
              "torch.load(weights_only=False) on embedded bytes.")

    # -- corrupt variants ---------------------------------------------------
    good_st = (GOLDEN / "net.safetensors").read_bytes()
    good_pt = (GOLDEN / "net_state_dict.pt").read_bytes()
    (hlen,) = struct.unpack("<Q", good_st[:8])
    header = json.loads(good_st[8:8 + hlen])
    data_len = len(good_st) - 8 - hlen

    EXPECTED = [err("st_load_file", "SafetensorError",
                    "incomplete metadata, file not fully covered")]
    cut = int(len(good_st) * 0.6)
    (GOLDEN / "truncated.safetensors").write_bytes(good_st[:cut])
    add("truncated.safetensors", "net.safetensors cut to 60% of its length",
        "corrupt-safetensors", "header intact, data region cut short",
        derived_from="net.safetensors", original_size=len(good_st),
        truncated_to=cut, expect="fails", expected_error=EXPECTED)

    EXPECTED = [err(w, "RuntimeError", "failed finding central directory")
                for w in ("torch_wo", "torch_full")]
    cut = int(len(good_pt) * 0.6)
    (GOLDEN / "truncated.pt").write_bytes(good_pt[:cut])
    add("truncated.pt", "net_state_dict.pt cut to 60% of its length",
        "corrupt-torch-zip", "zip without its central directory",
        derived_from="net_state_dict.pt", original_size=len(good_pt),
        truncated_to=cut, expect="fails", expected_error=EXPECTED)

    (GOLDEN / "empty.pt").write_bytes(b"")
    add("empty.pt", "0 bytes", "corrupt", "empty file", expect="fails",
        expected_error=[err("torch_wo", "EOFError", ""),
                        err("torch_full", "EOFError", "Ran out of input"),
                        err("st_load_file", "SafetensorError", "header too small")])

    rng = np.random.default_rng(SEED)
    (GOLDEN / "garbage.bin").write_bytes(rng.bytes(1024))
    add("garbage.bin", f"numpy.random.default_rng({SEED}).bytes(1024)",
        "corrupt", "1 KiB of random bytes", expect="fails",
        expected_error=[err("torch_wo", "UnpicklingError", "Unsupported operand"),
                        err("torch_full", "UnpicklingError", "invalid load key"),
                        err("st_load_file", "SafetensorError", "header too large")])

    bad = bytearray(good_st)
    bad[:8] = struct.pack("<Q", len(good_st) + 1000)
    (GOLDEN / "bad_header.safetensors").write_bytes(bytes(bad))
    add("bad_header.safetensors", "net.safetensors with the u64 header length "
        "set to file size + 1000", "corrupt-safetensors",
        "header length field points past end of file",
        derived_from="net.safetensors", header_length_field=len(good_st) + 1000,
        expect="fails",
        expected_error=[err("st_load_file", "SafetensorError",
                            "invalid header length")])

    # lying offsets: the tensor stored last in the data region is moved 16
    # bytes further on; its size still matches shape*dtype, but it now ends
    # beyond the data buffer (and leaves a 16-byte hole).
    tensors_only = {k: v for k, v in header.items() if k != "__metadata__"}
    victim = max(tensors_only, key=lambda k: tensors_only[k]["data_offsets"][1])
    b, e = header[victim]["data_offsets"]
    lying = json.loads(json.dumps(header))
    lying[victim]["data_offsets"] = [b + 16, e + 16]
    hjson = json.dumps(lying, separators=(",", ":")).encode()
    hjson += b" " * ((-len(hjson)) % 8)
    lying_bytes = struct.pack("<Q", len(hjson)) + hjson + good_st[8 + hlen:]
    (GOLDEN / "lying_offsets.safetensors").write_bytes(lying_bytes)
    add("lying_offsets.safetensors", "net.safetensors with a rewritten "
        "(valid JSON, correct length field) header", "corrupt-safetensors",
        f"tensor {victim!r} data_offsets changed from {[b, e]} to "
        f"{[b + 16, e + 16]}: ends {e + 16 - data_len} bytes beyond the "
        f"{data_len}-byte data region (size still matches shape x dtype)",
        derived_from="net.safetensors", victim=victim,
        original_offsets=[b, e], lying_offsets=[b + 16, e + 16],
        data_region_bytes=data_len, expect="fails",
        expected_error=[err("st_load_file", "SafetensorError",
                            f"invalid offset for tensor `{victim}`")])

    hdr_bytes = bytearray(good_st[8:8 + hlen])
    colon = hdr_bytes.index(b":")
    hdr_bytes[colon:colon + 1] = b"#"
    (GOLDEN / "bad_json.safetensors").write_bytes(
        good_st[:8] + bytes(hdr_bytes) + good_st[8 + hlen:])
    add("bad_json.safetensors", "net.safetensors with the first ':' of the "
        "JSON header replaced by '#'", "corrupt-safetensors",
        "header of correct length that is not valid JSON",
        derived_from="net.safetensors", byte_offset=8 + colon, expect="fails",
        expected_error=[err("st_load_file", "SafetensorError",
                            "invalid JSON in header")])

    pkl_name = zip_pickle_member(GOLDEN / "net_state_dict.pt")
    pkl_off, _ = zip_member_data_offset(GOLDEN / "net_state_dict.pt",
                                              pkl_name)
    flip_at = pkl_off + 2  # first opcode after PROTO 2 (EMPTY_DICT '}')
    flipped = bytearray(good_pt)
    old = flipped[flip_at]
    flipped[flip_at] = 0xFF  # not a pickle opcode
    (GOLDEN / "flipped_byte.pt").write_bytes(bytes(flipped))
    add("flipped_byte.pt", "net_state_dict.pt with one byte of data.pkl "
        f"changed ({old:#04x} -> 0xff)", "corrupt-torch-zip",
        "zip structure intact; data.pkl content no longer matches its CRC32 "
        "and its first opcode after PROTO is invalid",
        derived_from="net_state_dict.pt", member=pkl_name,
        byte_offset=flip_at, offset_in_member=2, expect="fails",
        failure_mode="unpickling fails: torch's zip reader does NOT verify "
                     "CRC32, so torch.load gets as far as the pickle and "
                     "hits opcode 0xff; Python's zipfile does verify the CRC "
                     "and raises BadZipFile",
        expected_error=[err("torch_wo", "UnpicklingError", "Unsupported operand 255"),
                        err("torch_full", "UnpicklingError", "invalid load key"),
                        err("zipfile_read", "BadZipFile", "Bad CRC-32")])

    victim_t = "conv.weight"
    vb, _ = header[victim_t]["data_offsets"]
    fd_at = 8 + hlen + vb + 2  # byte 2 of element 0 (little-endian float32)
    fd = bytearray(good_st)
    fd[fd_at] ^= 0x40  # top mantissa bit
    (GOLDEN / "flipped_data.safetensors").write_bytes(bytes(fd))
    before = float(sd[victim_t].flatten()[0])
    after = float(np.frombuffer(bytes(fd[fd_at - 2:fd_at + 2]), "<f4")[0])
    add("flipped_data.safetensors", "net.safetensors with one bit flipped in "
        "tensor data (header intact)", "corrupt-safetensors",
        "loads fine; only a checksum (see sha256 of net.safetensors) or a "
        "value comparison can catch it",
        derived_from="net.safetensors", tensor=victim_t, element_index=0,
        byte_offset=fd_at, xor=0x40, value_before=before, value_after=after,
        expect="loads, but conv.weight.flatten()[0] differs from net.safetensors")

    (GOLDEN / "not_a_checkpoint.txt").write_text(
        "This is a plain text file, not a checkpoint.\n"
        "torchkeep should refuse it with a clear error.\n")
    add("not_a_checkpoint.txt", "plain text", "text", "two lines of ASCII",
        expect="fails",
        expected_error=[err("torch_wo", "UnpicklingError", "Unsupported operand 84"),
                        err("torch_full", "UnpicklingError", "pickle data was truncated"),
                        err("st_load_file", "SafetensorError", "header too large")])

    # -- sizes, hashes, manifest ------------------------------------------
    for e in entries:
        p = GOLDEN / e["filename"]
        if p.is_dir():
            e["files"] = {c.name: {"size": c.stat().st_size, "sha256": sha256(c)}
                          for c in sorted(p.iterdir())}
            e["size"] = sum(v["size"] for v in e["files"].values())
        else:
            e["size"] = p.stat().st_size
            e["sha256"] = sha256(p)

    manifest = {
        "generator": "tests/data/make_golden.py",
        "regenerate": "python tests/data/make_golden.py",
        "torch_version": torch.__version__,
        "safetensors_version": safetensors.__version__,
        "numpy_version": np.__version__,
        "python_version": sys.version.split()[0],
        "seed": SEED,
        "conventions": {
            "tensors": "name -> {shape, dtype}; for checkpoint dicts these are "
                       "the names inside weights_entry (the model weights)",
            "weights_entry": "top-level key holding the model state dict; "
                             "null when the whole file is the state dict",
            "all_tensors": "every tensor in the file, keyed by a '/'-joined "
                           "container path (container keys used verbatim)",
            "reference": "net_state_dict.pt holds the reference values: all "
                         "net_* files, cuda*_saved.pt and whole_model.pt "
                         "carry exactly these tensors (modulo key prefixes)",
            "malicious": "files with malicious=true must NEVER be unpickled",
        },
        "models": {
            "Net": "conv Conv2d(3,4,3) -> bn BatchNorm2d(4) -> relu -> flatten "
                   "-> fc Linear(16,3); input (N,3,4,4); 2 Adam(lr=1e-3) steps "
                   "on seeded random data, then eval()",
            "Tied": "emb Embedding(10,4); head Linear(4,10,bias=False) with "
                    "head.weight = emb.weight",
        },
        "files": entries,
    }
    (GOLDEN / "MANIFEST.json").write_text(dump_json(manifest) + "\n")
    for p in GOLDEN.rglob("*"):  # safetensors creates files 0600
        p.chmod(0o755 if p.is_dir() else 0o644)

    total = sum(p.stat().st_size for p in GOLDEN.rglob("*") if p.is_file())
    big = [p for p in GOLDEN.rglob("*") if p.is_file() and p.stat().st_size >= 50_000]
    assert not big, f"files over 50 KB: {big}"
    assert total < 1_000_000, f"total {total} bytes"
    print(f"wrote {len(entries)} entries to {GOLDEN} ({total} bytes in all)")


if __name__ == "__main__":
    # Re-import under the stable name 'make_golden' so pickled classes are
    # recorded as make_golden.Net rather than __main__.Net.
    sys.dont_write_bytecode = True
    sys.path.insert(0, str(HERE))
    import make_golden

    make_golden.main()
