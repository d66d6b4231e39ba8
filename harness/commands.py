"""What each `forgetting` command does, once `harness.cli` has parsed its line (`cmd_<name>(args) -> exit code`)."""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import yaml
from transformers.utils import logging as hf_logging

from forgetting.evals.runner import headline, refuse_overwrite, save_results
from forgetting.harness import api
from forgetting.harness.configlib import describe, from_dict, read_yaml, to_dict
from forgetting.harness.data import load_conversations, tokenize_all
from forgetting.harness.errors import HarnessError, RunError, UserError
from forgetting.harness.experiment import Experiment, Stage, Strategy, load_experiment
from forgetting.harness.formats import IGNORE_INDEX, attach_format
from forgetting.harness.hub import describe_plan, plan_push, push
from forgetting.harness.io import atomic_write_text, cache_root
from forgetting.harness.job import TrainJob, load_job
from forgetting.harness.launchers import LAUNCHERS, Launch
from forgetting.harness.models import load_tokenizer
from forgetting.harness.pipeline import EXPERIMENT_FILE, report_run, status_table
from forgetting.harness.plan import available_memory, estimate, render
from forgetting.harness.precision import compute_device_type
from forgetting.harness.train import train
from forgetting.mitigations import registered
from forgetting.reports import gate
from forgetting.reports.gate import runtime_failure
from forgetting.reports.writer import headline as run_headline


def _job(args):
    return load_job(args.config, args.overrides)


def cmd_train(args) -> int:
    job = _job(args)
    result = train(job)
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"trained {result.steps} steps; final loss {result.last_loss:.4f}; "
            f"padding {result.padding_fraction:.1%}; saved to {result.final_dir}"
        )
        if result.heldout_loss:
            h = result.heldout_loss
            print(
                f"held-out response loss ({h['split']}, {h['examples']} examples): "
                f"{h['before']:.4f} before -> {h['after']:.4f} after"
            )
    return 0


def cmd_config(args) -> int:
    if args.reference:
        print(reference())
        return 0
    print(yaml.safe_dump(to_dict(_job(args)), sort_keys=False), end="")
    return 0


def reference() -> str:
    """Every knob as Markdown tables: a training job, an experiment, a strategy, a stage, each mitigation."""

    def table(rows) -> list[str]:
        return ["| key | default | meaning |", "|---|---|---|"] + [
            f"| `{key}` | `{default}` | {help_text} |" for key, default, help_text in rows
        ]

    job_sections = ("model.", "data.", "train.")
    lines = ["### A training job (`forgetting train`, `forgetting config`)", ""] + table(describe(TrainJob))
    lines += [
        "",
        "### An experiment (`forgetting run`)",
        "",
        "`model.*`, `data.*` and `train.*` as in a training job (shared by every strategy), and:",
        "",
    ]
    lines += table(row for row in describe(Experiment) if not row[0].startswith(job_sections))
    lines += ["", "### A strategy (an item of an experiment's `strategies`)", ""] + table(describe(Strategy))
    lines += ["", "### A stage (an item of an experiment's `stages`: continual SFT)", ""] + table(describe(Stage))
    lines += [
        "",
        "### Mitigations (an item of `mitigations`: `{name: NAME, KNOB: value}`; a sweep axis is `NAME.KNOB`)",
        "",
    ]
    lines += table(
        (f"{name}.{key}", default, help_text)
        for name, (config_cls, _) in sorted(registered().items())
        for key, default, help_text in describe(config_cls)
    )
    return "\n".join(lines)


def cmd_data(args) -> int:
    job = _job(args)
    tokenizer = load_tokenizer(job.model)
    attach_format(tokenizer, job.data.format)
    examples, stats = tokenize_all(load_conversations(job.data), tokenizer, job.data)
    lengths = sorted(len(e) for e in examples)
    print(
        f"records {stats.records}, examples {stats.examples}, truncated {stats.truncated}, "
        f"dropped (response cut away) {stats.dropped_truncated}"
    )
    print(
        f"tokens {stats.tokens} (response {stats.target_tokens}); length min {lengths[0]}, "
        f"median {lengths[len(lengths) // 2]}, max {lengths[-1]}"
    )
    first = examples[0]
    shown = "".join(
        f"[{tokenizer.decode([t])}]" if label != IGNORE_INDEX else tokenizer.decode([t])
        for t, label in zip(first.input_ids, first.labels)
    )
    print("first example ([bracketed] tokens are learned, the rest is masked):\n" + shown)
    return 0


def cmd_plan(args) -> int:
    """The memory table of a training job on `--processes` processes of this machine's device."""
    job = _job(args)
    if args.processes < 1:
        raise UserError(f"--processes: must be at least 1, got {args.processes}")
    tokenizer = load_tokenizer(job.model)
    attach_format(tokenizer, job.data.format)
    examples, _ = tokenize_all(load_conversations(job.data), tokenizer, job.data)
    device_type = compute_device_type()
    plan = estimate(job, args.processes, examples, device_type)
    device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else device_type
    print(render(plan, *available_memory(device, args.processes)))
    return 0


def cmd_eval(args) -> int:
    output = Path(args.output)
    refuse_overwrite(output, args.overwrite)  # before the (long) evaluation, not only when saving
    fields = {
        "tasks": [t for t in args.tasks.split(",") if t],
        "limit": args.limit,
        "batch_size": args.batch_size,
        "apply_chat_template": not args.no_chat_template,
        "include_path": args.include_path or [],
    }
    results = api.evaluate(args.model, adapter=args.adapter, settings=fields, cache=not args.no_cache)
    save_results(results, output, overwrite=args.overwrite)
    print(f"{'task':<24} {'metric':<28} {'value':>9} {'stderr':>9}")
    for task, metric, value, stderr in headline(results):
        print(f"{task:<24} {metric:<28} {value:>9.4f} {stderr if stderr is not None else float('nan'):>9.4f}")
    print(f"results written to {output}")
    return 0


def cmd_run(args) -> int:
    if args.ray_cpus is not None and args.launcher != "ray":
        raise UserError("--ray-cpus: only with --launcher ray")
    if args.no_report and args.launcher != "local":
        raise UserError(f"--no-report: only with --launcher local (the {args.launcher} launcher writes the report)")
    exp = load_experiment(args.config, args.overrides, quick=args.quick)
    only = tuple(args.unit) if args.unit is not None else None
    launch = Launch(args.config, tuple(args.overrides), args.quick, only, args.ray_cpus, report=not args.no_report)
    run_dir, code = LAUNCHERS[args.launcher](exp, launch)
    if run_dir is None:  # other processes still work on units of this run; the last of them writes the report
        return code
    print(run_headline(run_dir))
    print(
        f"reports: {run_dir / 'reports' / 'report.html'} (and forgetting.md, instruction_following.md); "
        f"tidy table: {run_dir / 'results.csv'}"
    )
    return code


def cmd_report(args) -> int:
    run_dir = report_run(Path(args.run_dir))
    print(run_headline(run_dir))
    print(f"reports written to {run_dir / 'reports'}")
    return 0


def cmd_status(args) -> int:
    run_dir = Path(args.run_dir)
    if not (run_dir / EXPERIMENT_FILE).is_file():
        raise UserError(f"{run_dir}: not a run directory (no {EXPERIMENT_FILE})")
    print(status_table(run_dir))
    return 0


def cmd_push(args) -> int:
    """Upload a unit's final model with its card, or (--dry-run) print what would be uploaded."""
    plan = plan_push(Path(args.unit_dir), args.repo, args.private)
    print(("upload plan (dry run: nothing uploaded)\n" if args.dry_run else "") + describe_plan(plan), flush=True)
    if args.dry_run:
        return 0
    try:
        url = push(plan)
    except Exception as err:  # no token, no network, a refused name: one line, exit 1 (not a usage error)
        if args.debug:
            raise
        raise RunError(
            f"push to {plan.repo_id} failed: {str(err).strip().splitlines()[0] if str(err) else err!r}"
        ) from err
    print(f"pushed: {url}")
    return 0


def cmd_gate(args) -> int:
    """Exit 0 pass, 1 regression, 2 usage (UserError), 3 any failure while running (1 would read as a verdict)."""
    try:
        return _gate(args)
    except UserError:
        raise
    except Exception as err:
        if not args.debug:
            raise runtime_failure(err) from err
        traceback.print_exc()  # --debug: the traceback, and still exit 3
        print(f"error: {runtime_failure(err)}", file=sys.stderr)
        return 3


def _gate(args) -> int:
    started = time.perf_counter()
    outputs = [Path(p) for p in (args.output, args.markdown, args.junit) if p]
    for path in outputs:
        refuse_overwrite(path, args.overwrite)
    data = read_yaml(args.thresholds) if args.thresholds else {}
    flags = gate.cli_thresholds(args.max_drop or [], args.min_gain or [], args.test, args.alpha)
    data = dict(data) | {k: v for k, v in flags.items() if k != "metrics"}
    data["metrics"] = {**data.get("metrics", {}), **flags["metrics"]}
    try:
        thresholds = from_dict(gate.Thresholds, data)
    except HarnessError as err:
        raise type(err)(f"{args.thresholds or 'thresholds'}: {err}") from None
    overrides = {
        k: v
        for k, v in {
            "tasks": args.tasks and [t for t in args.tasks.split(",") if t],
            "limit": args.limit,
            "batch_size": args.batch_size,
        }.items()
        if v is not None
    }
    checks, results = gate.run_gate(
        args.candidate,
        args.adapter,
        args.baseline,
        thresholds,
        overrides,
        None if args.no_cache else cache_root() / "eval",
    )
    title = f"forgetting gate: {args.candidate} vs {args.baseline}"
    table = gate.markdown(checks, title)
    print(table, end="")
    if args.output:
        save_results(results, Path(args.output), overwrite=args.overwrite)
    if args.markdown:
        atomic_write_text(args.markdown, table)
    if args.junit:
        atomic_write_text(args.junit, gate.junit_xml(checks, title, time.perf_counter() - started))
    failed = [c for c in checks if c.status != "pass"]
    print(
        f"{len(checks) - len(failed)} of {len(checks)} checks passed"
        + (f"; failed: {', '.join(f'{c.task}/{c.metric}' for c in failed)}" if failed else "")
    )
    return 1 if failed else 0


def quiet_libraries() -> None:
    """Keep the console to our own progress bar and messages (warnings still go to stderr)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    hf_logging.set_verbosity_error()
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # per-task notices about custom datasets and defaults
    hf_logging.disable_progress_bar()
