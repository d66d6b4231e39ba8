"""Evaluate a model with lm-eval: in memory or from a checkpoint, with a cache keyed by the model's weights.

    results = evaluate(model, tokenizer, EvalSettings(tasks=["forgetting_suite"]), cache_dir=...)

The same code path serves a base model, a fully fine-tuned model, a base + PEFT adapter, and a saved
checkpoint (`load_for_eval`). Each leaf task's result is cached under a key made of everything that changes a
score: the weights fingerprint (PEFT adapter configs included), the task's config, documents and files (its
YAML, the Python beside it and the project modules that imports), the evaluation settings, the tokenizer and
chat template, the dtype, attention implementation and device, the IFEval NLTK data and the versions of
torch, transformers, lm-eval, peft and nltk. lm-eval's own `use_cache` is not used: its keys ignore the
model weights.

A model loaded by `load_for_eval` from safetensors files carries the fingerprint of those files
(`harness.models.files_fingerprint`: streamed from disk several tensors at a time, never copied off the GPU nor
gathered from shards, as hashing the loaded tensors does); it stands for the model while its tensors are the
loaded ones, unchanged in place. The cache may be shared by many
processes and machines: entries are written atomically (staged, then renamed), and an entry that cannot be
read (truncated, corrupt, another shape) is a miss, which the evaluation's result replaces.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import inspect
import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional, Union
from unittest import mock

import lm_eval
import lm_eval.evaluator
import torch
import yaml
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from peft import PeftModel
from transformers import AutoTokenizer

from forgetting.evals.nltk_offline import ensure_punkt_tab, punkt_tab_hash
from forgetting.harness.config import ModelConfig
from forgetting.harness.configlib import knob
from forgetting.harness.errors import UserError
from forgetting.harness.io import atomic_write_json
from forgetting.harness.models import (
    files_fingerprint,
    has_safetensors,
    load_model,
    load_tokenizer,
    source_directory,
    weights_fingerprint,
)

TASKS_DIR = Path(__file__).parent / "tasks"
HUB_TASKS_DIR = Path(__file__).parent / "hub_tasks"  # groups of lm-eval's own tasks, indexed only beside them
PROJECT_ROOT = Path(__file__).parent.parent  # the `forgetting` package: its `evals` and `harness` subpackages
PROJECT_PACKAGES = ("evals", "harness")
VERSIONED = ("torch", "transformers", "lm_eval", "peft", "nltk")  # packages whose code computes a score
SUITE = [
    "forgetting_knowledge",
    "forgetting_ifeval",
    "forgetting_target",
    "forgetting_prose",
    "forgetting_format_health",
]


@dataclass
class EvalSettings:
    tasks: list[str] = knob(["forgetting_suite"], "lm-eval task or group names (the offline suite by default)")
    limit: Optional[int] = knob(None, "evaluate only the first N documents of each task")
    subsample: dict[str, int] = knob(
        {}, "per task: evaluate N documents spread evenly over it (every category stays represented)"
    )
    batch_size: int = knob(16, "lm-eval batch size (set on HFLM: simple_evaluate ignores it for model objects)")
    max_length: int = knob(2048, "context length for lm-eval (tokens)")
    apply_chat_template: bool = knob(True, "wrap prompts in the model's chat template (the training format)")
    system_instruction: Optional[str] = knob(None, "system message for chat-formatted prompts")
    num_fewshot: Optional[int] = knob(None, "few-shot examples (null: each task's default)")
    fewshot_as_multiturn: bool = knob(False, "present few-shot examples as chat turns")
    include_path: list[str] = knob([], "extra lm-eval task folders (Python hooks in them run: only your own)")
    bootstrap_iters: int = knob(1000, "bootstrap resamples for the stderr of non-mean metrics")
    seed: int = knob(1234, "lm-eval random seed (sampling, few-shot order)")
    every: Optional[Union[int, list[int]]] = knob(
        None,
        "forgetting curves: also evaluate each unit during its training, every N optimizer steps or at the listed "
        "steps, and always before the first step (0) and after the last; null: only after training",
    )
    curve_subsample: dict[str, int] = knob(
        {},
        "per task: documents evaluated at the curve's steps, spread evenly (tasks not listed: the final "
        "evaluation's documents, so the last point equals it)",
    )

    def __post_init__(self):
        if not self.tasks:
            raise ValueError("tasks: at least one task is needed")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit: must be at least 1, got {self.limit}")
        for name, counts in (("subsample", self.subsample), ("curve_subsample", self.curve_subsample)):
            for task, n in counts.items():
                if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                    raise ValueError(f"{name}.{task}: expected a number of documents >= 1, got {n!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be at least 1, got {self.batch_size}")
        listed = self.every if isinstance(self.every, list) else [self.every] if self.every is not None else []
        if not all(step >= 1 for step in listed):
            raise ValueError(f"every: expected steps >= 1 (a number N or a list of steps), got {self.every!r}")
        if isinstance(self.every, list) and (not listed or len(set(listed)) != len(listed)):
            raise ValueError(f"every: expected a number N or a non-empty list of distinct steps, got {self.every!r}")

    def curve_steps(self, total: int) -> list[int]:
        """The steps a run of `total` optimizer steps is evaluated at for its curve: 0 (before training), every
        N-th or the listed ones up to `total`, and `total`; [] without `every`. (A listed step past
        train.max_steps is refused when the experiment loads; an epoch-based run learns its `total` only here.)"""
        if self.every is None:
            return []
        listed = self.every if isinstance(self.every, list) else range(self.every, total + 1, self.every)
        return sorted({0, *(step for step in listed if step <= total), total})

    def for_curve(self) -> EvalSettings:
        """The settings of a curve point: the final evaluation's, with `curve_subsample` over `subsample`."""
        return replace(self, subsample=self.subsample | self.curve_subsample, every=None, curve_subsample={})


def _hash_files(paths: list[Path]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for path in paths:
        digest.update(f"{path.name}|".encode() + path.read_bytes())
    return digest.hexdigest()


def task_manager(settings: EvalSettings):
    for path in settings.include_path:
        if not Path(path).is_dir():
            raise UserError(f"include_path: {path} is not a folder")
    paths = [str(TASKS_DIR), *settings.include_path]
    own = TaskManager(include_path=paths, include_defaults=False)  # indexing lm-eval's own tasks takes ~6 s
    if all(name in own.all_tasks for name in settings.tasks):
        return own
    return TaskManager(include_path=[*paths, str(HUB_TASKS_DIR)])


def leaf_tasks(manager, names: list[str]) -> dict[str, Any]:
    """Task objects by name, groups expanded into their tasks."""
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise UserError(
            f"tasks: unknown task {unknown[0]!r} (lm-eval knows {len(manager.all_tasks)} names; "
            f"the offline suite is forgetting_suite = {', '.join(SUITE)})"
        )
    leaves: dict[str, Any] = {}

    def walk(node):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value)
            else:
                leaves[key] = value

    walk(manager.load_task_or_group(names))
    return leaves


def _docs_hash(task) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for doc in task.eval_docs:
        digest.update(json.dumps(doc, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def task_files(manager, name: str, task) -> list[Path]:
    """The files that define a task: its YAML, the Python files beside it (its `!function` hooks) and the
    modules of this project that those import (e.g. the target task's scorer in harness/builtin_task.py)."""
    yaml_path = manager.task_index[name].yaml_path if name in manager.task_index else None
    if yaml_path is None:  # a Python task class
        return [Path(inspect.getfile(type(task)))]
    hooks = sorted(Path(yaml_path).parent.glob("*.py"))
    return [Path(yaml_path), *hooks, *_project_imports(hooks)]


def _project_imports(files: list[Path]) -> list[Path]:
    """Source files of the `evals` / `harness` modules that `files` import directly."""
    found = set()
    for file in files:
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            elif isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            else:
                continue
            for module in modules:
                parts = module.split(".")  # forgetting.<package>.<module>
                path = PROJECT_ROOT.joinpath(*parts[1:]).with_suffix(".py")
                if parts[0] == "forgetting" and parts[1:2] and parts[1] in PROJECT_PACKAGES and path.is_file():
                    found.add(path)
    return sorted(found)


def tokenizer_hash(tokenizer) -> str:
    """BLAKE2 of the tokenizer's vocabulary, merges, normalizer, pre/post-processing and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()  # its JSON starts with the truncation and padding transformers sets per call
        text = text[max(text.find('"added_tokens"'), 0) :]
    else:
        text = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    extra = json.dumps(
        [
            type(tokenizer).__name__,
            tokenizer.special_tokens_map,
            getattr(tokenizer, "clean_up_tokenization_spaces", None),
        ],
        sort_keys=True,
        default=str,
    )
    return hashlib.blake2b((text + extra).encode(), digest_size=16).hexdigest()


def eval_context(model, tokenizer, settings: EvalSettings) -> dict:
    """What besides the weights and the task changes a score: how prompts become tokens, the numerics, the code."""
    parameter = next(model.parameters())
    device = parameter.device
    return {
        "tokenizer": tokenizer_hash(tokenizer),
        "chat_template": getattr(tokenizer, "chat_template", None) if settings.apply_chat_template else None,
        "dtype": str(getattr(model, "dtype", parameter.dtype)),
        "attention": getattr(getattr(model, "config", None), "_attn_implementation", None),
        "device": [device.type, torch.cuda.get_device_name(device) if device.type == "cuda" else None],
        "versions": {name: importlib.metadata.version(name) for name in VERSIONED},
        "nltk_data": punkt_tab_hash(),
    }


# settings that do not change a task's score (its documents count through `subsample`, by task); the curve's
# knobs are left out so that adding them changed no existing key
NOT_IN_KEY = ("tasks", "include_path", "subsample", "every", "curve_subsample")


def cache_key(fingerprint: str, task, settings: EvalSettings, context: dict, files: list[Path]) -> str:
    config = task.config.to_dict() if hasattr(task.config, "to_dict") else asdict(task.config)
    config = dict(config, metadata={k: v for k, v in (config.get("metadata") or {}).items() if k != "config_source"})
    parts = {
        "weights": fingerprint,
        "task": task.config.task,
        "version": task.VERSION,
        "config": json.dumps(config, sort_keys=True, default=str),
        "docs": _docs_hash(task),
        "files": _hash_files(files),  # by content: the same tasks in another checkout keep their key
        "settings": {k: v for k, v in asdict(settings).items() if k not in NOT_IN_KEY},
        "subsample": settings.subsample.get(task.config.task),
        "context": context,
    }
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=20).hexdigest()


def cache_keys(model, tokenizer, settings: EvalSettings, manager, leaves: dict, fingerprint: str) -> dict[str, str]:
    """The cache key of each leaf task's result for this model, tokenizer and settings."""
    context = eval_context(model, tokenizer, settings)
    return {
        name: cache_key(fingerprint, task, settings, context, task_files(manager, name, task))
        for name, task in leaves.items()
    }


SLICES = ("results", "configs", "versions", "n-samples", "higher_is_better", "samples")
LOADED_FROM = "_forgetting_files_fingerprint"  # the model attribute `load_for_eval` sets


def _slice(results: dict, name: str) -> dict:
    return {key: {name: results[key][name]} for key in SLICES if name in results.get(key, {})}


def _merge(parts: list[dict]) -> dict:
    merged: dict[str, dict] = {key: {} for key in SLICES}
    for part in parts:
        for key, value in part.items():
            merged[key].update(value)
    return merged


def run_lm_eval(model, tokenizer, settings: EvalSettings, tasks: list, manager: TaskManager) -> dict:
    """lm-eval's simple_evaluate on an in-memory model for the given Task objects (made by `manager`; without it,
    simple_evaluate would index all of lm-eval's own tasks again, seconds per call)."""
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size, max_length=settings.max_length)
    samples = None
    if settings.subsample:  # lm-eval takes either a limit or explicit document indices, not both
        samples = {
            task.config.task: document_indices(
                len(task.eval_docs), settings.subsample.get(task.config.task), settings.limit
            )
            for task in tasks
        }
    with _without_environment_record():
        output = simple_evaluate(
            model=lm,
            tasks=tasks,
            task_manager=manager,
            limit=None if samples else settings.limit,
            samples=samples,
            num_fewshot=settings.num_fewshot,
            log_samples=True,
            apply_chat_template=settings.apply_chat_template,
            system_instruction=settings.system_instruction,
            fewshot_as_multiturn=settings.fewshot_as_multiturn,
            bootstrap_iters=settings.bootstrap_iters,
            random_seed=settings.seed,
            numpy_random_seed=settings.seed,
            torch_random_seed=settings.seed,
            fewshot_random_seed=settings.seed,
        )
    return output


@contextmanager
def _without_environment_record():
    """Skip lm-eval's git hash and environment record, which `_slice` drops anyway: its `git describe` prints
    "fatal: not a git repository" outside a checkout, and torch's collect_env takes about a second."""
    with (
        mock.patch.object(lm_eval.evaluator, "get_git_commit_hash", lambda: None),
        mock.patch.object(lm_eval.evaluator, "add_env_info", lambda storage: None),
    ):
        yield


def document_indices(total: int, subsample: int | None, limit: int | None) -> list[int]:
    """Sorted indices of the documents to evaluate: `subsample` spread evenly, else the first `limit`, else all."""
    if subsample is not None and subsample < total:
        return sorted({(i * total) // subsample for i in range(subsample)})
    return list(range(min(total, limit) if limit is not None else total))


def evaluate(model, tokenizer, settings: EvalSettings, cache_dir: Path | None = None) -> dict:
    """Results of every requested task (lm-eval's layout) plus `forgetting` metadata; cached per task."""
    ensure_punkt_tab()  # before lm-eval imports its ifeval checkers
    manager = task_manager(settings)
    leaves = leaf_tasks(manager, settings.tasks)
    fingerprint = model_fingerprint(model)
    keys = cache_keys(model, tokenizer, settings, manager, leaves, fingerprint)
    parts, missing, hits = [], [], []
    for name in leaves:
        entry = read_cache_entry(cache_dir / f"{keys[name]}.json", name) if cache_dir else None
        if entry is None:
            missing.append(name)
        else:
            parts.append(entry)
            hits.append(name)
    if missing:
        was_training = model.training
        model.eval()
        output = run_lm_eval(model, tokenizer, settings, [leaves[name] for name in missing], manager)
        model.train(was_training)
        for name in missing:
            part = _slice(output, name)
            parts.append(part)
            if cache_dir is not None:  # staged and renamed: concurrent writers of a key leave one whole entry
                atomic_write_json(cache_dir / f"{keys[name]}.json", part)
    results = _merge(parts)
    results["forgetting"] = {
        "by_category": by_category(results),
        "weights_fingerprint": fingerprint,
        "settings": asdict(settings),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "format": getattr(tokenizer, "init_kwargs", {}).get("forgetting_format")
        or ("chat_template" if getattr(tokenizer, "chat_template", None) else None),
        "cache_hits": hits,
        "evaluated": missing,
        "lm_eval_version": _lm_eval_version(),
    }
    return results


def read_cache_entry(path: Path, name: str) -> dict | None:
    """The cached result of task `name` at `path`, or None: no entry, or one that cannot be used (truncated,
    corrupt, not of `_slice`'s shape for this task), which is a miss that the evaluation's result replaces."""
    try:
        entry = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as err:  # JSON and UTF-8 decoding errors are ValueErrors
        print(f"eval cache: {path} is unreadable ({type(err).__name__}); evaluating {name} again", flush=True)
        return None
    results = entry.get("results") if isinstance(entry, dict) else None
    if not (
        isinstance(results, dict)
        and isinstance(results.get(name), dict)
        and all(key in SLICES and isinstance(value, dict) and set(value) == {name} for key, value in entry.items())
    ):
        print(f"eval cache: {path} is not a result of {name}; evaluating it again", flush=True)
        return None
    return entry


def _tensors_token(model) -> str:
    """Which tensors a model holds and whether any changed in place since: each one's name, address, dtype,
    device and version counter (which in-place operations on it raise)."""
    parts = [(n, t.data_ptr(), t._version, str(t.dtype), str(t.device)) for n, t in model.state_dict().items()]
    return hashlib.blake2b(repr(parts).encode(), digest_size=16).hexdigest()


def remember_files_fingerprint(model, fingerprint: str) -> None:
    """Let `model_fingerprint` use `fingerprint` (of the files `model` was loaded from) while the tensors are
    these ones, unchanged in place."""
    setattr(model, LOADED_FROM, (fingerprint, _tensors_token(model)))


def model_fingerprint(model) -> str:
    """The cache's fingerprint of a model's weights: that of the files it was loaded from, when `load_for_eval`
    loaded it from safetensors and its tensors are still those it loaded; else the hash of its tensors."""
    remembered = getattr(model, LOADED_FROM, None)
    if remembered is not None and remembered[1] == _tensors_token(model):
        return remembered[0]
    return weights_fingerprint(model)


def by_category(results: dict) -> dict:
    """Per task whose documents carry a `category`: each per-example metric's mean by category."""
    out: dict[str, dict] = {}
    for task, samples in results.get("samples", {}).items():
        if not samples or "category" not in samples[0].get("doc", {}):
            continue
        metrics = [metric for metric, _, _ in metric_entries(results["results"].get(task, {}))]
        groups: dict[str, list[dict]] = {}
        for sample in samples:
            groups.setdefault(sample["doc"]["category"], []).append(sample)
        out[task] = {
            category: {m: sum(float(s[m]) for s in group) / len(group) for m in metrics if m in group[0]}
            | {"n": len(group)}
            for category, group in sorted(groups.items())
        }
    return out


def _lm_eval_version() -> str:
    return lm_eval.__version__


def load_for_eval(source: str, adapter: str | None = None, model_config=None):
    """(model, tokenizer) for a checkpoint directory, hub id, GGUF or embedded name, optionally + a PEFT adapter.
    Loaded from safetensors files (a directory, the converted GGUF, the hub cache), the model carries their
    `files_fingerprint` for `evaluate`'s cache key (`model_fingerprint`)."""
    folder = Path(source)
    if adapter is None and (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        source, adapter = adapter_base(folder), source  # a LoRA checkpoint: evaluate it on its own base
    config = model_config or ModelConfig(name_or_path=source)
    tokenizer = load_tokenizer(config)
    model = load_model(config, for_training=False)
    if adapter is not None:
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise UserError(f"--adapter: {adapter} has no adapter_config.json (not a PEFT adapter directory)")
        try:
            model = PeftModel.from_pretrained(model, adapter)
        except (RuntimeError, ValueError) as err:
            raise UserError(f"--adapter: {adapter} does not fit {source}: {str(err).splitlines()[0]}") from None
        if (Path(adapter) / "tokenizer_config.json").is_file():  # trained here: carries the training format
            tokenizer = AutoTokenizer.from_pretrained(adapter)
    model.to(eval_device())  # lm-eval runs a model object where it lies
    model.eval()
    directory = source_directory(config)
    if directory is not None and has_safetensors(directory) and (adapter is None or has_safetensors(adapter, True)):
        remember_files_fingerprint(model, files_fingerprint(directory, adapter))
    return model, tokenizer


def eval_device() -> torch.device:
    """Where evaluations run: the first CUDA GPU when there is one, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def adapter_base(folder: Path) -> str:
    """The base model of a PEFT adapter directory: from its saved training config, else from adapter_config.json."""
    config_file = folder / "forgetting_config.yaml"
    if config_file.is_file():
        return yaml.safe_load(config_file.read_text())["model"]["name_or_path"]
    return json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]


def metric_entries(task_results: dict) -> list[tuple[str, float, float | None]]:
    """(metric, value, stderr) for each numeric `metric,filter` key of one task's lm-eval results (the one place
    those keys are parsed; the `_stderr` keys are read as the stderr of their metric, not as metrics)."""
    entries = []
    for key, value in task_results.items():
        if "," not in key or "_stderr" in key or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        metric, filt = key.split(",", 1)
        stderr = task_results.get(f"{metric}_stderr,{filt}")
        entries.append((metric, float(value), float(stderr) if isinstance(stderr, (int, float)) else None))
    return entries


def headline(results: dict) -> list[tuple[str, str, float, float | None]]:
    """(task, metric, value, stderr) rows for printing."""
    return [
        (task, *entry)
        for task, metrics in sorted(results.get("results", {}).items())
        for entry in metric_entries(metrics)
    ]


def refuse_overwrite(path: Path, overwrite: bool) -> None:
    """A results file is never replaced silently."""
    if path.exists() and not overwrite:
        raise UserError(f"{path}: exists; pass --overwrite to replace it or choose another --output")


def save_results(results: dict, path: Path, overwrite: bool = False) -> None:
    """Write results JSON atomically; refuse to replace an existing file unless asked."""
    refuse_overwrite(path, overwrite)
    atomic_write_json(path, results)
