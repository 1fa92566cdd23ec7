"""Training: settings and presets, the one loop, objectives, optimiser, checkpoints, run folders and the modes
built on the loop (linear probe, prefix cache, self-training, combine)."""
