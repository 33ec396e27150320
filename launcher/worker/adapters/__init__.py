"""Parameter-efficient adapters on a frozen base model (one module per adapter type)."""
