"""Export stage: a run's ZeRO checkpoint -> a Hugging Face model directory (`python -m launcher.export`).

locate.py finds and checks the checkpoint (no torch); zero_state.py reads DeepSpeed's ZeRO state;
shards.py writes the safetensors shards and their index; hf_dir.py puts the directory together atomically.
"""
