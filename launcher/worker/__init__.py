"""What each rank runs (the only side that imports torch, deepspeed and transformers)."""
