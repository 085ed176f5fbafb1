"""The RL step: ``rollout.py`` (generate, score, filter, advantages), ``batch.py`` (sequences and
micro-batches), ``update.py`` (old / reference log-probs, the PPO epochs of optimizer steps)."""
