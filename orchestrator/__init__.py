"""The Ray layer: Ray Tune sweeps and ablations whose trials train ``dmkd.engine.fit``, in the Tune trial's
own process (one worker) or in a Ray Train DDP worker group (several)."""
