"""A training job: model, data, optimisation, mitigations and output, as one validated config.

Load with `load_job(path, overrides)`; the resolved config is saved beside every checkpoint
(`forgetting_config.yaml`). The mitigation specs are checked against the registry at load time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from forgetting.harness.config import DataConfig, ModelConfig, TrainConfig, upgrade_train
from forgetting.harness.configlib import from_dict, knob, load_config, to_dict
from forgetting.harness.errors import HarnessError
from forgetting.mitigations import upgrade_specs, validate_specs


@dataclass
class TrainJob:
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "the base model"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "the SFT data"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "optimisation"})
    mitigations: list[dict[str, Any]] = knob([], "mitigations to apply, e.g. [{name: lora, r: 16}]")
    output_dir: str = knob("runs/train", "where checkpoints, metrics.jsonl and the resolved config go")

    def __post_init__(self):
        validate_specs(self.mitigations)


def load_job(path: str | None, overrides: list[str] = ()) -> TrainJob:
    """The training job from a YAML file plus `key=value` overrides, validated."""
    return load_config(TrainJob, path, overrides)


def upgrade_job(config: dict) -> dict:
    """A job config saved by an older version, with its mitigations and train keys respelled as today's (see
    `upgrade_specs`, `upgrade_train`)."""
    if not isinstance(config, dict):
        return config
    if "train" in config:
        config = dict(config, train=upgrade_train(config["train"]))
    if "mitigations" not in config:
        return config
    return dict(config, mitigations=upgrade_specs(config["mitigations"]))


RESULT_FREE_TRAIN_KEYS = ("progress", "memory_check", "log_with", "tracker_project")  # trackers only watch
RESULT_FREE_KEYS = ("resources",)  # an experiment's: what each unit asks a launcher for


def comparable(config: dict, cls: type = TrainJob) -> dict:
    """`config` as `cls` resolves it today, without the knobs that do not change results (the progress bar, the
    memory check, the experiment trackers, the resources a launcher asks for).

    Resolving first gives knobs added since a run was saved their defaults, so an older run still resumes; a
    saved config that no longer resolves (a removed knob) is compared as saved, and so differs.
    """
    try:
        config = to_dict(from_dict(cls, config))
    except (HarnessError, ValueError, TypeError):
        pass
    kept = {k: v for k, v in config.items() if k not in RESULT_FREE_KEYS}
    return dict(kept, train={k: v for k, v in config.get("train", {}).items() if k not in RESULT_FREE_TRAIN_KEYS})
