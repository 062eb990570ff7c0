"""torch.distributed.checkpoint: saves by every rank, resharding restores, readers with an
allowlisted .metadata, and converters to and from safetensors."""
