"""launcher: Hydra configs -> DeepSpeed JSON -> `deepspeed` runner, locally or on SLURM."""

__version__ = "0.1.0"
