"""The policy model: ``loading.py`` (local Hugging Face checkpoints, the embedded tiny ones, dtype,
attention back-end, stop ids) and ``forward.py`` (hidden states, LM head, positions)."""
