"""Training loop, checkpoints, distributed helpers and metric logging."""
