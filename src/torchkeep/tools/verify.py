"""Check a checkpoint's structure, lengths and checksums, collecting every problem.

Unlike ``Source.verify`` (which raises at the first bad tensor), every tensor, zip record and
shard is checked and each problem is named. What is checked per format:

- safetensors: header JSON, dtypes, shapes, offsets (no gaps, no overlaps, nothing past the
  end), the file's length, and each tensor's xxh3 checksum where torchkeep recorded one;
- torch zip: the zip directory and every record's CRC-32, then the pickle (scanned, and loaded
  through the allowlist unless it references other globals);
- torch legacy and plain pickles: the pickle, scanned and loaded through the allowlist;
- sharded folders: the index, every shard (as above), and that each shard holds the tensors
  the index places in it;
- other formats (native checkpoint folders, DCP folders, ...): every safetensors file inside,
  then the format's own ``Source.verify``.

Every file is also opened the way the loaders open it (``formats.registry.open_format``, the
same header parser, containment checks and typed errors), so verify never passes what a load
refuses. Checksums are computed while streaming the file in 16 MiB blocks, so memory stays flat.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from torchkeep._progress import ProgressOption, reporter
from torchkeep.formats.safetensors_header import is_safetensors_file
from torchkeep.storage.locate import needs_staging, readable
from torchkeep.tools.checks import (
    HeaderChecker,
    Problem,
    VerifyResult,
    file_size,
)


def verify(
    path: str | os.PathLike[str],
    *,
    trust: bool = False,
    allow_globals: Iterable[str] = (),
    progress: ProgressOption = None,
) -> VerifyResult:
    """Check a file or folder completely and return every problem found, without raising.

    Every tensor, zip record and shard is checked (structure, lengths, stored xxh3 checksums,
    zip CRCs, the pickle through the allowlist) and each problem is named, where a load with
    ``verify=True`` stops at the first one. Memory stays flat: data is streamed in blocks.

    Args:
        path: a file or folder in any format torchkeep reads.
        trust: read pickles without the allowlist (only for files you trust).
        allow_globals: extra ``"module.name"`` globals the allowlist accepts.
        progress: ``True`` for a progress bar on stderr, or a function called with (bytes
            checked, bytes in all) as the check proceeds; off by default.

    Returns:
        A :class:`VerifyResult`; ``result.ok`` is true when nothing is wrong.

    Raises:
        CheckpointNotFoundError: nothing at ``path``.

    Example:
        >>> result = torchkeep.verify("model.safetensors")
        >>> result.ok, result.checksums
        (True, 42)
    """
    if needs_staging(path):
        with readable(path) as local:
            staged = verify(local, trust=trust, allow_globals=allow_globals, progress=progress)
        staged.path = os.fspath(path)
        return staged
    where = Path(os.fspath(path))
    result = VerifyResult(str(where))
    with reporter(progress, f"verifying {where.name}") as asked:
        report = asked or (lambda done, total: None)
        if is_safetensors_file(where):
            # What the format registry would detect, checked without importing torch.
            result.format = "safetensors"
            HeaderChecker(result, report, file_size(where)).safetensors(where)
            return result
        # Any other format is opened the way the loaders open it, which needs torch.
        from torchkeep.tools.verify_formats import check

        return check(where, result, trust, tuple(allow_globals), report)


__all__ = ["Problem", "VerifyResult", "verify"]
