"""Training: the native loop, optimizers and schedules, checkpoints, devices and distribution."""
