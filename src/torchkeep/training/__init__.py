"""Training state: the checkpoint tree and manifest, state capture and RNG, save_checkpoint
/ load_checkpoint, the CheckpointManager, retention policies and where steps live."""
