"""Imported by veRL in each of its processes to enable medix_fast: registers the policy losses and
the fused log-prob kernel of :mod:`medix_fast.integrations.verl` (see its docstring).

    actor_rollout_ref.model.external_lib=medix_fast.integrations.verl_plugin
    # or, in the environment of every veRL process: VERL_USE_EXTERNAL_MODULES=medix_fast.integrations.verl_plugin
"""
from medix_fast.integrations.verl import register

register()
