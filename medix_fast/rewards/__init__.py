"""MediX-R1's composite reward, batched in-process: ``score``, ``RewardConfig``, ``build_reward``.

See ``composite.py`` for the formula and the config, ``rules.py`` for the string rules,
``semantic.py`` and ``judge.py`` for the two reward models, ``overlong.py`` for DAPO's shaping.
"""
from medix_fast.config import RewardConfig, medix_weights
from medix_fast.rewards.composite import RewardFunction, build_reward, score
from medix_fast.rewards.rules import validate_solutions

__all__ = ["RewardConfig", "RewardFunction", "build_reward", "medix_weights", "score", "validate_solutions"]
