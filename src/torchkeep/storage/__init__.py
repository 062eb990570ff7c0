"""Where checkpoint bytes live. Only the local filesystem for now."""
