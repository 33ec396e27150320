"""Launch stage: what starts things and touches the run dir (local runner, SLURM submission and allocation,
run-dir writes, host facts, DeepSpeed's shm files and JIT locks). No torch, no deepspeed."""
