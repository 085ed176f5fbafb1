"""medix_fast: a lean, fast trainer for group-based RL (GRPO, DAPO, GSPO) on clinical QA."""
__version__ = "0.1.0"
