"""Mitigations against forgetting, each registered by name (see `mitigations.registry` for the protocol).

Importing the package registers the built-in mitigations; a plugin registers its own with
`@register_mitigation(name, ConfigClass)` from `mitigations.registry`.
"""

from forgetting.mitigations import ewc, freeze, kl_to_base, l2sp, lora, low_lr, replay, wise_ft  # noqa: F401  (registers them)
from forgetting.mitigations.registry import (
    CHAINED,
    HOOKS,
    REGISTRY,
    Mitigation,
    build_mitigations,
    chain,
    hook_results,
    register_mitigation,
    registered,
    upgrade_axis,
    upgrade_specs,
    validate_specs,
)

__all__ = [
    "CHAINED",
    "HOOKS",
    "REGISTRY",
    "Mitigation",
    "build_mitigations",
    "chain",
    "hook_results",
    "register_mitigation",
    "registered",
    "upgrade_axis",
    "upgrade_specs",
    "validate_specs",
]
