"""The Ray layer: Ray Tune sweeps whose trials are Ray Train DDP runs of ``dmkd.train``."""
