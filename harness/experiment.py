"""An experiment: one base model, one SFT recipe, several strategies x seeds, one evaluation suite.

    forgetting run configs/experiment.yaml [key=value ...]

A strategy is a named list of mitigations plus optional job overrides; `sweep` turns one strategy into
several, one per combination of values, so one config answers "how much data" (`data.limit`), "what
mixture" (`replay.ratio`) or "does the format matter" (`data.format`). Each (strategy variant, seed) is a
*unit*: a `TrainJob` trained into `<output_dir>/units/<unit id>/train` and evaluated there.

Everything is validated when the file is loaded, before any model is touched: unknown keys, mitigations
or sweep axes, duplicate strategy names, bad overrides (each unit's job is built and checked).
"""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from forgetting.evals.runner import EvalSettings
from forgetting.harness.config import DataConfig, ModelConfig, TrainConfig, upgrade_train
from forgetting.harness.configlib import apply_overrides, from_dict, knob, load_config, read_yaml, set_key, to_dict
from forgetting.harness.errors import UserError
from forgetting.harness.job import TrainJob
from forgetting.mitigations import upgrade_axis, upgrade_specs
from forgetting.mitigations.general_data import GeneralData

# The primary metric of each suite task: what the forgetting report compares (other tasks: their first metric).
PRIMARY_METRICS = {
    "forgetting_knowledge": "acc",
    "forgetting_ifeval": "prompt_level_strict_acc",
    "forgetting_target": "exact_match",
    "forgetting_prose": "bits_per_byte",
    "forgetting_format_health": "leak_rate",
}
# `--quick`: a smoke run of any experiment (minutes on a CPU): few steps, few documents, the first seed.
QUICK_OVERRIDES = ["train.max_steps=2", "train.save_every=0", "eval.limit=8", "eval.subsample={}"]


@dataclass
class Strategy:
    name: str = knob(None, "label in reports and the unit directory name (letters, digits, _ - .)")
    mitigations: list[dict[str, Any]] = knob([], "mitigations, e.g. [{name: lora, r: 16}]; [] is the naive baseline")
    overrides: dict[str, Any] = knob({}, "job keys changed for this strategy only, e.g. {train.lr: 1e-4}")
    sweep: dict[str, list] = knob(
        {},
        "axis -> values: a job key (data.limit, data.format, train.lr) or "
        "<mitigation>.<field> (replay.ratio, replay.data.size)",
    )

    def __post_init__(self):
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", self.name):
            raise ValueError(f"name: expected letters, digits, '_', '-' or '.', got {self.name!r}")
        for axis, values in self.sweep.items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"sweep.{axis}: expected a non-empty list of values, got {values!r}")


@dataclass
class Stage:
    """One SFT dataset of a sequence (continual SFT): trained from the previous stage's weights."""

    name: str = knob(None, "label of the stage in reports and its directory (letters, digits, _ - .)")
    data: dict[str, Any] = knob({}, "data keys of this stage, over the experiment's data, e.g. {path: builtin:units}")
    train: dict[str, Any] = knob({}, "train keys of this stage only, e.g. {max_steps: 40}")
    target_task: Optional[str] = knob(None, "the lm-eval task that measures this stage's skill (in eval.tasks)")

    def __post_init__(self):
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", self.name):
            raise ValueError(f"name: expected letters, digits, _ - . (a directory name), got {self.name!r}")
        if not isinstance(self.target_task, str) or not self.target_task:
            raise ValueError("target_task: each stage needs the lm-eval task that measures it")


@dataclass
class Experiment:
    name: str = knob("experiment", "title of the reports")
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "the base model"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "the SFT data (shared by all strategies)"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "the training recipe (shared)"})
    eval: EvalSettings = field(
        default_factory=EvalSettings, metadata={"help": "lm-eval tasks and settings, before and after"}
    )
    strategies: list[dict[str, Any]] = knob([{"name": "naive"}], "strategies to compare (see Strategy)")
    seeds: list[int] = knob([0], "training seeds; every strategy runs once per seed")
    eval_dtype: Literal["auto", "float32", "bfloat16", "float16"] = knob(
        "auto",
        "weights dtype for evaluation (training keeps fp32 master weights); auto: bf16 where the hardware computes "
        "it natively (a bf16 GPU, a CPU with avx512_bf16/amx_bf16), else fp32",
    )
    target_task: Optional[str] = knob(
        "forgetting_target", "the task that measures what the SFT teaches (a gain, not forgetting); null: none"
    )
    primary_metrics: dict[str, str] = knob(
        {}, "task -> metric the reports compare (defaults: the suite's own; else the task's first metric)"
    )
    keep_models: bool = knob(True, "keep each unit's final model (false: delete the weights once evaluated)")
    output_dir: str = knob("runs/experiment", "the run directory: results, reports, per-unit checkpoints and logs")
    resources: dict[str, dict[str, Any]] = knob(
        {},
        "strategy name (or default) -> what each of its units asks a launcher for (--launcher ray or slurm): "
        "processes (that train it together; default 1), cpus and gpus per process (1, 0), and for Slurm nodes (1), "
        "time (minutes; 240), partition, account and slurm (more sbatch options, e.g. {mem: 64G}); "
        "e.g. {default: {cpus: 4, time: 120}, lora: {gpus: 1}}",
    )
    stages: list[dict[str, Any]] = knob(
        [],
        "continual SFT: an ordered list of stages (see Stage), each trained from the previous stage's weights and "
        "evaluated on every stage's target_task and the suite; [] : one fine-tune on `data`",
    )

    def __post_init__(self):
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: expected distinct integers, got {self.seeds}")
        parsed = [from_dict(Strategy, s, f"strategies[{i}]") for i, s in enumerate(self.strategies)]
        if not parsed:
            raise ValueError("strategies: at least one strategy is needed (e.g. [{name: naive}])")
        names = [s.name for s in parsed]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"strategies: the name {name!r} is used {names.count(name)} times")
        self.strategy_list = parsed
        check_resources(self.resources, names)
        self.stage_list = [from_dict(Stage, s, f"stages[{i}]") for i, s in enumerate(self.stages)]
        for strategy in parsed if not self.stage_list else ():
            for spec in strategy.mitigations:
                if (
                    isinstance(spec, dict)
                    and isinstance(spec.get("data"), dict)
                    and spec["data"].get("source") == "stages"
                ):
                    raise ValueError(
                        f"strategies ({strategy.name}): {spec.get('name')}.data.source: stages needs `stages:`"
                    )
        stage_names = [s.name for s in self.stage_list]
        if len(set(stage_names)) != len(stage_names):
            raise ValueError(f"stages: stage names must differ, got {stage_names}")
        check_curves(self.eval, units(self))  # builds and validates every unit's job, and the curve steps against it

    @property
    def target_tasks(self) -> list[str]:
        """The tasks that measure what the SFT teaches: each stage's, or the experiment's target_task."""
        if self.stage_list:
            return [s.target_task for s in self.stage_list]
        return [self.target_task] if self.target_task is not None else []


# what a unit's job may ask a launcher for: name -> (check, what it must be). cpus and gpus are per process.
RESOURCES = {
    "cpus": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "gpus": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "processes": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
    "nodes": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
    "time": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "minutes, an integer >= 1"),
    "partition": (lambda v: isinstance(v, str) and v != "", "a partition name"),
    "account": (lambda v: isinstance(v, str) and v != "", "an account name"),
    "slurm": (lambda v: isinstance(v, dict), "a mapping of sbatch options, e.g. {mem: 64G, qos: high}"),
}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_resources(resources: dict, strategies: list[str]) -> None:
    """`resources:` names `default` or a strategy, each a mapping of RESOURCES' names (ValueError otherwise)."""
    for name, asks in resources.items():
        if name != "default" and name not in strategies:
            raise ValueError(f"resources.{name}: not a strategy; expected default or one of {', '.join(strategies)}")
        if not isinstance(asks, dict):
            raise ValueError(f"resources.{name}: expected a mapping like {{cpus: 1, gpus: 0}}, got {asks!r}")
        for key, value in asks.items():
            if key not in RESOURCES:
                raise ValueError(f"resources.{name}.{key}: unknown; expected one of {', '.join(RESOURCES)}")
            valid, expected = RESOURCES[key]
            if not valid(value):
                raise ValueError(f"resources.{name}.{key}: expected {expected}, got {value!r}")


@dataclass(frozen=True)
class Unit:
    """One training run of the experiment: a strategy variant and a seed."""

    id: str  # directory name under units/
    strategy: str  # the variant's label, e.g. "replay[ratio=0.3]"
    family: str  # the strategy's name before sweeping
    axes: dict  # sweep axis -> value for this variant
    seed: int
    job: TrainJob  # the fine-tune (of a sequence: its first stage)
    stage_jobs: tuple[TrainJob, ...] = ()  # a sequence's stages in order, each from the previous one's weights


def check_curves(settings: EvalSettings, unit_list: list[Unit]) -> None:
    """`eval.every` against the units' training (with stages: each stage's): listed steps within each job's
    train.max_steps (an epoch-based job is checked when its step count is known), no sharded training (the
    model is evaluated in place)."""
    if settings.every is None:
        return
    for unit, job in ((u, job) for u in unit_list for job in u.stage_jobs or (u.job,)):
        t = job.train
        if t.distributed == "fsdp":
            raise ValueError(
                f"eval.every: not with train.distributed=fsdp (unit {unit.id}): a sharded model cannot be "
                "evaluated in place yet"
            )
        listed = settings.every if isinstance(settings.every, list) else []  # every N: as many points as fit
        beyond = [step for step in listed if t.max_steps is not None and step > t.max_steps]
        if beyond:
            raise ValueError(f"eval.every: step {beyond[0]} is beyond train.max_steps={t.max_steps} of unit {unit.id}")


def _variants(strategy: Strategy) -> list[dict]:
    axes = list(strategy.sweep)
    return [dict(zip(axes, combo)) for combo in itertools.product(*(strategy.sweep[a] for a in axes))]


def _label(name: str, axes: dict) -> str:
    if not axes:
        return name
    return name + "[" + ",".join(f"{a.split('.')[-1]}={v}" for a, v in axes.items()) + "]"


def _unit_id(label: str, seed: int) -> str:
    flat = label.replace("[", "__").replace("]", "").replace("=", "-").replace(",", "_")
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", flat).strip("_") + f"__seed{seed}"


def unit_job(
    exp: Experiment,
    strategy: Strategy,
    axes: dict,
    seed: int,
    output_dir: str,
    where: str,
    stage: Stage | None = None,
    after: str | None = None,
    earlier: int = 0,
) -> TrainJob:
    """The TrainJob of one unit (or of one stage of it): shared recipe + the stage's keys + strategy overrides +
    sweep values + seed, validated; `after`: the previous stage's output_dir, whose weights this stage continues."""
    data = {"model": to_dict(exp.model), "data": to_dict(exp.data), "train": to_dict(exp.train)}
    if stage is not None:
        for part in ("data", "train"):
            for key, value in getattr(stage, part).items():
                set_key(data, [part, *key.split(".")], value, f"stages.{stage.name}.{part}")
    mitigations = copy.deepcopy(strategy.mitigations)
    for key, value in strategy.overrides.items():  # unknown keys are refused (with a suggestion) by from_dict
        set_key(data, key.split("."), value, f"{where}.overrides")
    for axis, value in axes.items():
        head = axis.split(".")[0]
        if head in ("model", "data", "train"):
            set_key(data, axis.split("."), value, f"{where}.sweep")
            continue
        spec = next((m for m in mitigations if isinstance(m, dict) and m.get("name") == head), None)
        if spec is None or "." not in axis:
            raise UserError(
                f"{where}.sweep: axis {axis!r} is neither a job key (data.limit, train.lr, ...) nor "
                f"<mitigation>.<field> of a mitigation this strategy lists"
            )
        # replay.data.size: a nested knob; an axis saved before its knob moved names the units as it did
        set_key(spec, upgrade_axis(axis).split(".")[1:], value, f"{where}.sweep")
    data["train"]["seed"] = seed
    data["mitigations"] = mitigations
    data["output_dir"] = output_dir
    if stage is not None:
        data["mitigations"] = stage_mitigations(mitigations, after, output_dir, where, earlier)
    if after is not None:  # the previous stage's weights, saved as a Hugging Face model directory
        data["model"].update(name_or_path=continuation(after, mitigations), gguf_file=None, revision=None)
    return from_dict(TrainJob, data, where)


def continuation(output_dir: str, mitigations: list[dict]) -> str:
    """Where a stage trained into `output_dir` leaves the weights the next stage starts from: its final model,
    the LoRA adapter merged into its base (`final/merged`: one adapter per stage), or the one WiSE-FT point."""
    names = {m.get("name"): m for m in mitigations if isinstance(m, dict)}
    if "lora" in names:
        return f"{output_dir}/final/merged"
    if "wise_ft" in names:
        return f"{output_dir}/final/wise_ft_{names['wise_ft']['alphas'][0]:g}"
    return f"{output_dir}/final"


def stage_mitigations(mitigations: list[dict], after: str | None, output_dir: str, where: str, earlier: int) -> list:
    """The mitigations of one stage: online EWC takes the Fisher accumulated over the earlier stages; replay of
    `source: stages` draws from the buffer of earlier stages' examples (none at the first stage); WiSE-FT
    interpolates within the stage and the next one continues from its single point."""
    out = []
    for spec in copy.deepcopy(mitigations):
        name = spec.get("name") if isinstance(spec, dict) else None
        if name == "wise_ft" and len(spec.get("alphas", [0, 0])) != 1:
            raise UserError(f"{where}: wise_ft in stages needs exactly one alpha (the point the next stage continues)")
        if name == "lora":
            spec["merge_on_export"] = True  # the next stage trains a new adapter on this one merged
        if name == "ewc" and after is None:
            spec.pop("online_decay", None)  # nothing earlier to decay at the first stage
        if name == "ewc" and after is not None:  # F = decay * F(earlier stages) + F estimated at this stage's start
            spec["fisher_path"] = f"{after}/ewc_fisher.safetensors"
            spec.setdefault("online_decay", 1.0)
        if name == "replay" and isinstance(spec.get("data"), dict) and spec["data"].get("source") == "stages":
            if after is None:
                continue  # the first stage has no earlier stage to replay
            spec["data"] = dict(spec["data"], source=str(Path(output_dir).parent / REPLAY_BUFFER), kind="conversations")
            # the whole buffer: `size` examples of each earlier stage (harness/pipeline.py writes it)
            spec["data"]["size"] = spec["data"].get("size", GeneralData().size) * earlier
        out.append(spec)
    return out


# a stage's replay buffer (replay with `data.source: stages`): examples of the earlier stages, beside its train/
REPLAY_BUFFER = "replay_buffer.jsonl"


def units(exp: Experiment) -> list[Unit]:
    """Every (strategy variant, seed) of the experiment, in config order."""
    out = []
    for i, strategy in enumerate(exp.strategy_list):
        for axes in _variants(strategy):
            label = _label(strategy.name, axes)
            for seed in exp.seeds:
                unit_id = _unit_id(label, seed)
                where = f"strategies[{i}] ({strategy.name})"
                stage_jobs = _stage_jobs(exp, strategy, axes, seed, f"{exp.output_dir}/units/{unit_id}", where)
                job = stage_jobs[0] if stage_jobs else None
                if job is None:
                    job = unit_job(exp, strategy, axes, seed, f"{exp.output_dir}/units/{unit_id}/train", where)
                out.append(Unit(unit_id, label, strategy.name, axes, seed, job, tuple(stage_jobs)))
    ids = [u.id for u in out]
    for unit_id in ids:
        if ids.count(unit_id) > 1:
            raise UserError(f"strategies: two variants share the directory name {unit_id!r}; rename one")
    return out


def stage_dir(unit_dir: str | Path, index: int, stage: Stage) -> Path:
    """units/<id>/stages/<k>_<name>: a stage's training output (train/), evaluation and replay buffer."""
    return Path(unit_dir) / "stages" / f"{index + 1}_{stage.name}"


def _stage_jobs(exp: Experiment, strategy: Strategy, axes: dict, seed: int, unit_dir: str, where: str) -> list:
    jobs, after = [], None
    for k, stage in enumerate(exp.stage_list):
        output_dir = str(stage_dir(unit_dir, k, stage) / "train")
        jobs.append(unit_job(exp, strategy, axes, seed, output_dir, f"{where}, stage {stage.name}", stage, after, k))
        after = output_dir
    return jobs


def load_experiment(path: str | None, overrides: list[str] = (), quick: bool = False) -> Experiment:
    """The experiment from YAML + `key=value` overrides (+ the quick preset), validated."""
    refuse_moved_axes(apply_overrides(read_yaml(path) if path is not None else {}, list(overrides)), path)
    exp = load_config(Experiment, path, list(overrides))
    if not quick:
        return exp
    preset = [*QUICK_OVERRIDES, f"seeds=[{exp.seeds[0]}]", f"output_dir={exp.output_dir}-quick"]
    if exp.eval.every is not None:  # the curve too, at its start and end (every: 2 of the 2 steps)
        preset += ["eval.every=2", "eval.curve_subsample={}"]
    return load_config(Experiment, path, [*overrides, *preset])


def refuse_moved_axes(data: dict, path: str | None) -> None:
    """A config a user writes names sweep axes as today's knobs: a moved one is refused with its new name."""
    for i, strategy in enumerate(data.get("strategies") or []):
        sweep = strategy.get("sweep") if isinstance(strategy, dict) else None
        for axis in sweep if isinstance(sweep, dict) else ():
            if upgrade_axis(axis) != axis:
                where = f"{path}: " if path is not None else ""
                raise UserError(f"{where}strategies[{i}].sweep.{axis}: moved to {upgrade_axis(axis)}; rename the axis")


def upgrade_experiment(data: dict, rename_axes: bool = False) -> dict:
    """An experiment config saved by an older version (a run directory's experiment.yaml), with every strategy's
    mitigations respelled as today's; it still resumes and reports. Sweep axes keep their saved names, which name
    the saved units (`unit_job` puts a moved knob's values where the knob lives today), unless `rename_axes`: the
    view that compares a saved experiment with today's spelling of it."""
    if not isinstance(data, dict):
        return data
    if "train" in data:
        data = dict(data, train=upgrade_train(data["train"]))
    if isinstance(data.get("stages"), list):
        stages = [
            dict(s, train=upgrade_train(s.get("train", {}))) if isinstance(s, dict) else s for s in data["stages"]
        ]
        data = dict(data, stages=stages)
    if not isinstance(data.get("strategies"), list):
        return data
    strategies = []
    for strategy in data["strategies"]:
        if isinstance(strategy, dict):
            strategy = dict(strategy, mitigations=upgrade_specs(strategy.get("mitigations", [])))
            if rename_axes and isinstance(strategy.get("sweep"), dict):
                strategy["sweep"] = {upgrade_axis(axis): values for axis, values in strategy["sweep"].items()}
        strategies.append(strategy)
    return dict(data, strategies=strategies)


def load_saved_experiment(path: Path) -> Experiment:
    """The experiment a run directory's experiment.yaml describes (older spellings upgraded)."""
    try:
        return from_dict(Experiment, upgrade_experiment(read_yaml(path)))
    except UserError as err:
        raise UserError(f"{path}: {err}") from None


def primary_metric(task: str, available: list[str], chosen: dict[str, str] | None = None) -> str | None:
    """The metric the reports and the gate compare for `task`: `chosen`, else the suite's own, else the first."""
    wanted = (chosen or {}).get(task) or PRIMARY_METRICS.get(task)
    if wanted in available:
        return wanted
    return available[0] if available else None
