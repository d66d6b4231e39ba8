"""`forgetting push RUN_DIR/units/ID`: a unit's final model (or LoRA adapter) with its model card, to the Hub.

    forgetting push runs/experiment/units/naive__seed0 [--repo NAME] [--private] [--dry-run]

The upload is planned first (`plan_push`: which files of final/, which repo, which revision) and the plan is
what is uploaded (`push`: huggingface_hub's create_repo + upload_folder with exactly those files), so
`--dry-run` shows what a push would send. Only final/'s own files go: the models exported inside it (WiSE-FT
points, a merged LoRA) are models of their own. A model without its card (trained before cards existed) gets
one written first. The default repo name is the experiment's name and the unit id, in the token's namespace.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from huggingface_hub import HfApi
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from forgetting.harness.card import CARD_NAME, RunContext, write_cards
from forgetting.harness.errors import UserError

REVISION = "main"


@dataclass
class UploadPlan:
    repo_id: str  # NAME (the token's namespace) or OWNER/NAME
    folder: Path  # the unit's final/
    files: list[str]  # names inside `folder`, all of them uploaded
    private: bool
    revision: str = REVISION


def final_dir(unit_dir: Path) -> Path:
    """The unit's final model directory: units/<id>/train/final, or the last stage's for continual SFT."""
    if unit_dir.parent.name != "units" or not (unit_dir.parent.parent / "experiment.yaml").is_file():
        raise UserError(f"{unit_dir}: not a unit directory (expected RUN_DIR/units/ID of a `forgetting run`)")
    stages = sorted(unit_dir.glob("stages/*/train/final"), key=lambda p: int(p.parent.parent.name.split("_")[0]))
    final = stages[-1] if stages else unit_dir / "train" / "final"
    if not final.is_dir():
        raise UserError(f"{unit_dir}: no final model ({final} does not exist: the unit has not finished training)")
    if not any(final.glob("*.safetensors")):
        raise UserError(f"{final}: no weights (deleted after evaluation with keep_models: false?); nothing to push")
    return final


def default_repo(unit_dir: Path) -> str:
    """<experiment name>-<unit id>, spelled as the Hub allows (letters, digits, - _ .; no -- or ..; 96 at most)."""
    experiment = (yaml.safe_load((unit_dir.parent.parent / "experiment.yaml").read_text()) or {}).get("name", "run")
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{experiment}-{unit_dir.name}")
    name = re.sub(r"-{2,}", "-", re.sub(r"\.{2,}", ".", name))
    return name[:96].strip("-.") or "model"


def plan_push(unit_dir: Path, repo: str | None = None, private: bool = False) -> UploadPlan:
    """What `push` would upload; writes final/README.md first when the model has no card yet."""
    unit_dir = Path(unit_dir)
    final = final_dir(unit_dir)
    repo_id = repo or default_repo(unit_dir)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise UserError(f"--repo {repo_id!r}: not a valid Hub repo id ({str(err).splitlines()[0]})") from None
    if not (final / CARD_NAME).is_file():
        experiment = (yaml.safe_load((unit_dir.parent.parent / "experiment.yaml").read_text()) or {}).get("name")
        write_cards(final, RunContext(unit_dir.parent.parent, unit_dir.name, experiment or "run"))
    files = sorted(p.name for p in final.iterdir() if p.is_file())
    return UploadPlan(repo_id, final, files, private)


def describe_plan(plan: UploadPlan) -> str:
    """The plan, one file a line, as `--dry-run` prints it."""
    where = "" if "/" in plan.repo_id else " (in the namespace of your Hugging Face token)"
    lines = [
        f"repo:     {plan.repo_id}{where}, model, {'private' if plan.private else 'public'}",
        f"revision: {plan.revision}",
        f"from:     {plan.folder}",
        f"files:    {len(plan.files)}",
    ]
    lines += [f"  {name:<36} {_size((plan.folder / name).stat().st_size):>9}" for name in plan.files]
    return "\n".join(lines)


def push(plan: UploadPlan, api: HfApi | None = None) -> str:
    """Create the repo (if needed) and upload the plan's files in one commit; the commit's URL."""
    api = api or HfApi()
    repo = api.create_repo(plan.repo_id, repo_type="model", private=plan.private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo.repo_id,
        folder_path=plan.folder,
        repo_type="model",
        revision=plan.revision,
        allow_patterns=plan.files,
        commit_message=f"forgetting push: {plan.folder}",
    )
    return str(getattr(commit, "commit_url", commit))


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"
