"""``python -m torchkeep``: the same command as ``torchkeep``."""

from __future__ import annotations

from torchkeep.cli import main

if __name__ == "__main__":
    main(prog_name="torchkeep")
