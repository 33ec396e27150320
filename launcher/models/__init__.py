"""Model facts shared by the ranks and the export: Hugging Face configs built from the launcher's model
config, and tokenizers (a model dir's own, or the byte-level one built on the fly)."""
