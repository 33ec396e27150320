"""Config stage: typed schemas, Hydra composition, validation, world shape (no torch, no deepspeed)."""
