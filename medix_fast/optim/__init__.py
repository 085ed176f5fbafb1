"""The update's optimizer: ``adamw.py`` (AdamW with its states in host memory or in bf16, streamed through the
device chunk by chunk, and the bytes per parameter each ``optim.offload`` / ``optim.state_dtype`` puts where)."""
