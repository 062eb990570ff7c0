"""torchkeep inside the trainers people already use, one module per framework.

- :mod:`torchkeep.integrations.lightning`: a Lightning ``CheckpointIO`` plugin;
- :mod:`torchkeep.integrations.transformers`: a transformers ``Trainer`` subclass and mixin;
- :mod:`torchkeep.integrations.accelerate`: ``Accelerator.save_state`` / ``load_state``
  through torchkeep (``install(accelerator)``).

Each imports its framework only when it is imported itself (``pip install
torchkeep[lightning]`` and so on), and is reachable as ``torchkeep.lightning``,
``torchkeep.transformers`` and ``torchkeep.accelerate``.
"""
