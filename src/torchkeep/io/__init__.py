"""The fast path under every save and load: tensor bytes moved in parallel, with no copies.

- :mod:`~torchkeep.io.write`: parallel positional writes straight from tensor memory, xxh3
  computed as the bytes go out, the header written last into space sized up front;
- :mod:`~torchkeep.io.read`: parallel reads straight into destination tensors, large tensors
  split across threads, each thread reading one contiguous stretch of the file;
- :mod:`~torchkeep.io.recycle`: retired checkpoint files kept for overwriting, which is several
  times faster than filling freshly allocated pages.

Everything here is internal: the formats and the checkpoint writer call it.
"""

from __future__ import annotations

from torchkeep.io.read import ReadExtent, read_extents
from torchkeep.io.write import FilePlan, write_files

__all__ = ["FilePlan", "ReadExtent", "read_extents", "write_files"]
