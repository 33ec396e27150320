"""Render stage: pure functions from a validated config to text and dicts (DeepSpeed JSON, launch.sh, sbatch,
hostfiles, run-dir files). No I/O beyond reading inputs the config names; no torch, no deepspeed."""
