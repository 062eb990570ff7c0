"""Drives worker processes over a list of jobs; a crash or a hang costs one job, not the run."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

WORKER = Path(__file__).with_name("worker.py")
START_GRACE = 60.0  # importing torch and starting up, before the first job


def _drain(proc: subprocess.Popen[bytes], into: list[bytes]) -> None:
    assert proc.stderr is not None
    into.append(proc.stderr.read())


def _run_lane(built_file: str, jobs: list[dict[str, Any]], results: dict[str, Any]) -> None:
    pending = list(jobs)
    while pending:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
            json.dump(pending, handle)
        read_fd, write_fd = os.pipe()
        proc = subprocess.Popen(
            [sys.executable, str(WORKER), built_file, handle.name, str(write_fd)],
            pass_fds=(write_fd,),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        os.close(write_fd)
        by_key = {job["key"]: job for job in pending}
        current: str | None = None
        deadline = time.monotonic() + START_GRACE
        buffer = b""
        selector = selectors.DefaultSelector()
        selector.register(read_fd, selectors.EVENT_READ)
        stderr_chunks: list[bytes] = []
        threading.Thread(target=_drain, args=(proc, stderr_chunks), daemon=True).start()
        eof = False
        while not eof:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                os.killpg(proc.pid, signal.SIGKILL)
                if current is not None:
                    results[current] = {"key": current, "outcome": "hang"}
                break
            if not selector.select(timeout=min(remaining, 1.0)):
                continue
            chunk = os.read(read_fd, 1 << 16)
            if not chunk:
                eof = True
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                message = json.loads(line)
                if "start" in message:
                    current = message["start"]
                    deadline = time.monotonic() + by_key[current]["timeout"]
                else:
                    results[message["key"]] = message
                    current = None
        selector.close()
        os.close(read_fd)
        returncode = proc.wait()
        os.unlink(handle.name)
        if current is not None and current not in results:
            results[current] = {
                "key": current,
                "outcome": "crash",
                "returncode": returncode,
                "stderr": b"".join(stderr_chunks).decode(errors="replace")[-1500:],
            }
        done = set(results)
        remaining_jobs = [job for job in pending if job["key"] not in done]
        if len(remaining_jobs) == len(pending):  # the worker failed before any job
            for job in pending:
                results[job["key"]] = {
                    "key": job["key"],
                    "outcome": "crash",
                    "returncode": returncode,
                    "stderr": b"".join(stderr_chunks).decode(errors="replace")[-1500:],
                }
            return
        pending = remaining_jobs


def run_jobs(built_file: str, lanes: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Run each lane in its own worker (lanes run side by side); results keyed by job key."""
    results: dict[str, Any] = {}
    threads = [
        threading.Thread(target=_run_lane, args=(built_file, lane, results)) for lane in lanes
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results
