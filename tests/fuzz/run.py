"""Run a fuzz harness: ``python tests/fuzz/run.py PARSER --executions N [--seed S]``.

With ``--isolated`` (what ``make fuzz`` uses) the harness runs in child processes of
``--batch`` executions each, so a crash (a signal) or a hang that the per-input deadline
cannot interrupt is caught and counted instead of ending the run. Prints:

    PARSER: N executions, K typed refusals, A accepted, U untyped exceptions,
            C crashes, H hangs, T s
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fuzz.harness import HARNESSES, Tally, run


def _child(parser: str, executions: int, seed: int, keep: str | None) -> None:
    tally = run(parser, executions, seed, keep_examples=Path(keep) if keep else None)
    print(json.dumps(tally.__dict__))


def _isolated(parser: str, executions: int, seed: int, batch: int, keep: str | None) -> Tally:
    total = Tally()
    crashes = 0
    done = 0
    while done < executions:
        count = min(batch, executions - done)
        cmd = [
            sys.executable,
            __file__,
            parser,
            "--executions",
            str(count),
            "--seed",
            str(seed + done),
            "--child",
        ]
        if keep:
            cmd += ["--keep", keep]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60 + count)
        except subprocess.TimeoutExpired:
            total.hangs += 1
            done += count
            continue
        if proc.returncode != 0:
            crashes += 1
            total.examples.append(f"batch at seed {seed + done} exited {proc.returncode}")
        else:
            part = json.loads(proc.stdout.strip().splitlines()[-1])
            for key in ("executions", "refusals", "accepted", "untyped", "hangs", "markers"):
                setattr(total, key, getattr(total, key) + part[key])
            total.examples += part["examples"]
        done += count
    total.crashes = crashes  # type: ignore[attr-defined]
    return total


def main() -> int:
    args = argparse.ArgumentParser(description=__doc__)
    args.add_argument("parser", choices=sorted(HARNESSES))
    args.add_argument("--executions", type=int, default=10_000)
    args.add_argument("--seed", type=int, default=0)
    args.add_argument("--isolated", action="store_true")
    args.add_argument("--batch", type=int, default=20_000)
    args.add_argument("--keep", help="folder to write failing inputs to")
    args.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    opts = args.parse_args()
    if opts.child:
        _child(opts.parser, opts.executions, opts.seed, opts.keep)
        return 0
    start = time.monotonic()
    if opts.isolated:
        tally = _isolated(opts.parser, opts.executions, opts.seed, opts.batch, opts.keep)
    else:
        tally = run(
            opts.parser,
            opts.executions,
            opts.seed,
            keep_examples=Path(opts.keep) if opts.keep else None,
        )
    crashes = getattr(tally, "crashes", 0)
    elapsed = time.monotonic() - start
    print(
        f"{opts.parser}: {tally.executions} executions, {tally.refusals} typed refusals, "
        f"{tally.accepted} accepted, {tally.untyped} untyped exceptions, {crashes} crashes, "
        f"{tally.hangs} hangs, {elapsed:.1f} s ({tally.executions / max(elapsed, 1e-9):.0f}/s)"
    )
    for example in tally.examples[:10]:
        print(f"  {example}")
    if tally.markers:
        print(f"  {tally.markers} inputs created the marker file")
    return 1 if (tally.untyped or crashes or tally.hangs or tally.markers) else 0


if __name__ == "__main__":
    sys.exit(main())
