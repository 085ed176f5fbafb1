"""medix_fast's kernels inside other RL codebases, one line each.

    from medix_fast.integrations.trl import GRPOTrainer    # TRL: instead of ``from trl import GRPOTrainer``
    from medix_fast.integrations.verl import register      # veRL: ``register()`` (or the plug-in module)

``trl`` is a drop-in ``trl.GRPOTrainer`` whose loss is ``fused_linear_policy_loss`` on the last
hidden states and the LM head; ``verl`` adds policy losses computed by ``policy_loss`` to veRL's
registry and swaps veRL's fused log-prob/entropy kernel for ``fused_linear_logprobs``
(``verl_plugin`` does both when veRL imports it). Nothing here is imported by
``medix_fast.kernels`` or by this package's ``__init__``: each adapter imports its library itself.
Tests: ``tests/test_integrations_trl.py``, ``tests/test_integrations_verl.py``.
"""
