"""sft-forgetting: measure and mitigate catastrophic forgetting in supervised fine-tuning.

The Python API (`forgetting.harness.api`): `train`, `evaluate`, `run_experiment`, `gate`, the four things the
`forgetting` command does. The subpackages are the repository's top-level folders: `forgetting.harness` (config,
models, data, the SFT loop, experiments, the CLI), `forgetting.mitigations`, `forgetting.evals`,
`forgetting.reports`; in a checkout `forgetting/harness` etc. are links to them.

The API is imported on first use, so `import forgetting.harness.errors` (or the CLI's --help) does not load torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"
__all__ = ["train", "evaluate", "run_experiment", "gate", "GateResult"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("forgetting.harness.api"), name)
    raise AttributeError(f"module 'forgetting' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
