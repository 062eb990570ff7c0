"""Sanity-check the golden files in tests/data/golden/ against MANIFEST.json.

    python tests/data/check_golden.py

Not a pytest module: it loads every good file with plain torch / safetensors
(weights_only=True wherever that can work), checks names, shapes, dtypes and
values against net_state_dict.pt, and checks that every corrupt file fails the
way the manifest says.  The malicious files are only inspected statically with
pickletools; they are NEVER unpickled.  Exits non-zero on any mismatch.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import pickletools
import sys
import zipfile
from pathlib import Path

import safetensors.torch
import torch
from safetensors import safe_open

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "golden"
MARKER = Path("/tmp/torchkeep_pwned_marker")

sys.dont_write_bytecode = True
sys.path.insert(0, str(HERE))
import make_golden  # noqa: E402  (for Net, and the static pickle scanner)

FAILURES: list[str] = []


def ok(cond: bool, what: str) -> None:
    print(("  ok   " if cond else "  FAIL ") + what)
    if not cond:
        FAILURES.append(what)


def same_tensors(a: dict, b: dict) -> bool:
    return (list(a) == list(b)
            and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
                    and torch.equal(a[k], b[k]) for k in a))


def info(sd: dict) -> dict:
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in sd.items()}


def strip(sd: dict, prefix: str) -> dict:
    assert all(k.startswith(prefix) for k in sd), "missing prefix"
    return {k[len(prefix):]: v for k, v in sd.items()}


def pickle_strings(data: bytes) -> list:
    return [arg for op, arg, _ in pickletools.genops(data)
            if op.name in ("BINUNICODE", "SHORT_BINUNICODE", "UNICODE")]


LOADERS = {
    "torch_wo": lambda p: torch.load(p, weights_only=True),
    "torch_full": lambda p: torch.load(p, weights_only=False),
    "st_load_file": lambda p: safetensors.torch.load_file(str(p)),
    "zipfile_read": lambda p: zipfile.ZipFile(p).read(
        make_golden.zip_pickle_member(p)),
}


def check_expected_errors(entry: dict) -> None:
    path = GOLDEN / entry["filename"]
    for exp in entry.get("expected_error", []):
        try:
            LOADERS[exp["loader"]](path)
        except Exception as e:
            name = type(e).__name__
            msg = str(e)
            good = name == exp["exception"] and exp["message_contains"] in msg
            first = msg.strip().splitlines()[-1] if msg.strip() else ""
            for line in msg.splitlines():
                if exp["message_contains"] and exp["message_contains"] in line:
                    first = line.strip()
                    break
            ok(good, f"{entry['filename']}: {exp['loader']} raises {name}: "
                     f"{first[:150]!r}")
        else:
            ok(False, f"{entry['filename']}: {exp['loader']} did not fail")


def main() -> int:
    torch.set_num_threads(1)
    marker_before = MARKER.exists()
    manifest = json.loads((GOLDEN / "MANIFEST.json").read_text())
    entries = {e["filename"]: e for e in manifest["files"]}
    print(f"torch {torch.__version__}, manifest written with torch "
          f"{manifest['torch_version']}, safetensors {manifest['safetensors_version']}")

    # -- sizes, hashes, completeness --------------------------------------
    print("files:")
    listed = set()
    for name, e in entries.items():
        p = GOLDEN / name
        if p.is_dir():
            for child, meta in e["files"].items():
                listed.add(f"{name}{child}")
                c = p / child
                ok(c.stat().st_size == meta["size"]
                   and hashlib.sha256(c.read_bytes()).hexdigest() == meta["sha256"],
                   f"{name}{child}: size/sha256 match manifest ({meta['size']} B)")
        else:
            listed.add(name)
            ok(p.stat().st_size == e["size"]
               and hashlib.sha256(p.read_bytes()).hexdigest() == e["sha256"],
               f"{name}: size/sha256 match manifest ({e['size']} B)")
    on_disk = {str(p.relative_to(GOLDEN)).replace(os.sep, "/")
               for p in GOLDEN.rglob("*") if p.is_file()} - {"MANIFEST.json"}
    ok(on_disk == listed, f"every file on disk is in the manifest "
                          f"(extra={sorted(on_disk - listed)}, "
                          f"missing={sorted(listed - on_disk)})")
    sizes = [p.stat().st_size for p in GOLDEN.rglob("*") if p.is_file()]
    ok(max(sizes) < 50_000 and sum(sizes) < 1_000_000,
       f"largest file {max(sizes)} B < 50 KB, total {sum(sizes)} B < 1 MB")

    ref = torch.load(GOLDEN / "net_state_dict.pt", weights_only=True)
    ref_info = entries["net_state_dict.pt"]["tensors"]
    ok(info(ref) == ref_info, "net_state_dict.pt names/shapes/dtypes match manifest")

    # -- plain state dicts ---------------------------------------------------
    print("state dicts (weights_only=True):")
    for name in ("net_state_dict.pt", "net_state_dict_legacy.pt",
                 "net_state_dict.bin", "net_state_dict.pkl"):
        sd = torch.load(GOLDEN / name, weights_only=True)
        ok(same_tensors(sd, ref) and info(sd) == entries[name]["tensors"],
           f"{name}: same tensors as reference")
        ok(type(sd).__name__ == "OrderedDict" and hasattr(sd, "_metadata"),
           f"{name}: OrderedDict with _metadata")
    with zipfile.ZipFile(GOLDEN / "net_state_dict.pt") as zf:
        ok(zf.testzip() is None, "net_state_dict.pt: zip CRCs valid")
    ok(not zipfile.is_zipfile(GOLDEN / "net_state_dict_legacy.pt"),
       "net_state_dict_legacy.pt: not a zip (legacy format)")

    for name in ("net_dataparallel.pth", "net_compiled.pt"):
        e = entries[name]
        sd = torch.load(GOLDEN / name, weights_only=True)
        ok(info(sd) == e["tensors"], f"{name}: names/shapes/dtypes match manifest")
        ok(same_tensors(strip(sd, e["key_prefix"]), ref),
           f"{name}: stripping {e['key_prefix']!r} gives the reference")

    # -- checkpoint dicts ----------------------------------------------------
    print("checkpoint dicts:")
    e = entries["net_checkpoint.pt"]
    check_expected_errors(e)
    with torch.serialization.safe_globals([argparse.Namespace]):
        ck = torch.load(GOLDEN / "net_checkpoint.pt", weights_only=True)
    ok(set(ck) == {"epoch", "model_state_dict", "optimizer_state_dict", "loss", "args"}
       and ck["epoch"] == 3 and ck["loss"] == 0.25
       and ck["args"] == argparse.Namespace(lr=0.001, batch_size=8),
       "net_checkpoint.pt: loads under safe_globals([argparse.Namespace]); "
       "epoch/loss/args right")
    ok(same_tensors(ck[e["weights_entry"]], ref),
       f"net_checkpoint.pt: {e['weights_entry']!r} equals the reference")
    ok(make_golden.flatten_tensors(ck) == e["all_tensors"],
       "net_checkpoint.pt: all_tensors match manifest")
    st = ck["optimizer_state_dict"]["state"]
    ok(sorted(st) == list(range(6))
       and all(float(s["step"]) == 2.0 for s in st.values()),
       "net_checkpoint.pt: Adam state for 6 params, step == 2")

    e = entries["net_lightning.ckpt"]
    lk = torch.load(GOLDEN / "net_lightning.ckpt", weights_only=True)
    ok(lk["epoch"] == 1 and lk["global_step"] == 10
       and lk["pytorch-lightning_version"] == "2.4.0"
       and lk["callbacks"] == {} and lk["hyper_parameters"] == {"lr": 0.001}
       and len(lk["optimizer_states"]) == 1 and len(lk["lr_schedulers"]) == 1
       and lk["lr_schedulers"][0]["step_size"] == 5,
       "net_lightning.ckpt: loads with weights_only=True; scalar fields right")
    ok(same_tensors(strip(lk[e["weights_entry"]], "model."), ref),
       "net_lightning.ckpt: state_dict minus 'model.' equals the reference")
    ok(make_golden.flatten_tensors(lk) == e["all_tensors"],
       "net_lightning.ckpt: all_tensors match manifest")

    # -- safetensors ---------------------------------------------------------
    print("safetensors:")
    sd = safetensors.torch.load_file(str(GOLDEN / "net.safetensors"))
    ok(same_tensors({k: sd[k] for k in ref}, ref) and set(sd) == set(ref),
       "net.safetensors: same tensors as reference")
    with safe_open(str(GOLDEN / "net.safetensors"), "pt") as f:
        ok(f.metadata() == {"format": "pt"}, "net.safetensors: metadata {'format': 'pt'}")

    for d, index_name, load in (
            ("net_sharded/", "model.safetensors.index.json",
             lambda p: safetensors.torch.load_file(str(p))),
            ("net_sharded_bin/", "pytorch_model.bin.index.json",
             lambda p: torch.load(p, weights_only=True))):
        index = json.loads((GOLDEN / d / index_name).read_text())
        merged: dict = {}
        shards = sorted(set(index["weight_map"].values()))
        for shard in shards:
            part = load(GOLDEN / d / shard)
            ok(all(index["weight_map"][k] == shard for k in part),
               f"{d}{shard}: its {len(part)} tensors are mapped to it")
            merged.update(part)
        ok(len(shards) == 2 and set(merged) == set(ref)
           and same_tensors({k: merged[k] for k in ref}, ref),
           f"{d}: 2 shards merge to the reference")
        total = sum(t.numel() * t.element_size() for t in merged.values())
        ok(index["metadata"]["total_size"] == total,
           f"{d}: metadata.total_size == {total} (sum of tensor bytes)")

    # -- tied ------------------------------------------------------------------
    print("tied:")
    td = torch.load(GOLDEN / "tied.pt", weights_only=True)
    ok(info(td) == entries["tied.pt"]["tensors"], "tied.pt: names/shapes/dtypes")
    ok(td["emb.weight"].data_ptr() == td["head.weight"].data_ptr()
       and td["emb.weight"].untyped_storage().data_ptr()
       == td["head.weight"].untyped_storage().data_ptr(),
       "tied.pt: emb.weight and head.weight share storage after load")
    with zipfile.ZipFile(GOLDEN / "tied.pt") as zf:
        n = sum(1 for x in zf.namelist() if "/data/" in x)
    ok(n == 1, f"tied.pt: {n} storage record in the zip")

    # -- whole model -----------------------------------------------------------
    print("whole model:")
    e = entries["whole_model.pt"]
    check_expected_errors(e)
    globs = make_golden.torch_file_globals(GOLDEN / "whole_model.pt")
    ok("make_golden.Net" in globs and not any(g.startswith("__main__") for g in globs),
       f"whole_model.pt: pickle records make_golden.Net (globals {globs})")
    m = torch.load(GOLDEN / "whole_model.pt", weights_only=False)
    ok(isinstance(m, make_golden.Net) and same_tensors(m.state_dict(), ref),
       "whole_model.pt: weights_only=False gives a make_golden.Net with the "
       "reference weights")
    with torch.no_grad():
        out = m(torch.zeros(2, 3, 4, 4))
    ok(tuple(out.shape) == (2, 3), "whole_model.pt: forward works, output (2, 3)")

    # -- CUDA-tagged storages -------------------------------------------------
    print("cuda-tagged:")
    for name in ("cuda_saved.pt", "cuda1_saved.pt"):
        e = entries[name]
        loc = e["storage_location"]
        p = GOLDEN / name
        with zipfile.ZipFile(p) as zf:
            ok(zf.testzip() is None, f"{name}: zip CRCs valid")
            pkl = zf.read(make_golden.zip_pickle_member(p))
            for zi in zf.infolist():
                with open(p, "rb") as fh:
                    fh.seek(zi.header_offset + 26)
                    nl, xl = (int.from_bytes(fh.read(2), "little") for _ in range(2))
                if zi.header_offset + 30 + nl + xl & 63:
                    ok(False, f"{name}: {zi.filename} data not 64-byte aligned")
        dis = io.StringIO()
        pickletools.dis(pkl, out=dis)
        strings = pickle_strings(pkl)
        ok(f"BINUNICODE '{loc}'" in dis.getvalue() and "cpu" not in strings,
           f"{name}: pickletools.dis shows BINUNICODE {loc!r}, no 'cpu'")
        seen: list = []

        def record(storage, where, seen=seen):
            seen.append(where)
            return storage

        sd = torch.load(p, weights_only=True, map_location=record)
        ok(set(seen) == {loc} and len(seen) == len(ref),
           f"{name}: every storage's location tag is {loc!r} ({len(seen)} storages)")
        sd = torch.load(p, weights_only=True, map_location="cpu")
        ok(same_tensors(sd, ref), f"{name}: map_location='cpu' gives the reference")
        dev = int(loc.split(":")[1])
        if not torch.cuda.is_available():
            check_expected_errors(e)
        elif torch.cuda.device_count() > dev:
            sd = torch.load(p, weights_only=True)
            ok(all(t.device == torch.device(loc) for t in sd.values()),
               f"{name}: lands on {loc}")
        else:
            print(f"  skip {name}: CUDA present but no {loc}")

    # -- malicious: static inspection only ---------------------------------------
    print("malicious (static pickletools scan only, never loaded):")
    for name, e in entries.items():
        if not e.get("malicious"):
            continue
        p = GOLDEN / name
        if e["format"] == "plain-pickle":
            globs = make_golden.pickle_globals(p.read_bytes())[0]
        else:
            globs = make_golden.torch_file_globals(p)
        ok(globs == e["pickle_globals"]
           and all(g in globs for g in e["dangerous_globals"]),
           f"{name}: references {e['dangerous_globals']}")
    # -- corrupt -------------------------------------------------------------------
    print("corrupt:")
    for e in entries.values():
        if e.get("expect") == "fails":
            check_expected_errors(e)
    # the corruptions are the ones described (structure, not just "it fails")
    good_st = (GOLDEN / "net.safetensors").read_bytes()
    good_pt = (GOLDEN / "net_state_dict.pt").read_bytes()
    for name, src in (("truncated.safetensors", good_st), ("truncated.pt", good_pt)):
        b = (GOLDEN / name).read_bytes()
        ok(src.startswith(b) and len(b) == int(len(src) * 0.6),
           f"{name}: first 60% of its source")
    b = (GOLDEN / "bad_header.safetensors").read_bytes()
    ok(int.from_bytes(b[:8], "little") > len(b) and b[8:] == good_st[8:],
       "bad_header.safetensors: only the length field changed; it exceeds the file")
    b = (GOLDEN / "lying_offsets.safetensors").read_bytes()
    e = entries["lying_offsets.safetensors"]
    n = int.from_bytes(b[:8], "little")
    hdr = json.loads(b[8:8 + n])
    ok(8 + n <= len(b) and hdr[e["victim"]]["data_offsets"] == e["lying_offsets"]
       and e["lying_offsets"][1] > len(b) - 8 - n,
       f"lying_offsets.safetensors: valid JSON, length field right, "
       f"{e['victim']} ends at {e['lying_offsets'][1]} > data {len(b) - 8 - n}")
    b = (GOLDEN / "bad_json.safetensors").read_bytes()
    n = int.from_bytes(b[:8], "little")
    try:
        json.loads(b[8:8 + n])
        bad = False
    except ValueError:
        bad = True
    ok(bad and n == int.from_bytes(good_st[:8], "little") and len(b) == len(good_st),
       "bad_json.safetensors: length field right, header not JSON")
    b = (GOLDEN / "flipped_byte.pt").read_bytes()
    ok(len(b) == len(good_pt)
       and [i for i in range(len(b)) if b[i] != good_pt[i]]
       == [entries["flipped_byte.pt"]["byte_offset"]],
       "flipped_byte.pt: exactly one byte differs from net_state_dict.pt, in data.pkl")

    e = entries["flipped_data.safetensors"]
    fd = safetensors.torch.load_file(str(GOLDEN / "flipped_data.safetensors"))
    diff = {k: int((fd[k] != ref[k]).sum()) for k in ref}
    t = e["tensor"]
    ok(diff[t] == 1 and sum(diff.values()) == 1
       and float(fd[t].flatten()[e["element_index"]]) == e["value_after"]
       and float(ref[t].flatten()[e["element_index"]]) == e["value_before"],
       f"flipped_data.safetensors: loads; exactly one element of {t} differs "
       f"({e['value_before']} -> {e['value_after']})")
    ok(e["sha256"] != entries["net.safetensors"]["sha256"],
       "flipped_data.safetensors: sha256 differs from net.safetensors")

    ok(MARKER.exists() == marker_before, f"{MARKER} not created by this run")
    print(f"\n{len(FAILURES)} failure(s)")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
