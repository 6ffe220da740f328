"""Training: run configs, the loop, checkpoints and logs."""
