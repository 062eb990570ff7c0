"""The torchkeep command: every subcommand run through click's runner and as a real process."""

from __future__ import annotations

import json
import os
import pickletools
import re
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner, Result

import torchkeep as tk
from torchkeep.cli import COMMANDS, main
from torchkeep.errors import CheckpointNotFoundError

GOLDEN = Path(__file__).parent / "data" / "golden"
PWNED_MARKER = Path("/tmp/torchkeep_pwned_marker")
NET_TENSORS = {
    "conv.weight": [4, 3, 3, 3],
    "conv.bias": [4],
    "bn.weight": [4],
    "bn.bias": [4],
    "bn.running_mean": [4],
    "bn.running_var": [4],
    "bn.num_batches_tracked": [],
    "fc.weight": [3, 16],
    "fc.bias": [3],
}


def run(*args: str | os.PathLike[str], env: dict[str, str] | None = None) -> Result:
    """Invoke the real command group in-process."""
    return CliRunner().invoke(main, [os.fspath(a) for a in args], env=env)


def run_process(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    """Run ``python -m torchkeep`` as users do."""
    env = {**os.environ, "NO_COLOR": "1"}
    env.pop("TORCHKEEP_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "torchkeep", *[os.fspath(a) for a in args]],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return torch.load(GOLDEN / "net_state_dict.pt", weights_only=True)


@pytest.fixture(autouse=True)
def no_pwned_marker() -> object:
    PWNED_MARKER.unlink(missing_ok=True)
    yield
    assert not PWNED_MARKER.exists(), "a malicious pickle ran code"


# ----------------------------------------------------------------------------------- general


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_has_help_with_examples_and_exit_codes(command: str) -> None:
    result = run(command, "--help")
    assert result.exit_code == 0
    assert "Examples:" in result.stdout
    assert f"torchkeep {command}" in result.stdout
    assert "Exit codes" in result.stdout


def test_group_help_lists_every_command_with_its_summary() -> None:
    result = run("--help")
    assert result.exit_code == 0
    listed = " ".join(result.stdout.split())
    for name, (_, summary) in COMMANDS.items():
        assert f"{name} {summary}" in listed
        command = main.get_command(click.Context(main), name)
        assert command is not None and command.name == name
        assert command.get_short_help_str(limit=200) == summary


def _without_torch(*args: str) -> str:
    """Run the command in a new process; fail if it imported torch; return its output."""
    code = (
        "import sys; from torchkeep.cli import main\n"
        "try:\n    main(sys.argv[1:], prog_name='torchkeep')\n"
        "except SystemExit as exc:\n    assert not exc.code, exc.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_command_line_answers_without_torch_where_it_can(tmp_path: Path) -> None:
    """--help, inspect and verify of a safetensors file, ls: a fraction of torch's import
    time (benchmarks/cli_startup.py measures it)."""
    assert "Commands:" in _without_torch("--help")
    weights = tmp_path / "net.safetensors"
    tk.save({"fc.weight": torch.ones(3, 2), "fc.bias": torch.zeros(3)}, weights)
    assert "parameters" in _without_torch("inspect", str(weights))
    assert "OK" in _without_torch("verify", str(weights))
    manager = tk.CheckpointManager(tmp_path / "run")
    manager.save(7, weights=torch.ones(2), metrics={"loss": 0.25})
    assert "loss=0.25" in _without_torch("ls", str(tmp_path / "run"))


def test_importing_torchkeep_imports_no_torch_until_a_name_is_used() -> None:
    code = (
        "import sys, torchkeep as tk\n"
        "assert 'torch' not in sys.modules\n"
        "names = [getattr(tk, n) for n in tk.__all__]\n"
        "assert 'torch' in sys.modules and sorted(tk.__all__) == sorted(set(tk.__all__))\n"
        "assert set(tk.__all__) <= set(dir(tk))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_version() -> None:
    result = run("--version")
    assert result.exit_code == 0
    assert tk.__version__ in result.stdout


def test_unknown_option_is_a_usage_error() -> None:
    result = run("inspect", GOLDEN / "net.safetensors", "--bogus")
    assert result.exit_code == 2
    assert "No such option" in result.stderr


def test_missing_file_is_one_error_line_and_exit_2(tmp_path: Path) -> None:
    result = run("inspect", tmp_path / "nope.pt")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith("error: no checkpoint at")
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_flag_lets_the_exception_through(tmp_path: Path, where: str) -> None:
    args = ["inspect", str(tmp_path / "nope.pt")]
    args = ["--debug", *args] if where == "before" else [*args, "--debug"]
    result = run(*args)
    assert isinstance(result.exception, CheckpointNotFoundError)


def test_debug_environment_variable(tmp_path: Path) -> None:
    result = run("inspect", tmp_path / "nope.pt", env={"TORCHKEEP_DEBUG": "1"})
    assert isinstance(result.exception, CheckpointNotFoundError)


def test_output_to_a_pipe_has_no_colour_codes() -> None:
    result = run("scan", GOLDEN / "malicious.pt")
    assert "\x1b[" not in result.stdout


def test_forced_colour_is_used_and_no_color_removes_it() -> None:
    colour = re.compile(r"\x1b\[(?:\d+;)*3[0-7](?:;\d+)*m")  # a foreground colour code
    coloured = run("scan", GOLDEN / "malicious.pt", env={"FORCE_COLOR": "1", "NO_COLOR": ""})
    assert colour.search(coloured.stdout)
    plain = run("scan", GOLDEN / "malicious.pt", env={"FORCE_COLOR": "1", "NO_COLOR": "1"})
    assert not colour.search(plain.stdout)
    assert "dangerous" in plain.stdout


# ----------------------------------------------------------------------------------- inspect


def test_inspect_state_dict_summary_and_tree() -> None:
    result = run("inspect", GOLDEN / "net_state_dict.pt")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "format      torch-zip" in out
    assert "tensors     9" in out
    assert "parameters  180 (180)" in out
    assert "float32 (8) · int64 (1)" in out
    assert "conv  112 params · 448 B  weight [4, 3, 3, 3] · bias [4]" in out
    assert "fc    51 params · 204 B  weight [3, 16] · bias [3]" in out
    assert "num_batches_tracked [] int64" in out  # dtype shown where it differs


def test_inspect_training_checkpoint_shows_optimizer_and_counters() -> None:
    result = run("inspect", GOLDEN / "net_checkpoint.pt")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "entry       model_state_dict" in out
    assert "epoch      3" in out
    assert "loss       0.25" in out
    assert "args       lr=0.001  batch_size=8" in out
    assert "Adam at optimizer_state_dict: 1 group, 6 params (6 with state)" in out
    assert "betas=(0.9, 0.999)" in out
    assert "optimizer_state_dict.state.*  6 dicts, 18 tensors" in out


def test_inspect_lightning_checkpoint_shows_scheduler() -> None:
    result = run("inspect", GOLDEN / "net_lightning.ckpt", "--json")
    assert result.exit_code == 0, result.output
    training = json.loads(result.stdout)["training"]
    assert training["values"]["global_step"] == "10"
    assert training["settings"]["hyper_parameters"] == {"lr": "0.001"}
    [optimizer] = training["optimizers"]
    assert optimizer["where"] == "optimizer_states[0]"
    assert optimizer["type"] == "Adam"
    assert optimizer["hyperparameters"]["initial_lr"] == "0.001"
    [scheduler] = training["schedulers"]
    assert scheduler["type"] == "StepLR"
    assert scheduler["settings"]["step_size"] == "5"
    assert scheduler["settings"]["gamma"] == "0.5"


@pytest.mark.parametrize(
    "name", ["net.safetensors", "net_sharded", "net_state_dict_legacy.pt", "net_sharded_bin"]
)
def test_inspect_json_matches_the_file(name: str) -> None:
    result = run("inspect", GOLDEN / name, "--json", "--tensors")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["num_params"] == 180
    assert data["tensor_count"] == 9
    assert data["nbytes"] == 724
    assert data["dtypes"] == {"float32": 8, "int64": 1}
    assert {t["name"]: t["shape"] for t in data["tensors"]} == NET_TENSORS
    assert [c["name"] for c in data["tree"]["children"]] == ["conv", "bn", "fc"] or sorted(
        c["name"] for c in data["tree"]["children"]
    ) == ["bn", "conv", "fc"]
    assert data["training"] is None


def test_inspect_tensors_lists_every_tensor() -> None:
    result = run("inspect", GOLDEN / "net.safetensors", "--tensors")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    for name, shape in NET_TENSORS.items():
        row = next(line for line in lines if line.split()[:1] == [name])
        assert "[" + ", ".join(map(str, shape)) + "]" in row


def test_inspect_stats_match_torch(reference: dict[str, torch.Tensor]) -> None:
    result = run("inspect", GOLDEN / "net_state_dict.pt", "--stats", "--json")
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)["tensors"]}
    for name, tensor in reference.items():
        values = tensor.double()
        assert rows[name]["min"] == pytest.approx(float(values.min()))
        assert rows[name]["max"] == pytest.approx(float(values.max()))
        assert rows[name]["mean"] == pytest.approx(float(values.mean()))
        if tensor.numel() > 1:
            assert rows[name]["std"] == pytest.approx(float(values.std()))
        assert rows[name]["nan"] == 0


def test_inspect_stats_count_nan_and_inf(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    tk.save({"w": torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), 3.0])}, path)
    result = run("inspect", path, "--stats")
    assert result.exit_code == 0, result.output
    row = next(line for line in result.stdout.splitlines() if line.split()[:1] == ["w"])
    assert row.split()[-3:] == ["1", "2", "0"]  # nan, inf, zeros
    assert "1 tensors hold NaN, 1 hold Inf" in result.stdout
    data = json.loads(run("inspect", path, "--stats", "--json").stdout)["tensors"][0]
    assert (data["min"], data["max"], data["mean"]) == (1.0, 3.0, 2.0)


def test_inspect_entry_option() -> None:
    result = run(
        "inspect", GOLDEN / "net_checkpoint.pt", "--entry", "optimizer_state_dict.state.0", "--json"
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["entry"] == "optimizer_state_dict.state.0"
    assert data["tensor_count"] == 3


def test_inspect_unknown_entry_names_the_ones_there() -> None:
    result = run("inspect", GOLDEN / "net_checkpoint.pt", "--entry", "nope")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ")
    assert "'model_state_dict'" in result.stderr


@pytest.mark.parametrize("name", ["malicious.pt", "malicious_legacy.pt", "malicious.pkl"])
def test_inspect_refuses_malicious_pickles_without_running_them(name: str) -> None:
    result = run("inspect", GOLDEN / name)
    assert result.exit_code == 2
    assert "posix.system" in result.stderr
    assert "DANGEROUS" in result.stderr


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("garbage.bin", "not a format torchkeep reads"),
        ("empty.pt", "is empty"),
        ("truncated.safetensors", "truncated"),
        ("bad_header.safetensors", "header length"),
    ],
)
def test_inspect_bad_files_exit_2_with_the_reason(name: str, message: str) -> None:
    result = run("inspect", GOLDEN / name)
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def _sparse_safetensors(path: Path, layers: int = 32, width: int = 4096) -> int:
    """A header for a 7B-style model with the data region left as a hole; returns data bytes."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    position = 0
    shapes = [("model.embed_tokens.weight", [32000, width])]
    for i in range(layers):
        for part in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes.append((f"model.layers.{i}.self_attn.{part}.weight", [width, width]))
        for part, shape in (
            ("gate_proj", [11008, width]),
            ("up_proj", [11008, width]),
            ("down_proj", [width, 11008]),
        ):
            shapes.append((f"model.layers.{i}.mlp.{part}.weight", shape))
        shapes.append((f"model.layers.{i}.input_layernorm.weight", [width]))
    shapes.append(("lm_head.weight", [32000, width]))
    for name, shape in shapes:
        size = 2 * int(torch.Size(shape).numel())
        header[name] = {
            "dtype": "BF16",
            "shape": shape,
            "data_offsets": [position, position + size],
        }
        position += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + position)
    return position


def _bytes_read() -> int:
    """Bytes this process has read through read-like system calls (Linux /proc)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def test_inspect_multi_gigabyte_safetensors_reads_only_the_header(tmp_path: Path) -> None:
    path = tmp_path / "llama.safetensors"
    data_bytes = _sparse_safetensors(path)
    assert path.stat().st_size > 13 * 10**9
    assert path.stat().st_blocks * 512 < 10**6  # nothing but the header was ever written
    read_before = _bytes_read()
    result = run("inspect", path)
    assert result.exit_code == 0, result.output
    # Header-only: the bytes this process read stay far below the file's 13 GB of data.
    assert _bytes_read() - read_before < 50 * 10**6
    assert f"({data_bytes:,} bytes)" in result.stdout
    assert "parameters  6.74B" in result.stdout
    assert "[0-31] x32  each 202M params" in result.stdout
    assert "lm_head" in result.stdout


def test_inspect_depth_limits_the_tree(tmp_path: Path) -> None:
    path = tmp_path / "llama.safetensors"
    _sparse_safetensors(path, layers=2, width=64)
    result = run("inspect", path, "--depth", "1")
    assert result.exit_code == 0, result.output
    assert "(+2 submodules)" in result.stdout  # model: embed_tokens, layers
    assert "q_proj" not in result.stdout


def test_inspect_does_not_fold_blocks_that_differ(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    tk.save(
        {"blocks.0.w": torch.zeros(2), "blocks.1.w": torch.zeros(2), "blocks.2.w": torch.zeros(3)},
        path,
    )
    out = run("inspect", path).stdout
    assert "[0-1] x2" in out
    assert "2  " in out and "w [3]" in out


# -------------------------------------------------------------------------------------- diff


def test_diff_identical_files_exit_0() -> None:
    result = run("diff", GOLDEN / "net_state_dict.pt", GOLDEN / "net.safetensors")
    assert result.exit_code == 0, result.output
    assert "identical: 9 tensors compared; 9 identical" in result.stdout


def test_diff_changed_value_exits_1_and_reports_measures() -> None:
    result = run("diff", GOLDEN / "net.safetensors", GOLDEN / "flipped_data.safetensors")
    assert result.exit_code == 1, result.output
    assert "values  conv.weight  max|a-b| 0.0625" in result.stdout
    assert "1 element differ" in result.stdout
    data = json.loads(
        run(
            "diff", GOLDEN / "net.safetensors", GOLDEN / "flipped_data.safetensors", "--json"
        ).stdout
    )
    assert data["same"] is False
    changed = [t for t in data["tensors"] if t["status"] != "identical"]
    assert [t["name_a"] for t in changed] == ["conv.weight"]
    assert changed[0]["max_abs"] == pytest.approx(0.0625)
    assert changed[0]["mismatched"] == 1
    assert 0.99 < changed[0]["cosine"] < 1.0


def test_diff_prefix_renames_are_a_difference_unless_ignored() -> None:
    result = run("diff", GOLDEN / "net_state_dict.pt", GOLDEN / "net_dataparallel.pth")
    assert result.exit_code == 1
    assert "renamed  9 tensors  prefix 'module.' added" in result.stdout
    ignored = run(
        "diff", GOLDEN / "net_state_dict.pt", GOLDEN / "net_dataparallel.pth", "--ignore-renames"
    )
    assert ignored.exit_code == 0, ignored.output


def test_diff_lists_added_removed_shape_and_dtype(tmp_path: Path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    tk.save(
        {
            "keep": torch.ones(2),
            "gone": torch.ones(3),
            "grow": torch.ones(2),
            "cast": torch.ones(2),
        },
        a,
    )
    tk.save(
        {
            "keep": torch.ones(2),
            "new": torch.zeros(5),
            "grow": torch.ones(4),
            "cast": torch.ones(2, dtype=torch.float64),
        },
        b,
    )
    result = run("diff", a, b)
    assert result.exit_code == 1
    out = result.stdout
    assert "removed  gone" in out
    assert "added    new" in out
    assert "shape    grow  [2] -> [4]" in out
    assert "dtype    cast  float32 -> float64" in out
    assert run("diff", a, a).exit_code == 0


def test_diff_tolerance(tmp_path: Path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    tk.save({"w": torch.ones(100)}, a)
    tk.save({"w": torch.ones(100) + 1e-4}, b)
    assert run("diff", a, b).exit_code == 1
    assert run("diff", a, b, "--atol", "1e-3").exit_code == 0
    assert run("diff", a, b, "--rtol", "1e-3").exit_code == 0
    assert run("diff", a, b, "--atol", "1e-5").exit_code == 1


def test_diff_ignore_dtypes_after_bf16_conversion(tmp_path: Path) -> None:
    out = tmp_path / "bf16.safetensors"
    assert run("convert", GOLDEN / "net.safetensors", out, "--dtype", "bfloat16").exit_code == 0
    assert run("diff", GOLDEN / "net.safetensors", out, "--atol", "1e-2").exit_code == 1
    result = run("diff", GOLDEN / "net.safetensors", out, "--atol", "1e-2", "--ignore-dtypes")
    assert result.exit_code == 0, result.output


def test_diff_error_exits_2(tmp_path: Path) -> None:
    result = run("diff", GOLDEN / "net.safetensors", tmp_path / "missing.pt")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: no checkpoint at")


# ----------------------------------------------------------------------------------- convert


def test_convert_checkpoint_to_safetensors(tmp_path: Path, reference: dict) -> None:
    out = tmp_path / "model.safetensors"
    result = run("convert", GOLDEN / "net_checkpoint.pt", out)
    assert result.exit_code == 0, result.output
    assert "(entry 'model_state_dict')" in result.stdout
    state = tk.load_state_dict(out, verify=True)
    assert list(state) == list(reference)
    assert all(torch.equal(state[k], v) for k, v in reference.items())


def test_convert_options_together(tmp_path: Path, reference: dict) -> None:
    out = tmp_path / "shards"
    result = run(
        "convert",
        GOLDEN / "net_lightning.ckpt",
        out,
        "--extract",
        "state_dict",
        "--strip-prefix",
        "model.",
        "--rename",
        r"^fc\.=head.",
        "--dtype",
        "float16",
        "--shard-size",
        "300B",
        "--json",
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["format"] == "sharded"
    assert data["files"] > 1
    state = tk.load_state_dict(out, verify=True)
    assert "head.weight" in state and "fc.weight" not in state
    assert state["head.weight"].dtype == torch.float16
    assert state["bn.num_batches_tracked"].dtype == torch.int64
    assert torch.equal(state["head.weight"], reference["fc.weight"].half())


def test_convert_to_legacy_format(tmp_path: Path) -> None:
    out = tmp_path / "old.pt"
    result = run("convert", GOLDEN / "net.safetensors", out, "--format", "torch-legacy")
    assert result.exit_code == 0, result.output
    assert tk.inspect(out).format == "torch-legacy"
    assert run("diff", GOLDEN / "net.safetensors", out).exit_code == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rename", "no-equals-sign"], "REGEX=REPLACEMENT"),
        (["--rename", "([=x"], "not a valid regex"),
        (["--shard-size", "lots"], "cannot read size"),
        (["--dtype", "int8"], "Invalid value for '--dtype'"),
    ],
)
def test_convert_bad_options_are_usage_errors(
    tmp_path: Path, args: list[str], message: str
) -> None:
    result = run("convert", GOLDEN / "net.safetensors", tmp_path / "o.safetensors", *args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_convert_refuses_to_overwrite_its_input(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    tk.save({"w": torch.ones(2)}, path)
    result = run("convert", path, path)
    assert result.exit_code == 2
    assert "is the input" in result.stderr


def test_convert_refuses_a_folder_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious")
    result = run("convert", GOLDEN / "net.safetensors", folder, "--shard-size", "1GB")
    assert result.exit_code == 2
    assert "not a sharded checkpoint" in result.stderr
    assert (folder / "notes.txt").read_text() == "precious"


def test_convert_name_collision_is_an_error(tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    result = run("convert", GOLDEN / "net.safetensors", out, "--rename", r"\.(weight|bias)$=")
    assert result.exit_code == 2
    assert "rename rules map both" in result.stderr
    assert not out.exists()


# ------------------------------------------------------------------------------------ verify


def test_verify_torchkeep_file_checks_every_checksum(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    tk.save({"a": torch.randn(10), "b": torch.randn(20)}, path)
    result = run("verify", path)
    assert result.exit_code == 0, result.output
    assert "OK" in result.stdout and "2 checksums verified" in result.stdout


def test_verify_names_every_damaged_tensor(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    tk.save({"a": torch.zeros(64), "b": torch.zeros(64), "c": torch.zeros(64)}, path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # the last tensor written
    data[-64 * 4 - 1] ^= 0xFF  # the one before it
    path.write_bytes(bytes(data))
    result = run("verify", path, "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False
    damaged = sorted(p["where"].rsplit(":", 1)[1] for p in report["problems"])
    assert len(damaged) == 2
    assert all("checksum mismatch" in p["message"] for p in report["problems"])


@pytest.mark.parametrize(
    ("name", "where", "message"),
    [
        ("truncated.safetensors", "truncated.safetensors", "truncated"),
        ("lying_offsets.safetensors", "lying_offsets.safetensors", "fc.weight"),
        ("truncated.pt", "truncated.pt", "not a readable zip"),
        ("flipped_byte.pt", "flipped_byte.pt:net_state_dict/data.pkl", "Bad CRC-32"),
        ("garbage.bin", "garbage.bin", "not a format"),
        ("empty.pt", "empty.pt", "empty"),
    ],
)
def test_verify_damaged_golden_files_exit_1(name: str, where: str, message: str) -> None:
    result = run("verify", GOLDEN / name)
    assert result.exit_code == 1, result.output
    assert "FAILED" in result.stdout
    problem = next(line for line in result.stdout.splitlines() if line.startswith("  problem "))
    assert where in problem and message in problem


# good golden file -> (format verify detects, what it says it checked, safetensors files in it)
GOOD_VERIFY = {
    "net.safetensors": ("safetensors", "9 tensors, 0 checksums verified", 1),
    "net_state_dict.pt": (
        "torch-zip",
        "15 records (CRC-32) checked, 9 tensors read through the allowlist",
        0,
    ),
    "net_state_dict_legacy.pt": ("torch-legacy", "9 tensors read through the allowlist", 0),
    "net_sharded": ("sharded", "2 files, 9 tensors, 0 checksums verified", 2),
    "net_sharded_bin": (
        "sharded",
        "2 files, 21 records (CRC-32) checked, 9 tensors read through the allowlist",
        0,
    ),
    # The model's 9 tensors and Adam's 18 (3 per parameter).
    "net_checkpoint.pt": (
        "torch-zip",
        "33 records (CRC-32) checked, 27 tensors read through the allowlist",
        0,
    ),
}


@pytest.mark.parametrize("name", sorted(GOOD_VERIFY))
def test_verify_good_golden_files_exit_0(name: str) -> None:
    fmt, checked, unhashed = GOOD_VERIFY[name]
    result = run("verify", GOLDEN / name)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    # Files not written by torchkeep carry no checksums: none is claimed, what was is named.
    assert lines[0] == f"OK {GOLDEN / name} [{fmt}]: {checked}"
    assert not [line for line in lines if line.startswith("  problem ")]
    notes = [line for line in lines if line.startswith("  note ")]
    assert len(notes) == unhashed, lines
    assert all("no checksums recorded" in note and ".safetensors:" in note for note in notes)


def _flip_record(archive: Path, tensor: str) -> str:
    """Flip the first byte of the zip record holding ``tensor``'s storage; return its name."""
    with zipfile.ZipFile(archive) as zf:
        pickle_name = next(n for n in zf.namelist() if n.endswith("/data.pkl"))
        ops = list(pickletools.genops(zf.read(pickle_name)))
        at = next(i for i, (_, arg, _) in enumerate(ops) if arg == tensor)
        # The storage's persistent id follows the name: ("storage", type, key, location, size).
        key = next(arg for _, arg, _ in ops[at:] if isinstance(arg, str) and arg.isdigit())
        info = zf.getinfo(f"{pickle_name.rsplit('/', 1)[0]}/data/{key}")
    data = bytearray(archive.read_bytes())
    local = info.header_offset
    name_size, extra_size = struct.unpack("<HH", data[local + 26 : local + 30])
    data[local + 30 + name_size + extra_size] ^= 0xFF
    archive.write_bytes(bytes(data))
    return info.filename


def _misstate_shape(path: Path, tensor: str) -> None:
    """Rewrite a safetensors header so ``tensor``'s shape no longer fits its data offsets."""
    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + size])
    header[tensor]["shape"][-1] += 1
    text = json.dumps(header, separators=(",", ":")).encode().ljust(size)
    assert len(text) == size
    path.write_bytes(data[:8] + text + data[8 + size :])


def _damage(copy: Path) -> list[str]:
    """Damage ``fc.weight`` in a copy of a golden file; return what the problem must name."""
    target = copy
    if copy.is_dir():
        index = json.loads(next(copy.glob("*.index.json")).read_text())
        target = copy / index["weight_map"]["fc.weight"]
    if target.suffix == ".safetensors":
        _misstate_shape(target, "fc.weight")
        return [f"{target}: ", "tensor 'fc.weight' (F32[3, 17]) needs 204 bytes"]
    if zipfile.is_zipfile(target):
        record = _flip_record(target, "fc.weight")
        return [f"{target}:{record}: ", f"Bad CRC-32 for file '{record}'"]
    # A legacy file stores its storages back to back with no per-record framing or CRC:
    # cutting the end is the damage it can report, against the file as a whole.
    target.write_bytes(target.read_bytes()[:-8])
    return [f"{target}: ", "is truncated"]


@pytest.mark.parametrize("name", sorted(GOOD_VERIFY))
def test_verify_damaged_copy_of_a_good_golden_file_names_the_damage(
    name: str, tmp_path: Path
) -> None:
    fmt = GOOD_VERIFY[name][0]
    copy = tmp_path / name
    if (GOLDEN / name).is_dir():
        shutil.copytree(GOLDEN / name, copy)
    else:
        shutil.copyfile(GOLDEN / name, copy)
    assert run("verify", copy).exit_code == 0  # the copy itself is sound
    expected = _damage(copy)
    result = run("verify", copy)
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"FAILED {copy} [{fmt}]: 1 problem"
    problems = [line for line in lines if line.startswith("  problem ")]
    assert len(problems) == 1, lines
    assert all(part in problems[0] for part in expected), (expected, problems[0])


def test_verify_sharded_folder_names_missing_and_bad_shards(tmp_path: Path) -> None:
    folder = tmp_path / "sharded"
    tk.save({f"w{i}": torch.full((16,), float(i)) for i in range(6)}, folder, max_shard_size=128)
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) >= 3
    shards[0].unlink()
    data = bytearray(shards[1].read_bytes())
    data[-1] ^= 0x01
    shards[1].write_bytes(bytes(data))
    result = run("verify", folder)
    assert result.exit_code == 1
    assert f"{shards[0].name}: listed in model.safetensors.index.json but missing" in result.stdout
    assert "checksum mismatch" in result.stdout


def test_verify_fails_files_a_load_refuses_as_dangerous() -> None:
    result = run("verify", GOLDEN / "malicious.pt")
    assert result.exit_code == 1
    assert "posix.system" in result.stdout and "DANGEROUS" in result.stdout


def test_verify_missing_path_exits_2(tmp_path: Path) -> None:
    assert run("verify", tmp_path / "nope").exit_code == 2


def _native_checkpoint(folder: Path) -> Path:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    tk.save_checkpoint(folder, model=model, optimizer=optimizer, epoch=3, loss=0.5)
    return folder


def test_native_checkpoint_folder_through_every_command(tmp_path: Path) -> None:
    folder = _native_checkpoint(tmp_path / "step-3")
    inspected = run("inspect", folder)
    assert inspected.exit_code == 0, inspected.output
    assert "epoch" in inspected.stdout and "weight [2, 3]" in inspected.stdout
    assert run("verify", folder).exit_code == 0
    assert run("scan", folder).exit_code == 0
    out = tmp_path / "model.safetensors"
    assert run("convert", folder, out).exit_code == 0
    assert run("diff", folder, out).exit_code == 0


def test_verify_native_checkpoint_names_the_damaged_tensor(tmp_path: Path) -> None:
    folder = _native_checkpoint(tmp_path / "step-3")
    shard = next(folder.glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    result = run("verify", folder)
    assert result.exit_code == 1, result.output
    problems = [line for line in result.stdout.splitlines() if line.startswith("  problem ")]
    assert len(problems) == 1
    assert "checksum mismatch" in problems[0]


# -------------------------------------------------------------------------------------- scan


@pytest.mark.parametrize(
    ("name", "code", "verdict"),
    [
        ("net.safetensors", 0, "safe"),
        ("net_sharded", 0, "safe"),
        ("net_checkpoint.pt", 0, "safe"),
        ("net_sharded_bin", 0, "safe"),
        ("whole_model.pt", 1, "unknown"),
        ("malicious.pt", 3, "dangerous"),
        ("malicious_legacy.pt", 3, "dangerous"),
        ("malicious.pkl", 3, "dangerous"),
    ],
)
def test_scan_exit_codes(name: str, code: int, verdict: str) -> None:
    result = run("scan", GOLDEN / name)
    assert result.exit_code == code, result.output
    assert result.stdout.splitlines()[-1] == f"verdict: {verdict}"


def test_scan_json_classifies_each_global() -> None:
    result = run("scan", GOLDEN / "malicious.pkl", "--json")
    assert result.exit_code == 3
    data = json.loads(result.stdout)
    verdicts = {g["name"]: g["verdict"] for g in data["files"][0]["globals"]}
    assert verdicts["posix.system"] == "dangerous"
    assert verdicts["collections.OrderedDict"] == "safe"
    assert data["verdict"] == "dangerous"


def test_scan_safetensors_says_no_pickle() -> None:
    result = run("scan", GOLDEN / "net.safetensors")
    assert "no pickle: safe" in result.stdout


@pytest.mark.parametrize("name", ["garbage.bin", "not_a_checkpoint.txt"])
def test_scan_non_pickle_exits_2(name: str) -> None:
    result = run("scan", GOLDEN / name)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: cannot scan")


# --------------------------------------------------------------------------------------- env


def test_env_text_and_json() -> None:
    text = run("env")
    assert text.exit_code == 0
    assert torch.__version__ in text.stdout
    assert "CUDA" in text.stdout and "MPS" in text.stdout and "cuDNN" in text.stdout
    data = json.loads(run("env", "--json").stdout)
    assert data["torch"]["version"] == torch.__version__
    assert data["cuda"]["available"] == torch.cuda.is_available()
    assert data["cuda"]["device_count"] == (
        torch.cuda.device_count() if torch.cuda.is_available() else 0
    )
    assert len(data["cuda"]["devices"]) == data["cuda"]["device_count"]
    assert data["packages"]["torchkeep"] == tk.__version__


def test_env_describes_cuda_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    class Props:
        name = "NVIDIA H100 80GB HBM3"
        major, minor = 9, 0
        total_memory = 80 * 2**30
        multi_processor_count = 132

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: Props())
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    result = run("env")
    assert result.exit_code == 0, result.output
    assert "available: CUDA 12.8, 2 device(s), current cuda:1" in result.stdout
    assert "cuda:1       NVIDIA H100 80GB HBM3 (compute 9.0, 80.0 GiB, 132 SMs)" in result.stdout
    data = json.loads(run("env", "--json").stdout)["cuda"]
    assert [d["index"] for d in data["devices"]] == [0, 1]
    assert data["devices"][0]["memory_bytes"] == 80 * 2**30


# ---------------------------------------------------------------------------- real processes


@pytest.mark.slow
def test_process_inspect_checkpoint() -> None:
    result = run_process("inspect", GOLDEN / "net_checkpoint.pt")
    assert result.returncode == 0, result.stderr
    assert "Adam at optimizer_state_dict" in result.stdout
    assert "\x1b[" not in result.stdout


@pytest.mark.slow
def test_process_exit_codes_of_diff_verify_and_scan(tmp_path: Path) -> None:
    assert (
        run_process(
            "diff", GOLDEN / "net.safetensors", GOLDEN / "flipped_data.safetensors"
        ).returncode
        == 1
    )
    assert run_process("verify", GOLDEN / "truncated.safetensors").returncode == 1
    assert run_process("scan", GOLDEN / "malicious.pt").returncode == 3


@pytest.mark.slow
def test_process_error_is_one_line_and_debug_shows_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pt"
    result = run_process("inspect", missing)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: no checkpoint at {str(missing)!r}: the path does not exist"
    ]
    debug = run_process("--debug", "inspect", missing)
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr and "CheckpointNotFoundError" in debug.stderr


@pytest.mark.slow
def test_process_convert_then_verify(tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    assert run_process("convert", GOLDEN / "net_state_dict.pt", out).returncode == 0
    result = run_process("verify", out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "9 checksums verified" in result.stdout


def test_convert_takes_the_tutorial_weights_not_the_loss(tmp_path: Path) -> None:
    model = torch.nn.Linear(4, 2)
    source = tmp_path / "tutorial.pt"
    torch.save(
        {"epoch": 3, "model_state_dict": model.state_dict(), "loss": torch.tensor(0.5)}, source
    )
    out = tmp_path / "w.safetensors"
    result = run("convert", source, out)
    assert result.exit_code == 0, result.output
    assert "model_state_dict" in result.output
    written = tk.load_state_dict(out)
    assert set(written) == {"weight", "bias"} and torch.equal(written["weight"], model.weight)
    scalars = tmp_path / "metrics.pt"
    torch.save({"loss": torch.tensor(0.5), "epoch": 3}, scalars)
    result = run("convert", scalars, tmp_path / "m.safetensors")
    assert result.exit_code != 0 and "no model weights" in result.output
    assert "--extract ''" in result.output
    assert not (tmp_path / "m.safetensors").exists()
    assert run("convert", scalars, tmp_path / "m.safetensors", "--extract", "").exit_code == 0
