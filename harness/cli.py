"""The `forgetting` command line.

    forgetting train CONFIG.yaml [key=value ...]   fine-tune (resumes if output_dir holds an unfinished run)
    forgetting config [CONFIG.yaml] [key=value ...] print the resolved config (validates it); --reference: all knobs
    forgetting data CONFIG.yaml [key=value ...]    data statistics and the first example with its loss mask
    forgetting plan CONFIG.yaml [--processes N] [key=value ...]   per-process memory under ddp and fsdp; what fits
    forgetting eval MODEL [--adapter DIR] [--tasks T1,T2] [--limit N]   lm-eval results JSON + table
    forgetting run EXPERIMENT.yaml [key=value ...] [--quick] [--unit ID] [--launcher local|ray|slurm]   base
                                                    eval, strategies x seeds, reports (resumes; --unit: one unit,
                                                    for schedulers; ray/slurm: each unit a Ray task/Slurm job)
    forgetting report RUN_DIR                       regenerate a run's tables, plots and reports
    forgetting status RUN_DIR                       each unit's state, where it runs, its step and last loss
    forgetting push RUN_DIR/units/ID [--repo NAME] [--private] [--dry-run]   upload a unit's final model (or
                                                    adapter) with its model card to the Hugging Face Hub
    forgetting gate CANDIDATE --baseline B [--max-drop T=0.02] [--junit F]   exit 0 pass, 1 regression, 2 usage,
                                                    3 runtime failure (no verdict)

Bad input exits 2 and runtime failures exit 1 (gate: 3), each with one line on stderr; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from forgetting.harness.errors import HarnessError

# the names of harness.launchers.LAUNCHERS (not imported here: it loads torch, which `--help` should not wait for)
LAUNCHERS = ("local", "ray", "slurm")
FLAGS = "--debug shows tracebacks. Overrides are dotted keys, e.g. train.lr=1e-5 data.format=chatml."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forgetting", description="Measure and mitigate forgetting in SFT.", epilog=FLAGS
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, help_text, config_required=True):
        sub = commands.add_parser(name, help=help_text, description=help_text, epilog=FLAGS)
        sub.add_argument("config", nargs=None if config_required else "?", help="YAML config file")
        sub.add_argument("overrides", nargs="*", help="key=value overrides")
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
        sub.set_defaults(command_name=name, takes_overrides=True)
        return sub

    add("train", "fine-tune a model (SFT) with optional mitigations; resumes an unfinished run")
    config = add("config", "print the resolved config, or every knob with --reference", False)
    config.add_argument("--reference", action="store_true", help="print every config key with its default and meaning")
    add("data", "show data statistics and the loss mask of the first example")
    plan = add(
        "plan",
        "estimate a training job's memory per process under ddp and fsdp (no weights loaded) and what fits",
    )
    plan.add_argument("--processes", type=int, default=1, help="processes the job will run on (default 1)")
    _add_run(add)
    _add_run_dir_commands(commands)
    _add_push(commands)
    _add_gate(commands)
    _add_eval(commands)
    return parser


def _add_run(add) -> None:
    run = add(
        "run",
        "run an experiment: evaluate the base, train and evaluate every strategy x seed, "
        "write the reports; a rerun resumes",
    )
    run.add_argument(
        "--unit",
        action="append",
        default=None,
        metavar="ID",
        help="run only this unit (repeatable; `base` is the base evaluation): the entry point a scheduler calls; "
        "the process that finishes the last unit writes the report",
    )
    run.add_argument(
        "--launcher",
        choices=LAUNCHERS,
        default="local",
        help="local (default): this process runs the units; ray: each unit a Ray task in its own process "
        "(RAY_ADDRESS: that cluster, else a local one); slurm: each unit a Slurm job through submitit, then a "
        "report job; both with the experiment's per-strategy resources",
    )
    run.add_argument("--ray-cpus", type=int, metavar="N", help="CPUs of the local Ray cluster (default: all)")
    run.add_argument(
        "--no-report",
        action="store_true",
        help="do not write the report even when the last unit finishes here (what the launchers' units run with)",
    )
    run.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 2 steps, 8 documents per task, the first seed, output_dir + '-quick'",
    )


def _add_run_dir_commands(commands) -> None:
    """The commands that take a run directory: report and status."""
    rep = commands.add_parser(
        "report",
        help="regenerate the reports of a run directory without retraining",
        description="Rebuild tables, plots and reports of RUN_DIR from its saved results.",
        epilog=FLAGS,
    )
    rep.add_argument("run_dir", help="the experiment's output_dir")
    rep.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
    rep.set_defaults(command_name="report", config=None, overrides=[])
    status = commands.add_parser(
        "status",
        help="each unit's state, where it runs, its step and last loss",
        description="Show RUN_DIR's units from their records: done, failed, running (host, pid, Slurm job), "
        "interrupted (its process died) or pending, with the step and the last loss.",
        epilog=FLAGS,
    )
    status.add_argument("run_dir", help="the experiment's output_dir")
    status.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
    status.set_defaults(command_name="status", config=None, overrides=[])


def _add_push(commands) -> None:
    push = commands.add_parser(
        "push",
        help="upload a unit's final model (or adapter) with its model card to the Hugging Face Hub",
        description="Upload RUN_DIR/units/ID's final model (or LoRA adapter) with its README.md model card "
        "(huggingface_hub: create_repo + upload_folder, with your token: `hf auth login` or HF_TOKEN). "
        "--dry-run prints the files, repo and revision and uploads nothing.",
        epilog=FLAGS,
    )
    push.add_argument("unit_dir", help="a unit of a run directory: RUN_DIR/units/ID")
    push.add_argument("--repo", help="NAME or OWNER/NAME (default: <experiment name>-<unit id> in your namespace)")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--dry-run", action="store_true", help="print the upload plan; upload nothing")
    push.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
    push.set_defaults(command_name="push", config=None, overrides=[])


def _add_gate(commands) -> None:
    gt = commands.add_parser(
        "gate",
        help="fail (exit 1) when a checkpoint forgot more than allowed vs a baseline",
        description="Evaluate CANDIDATE like BASELINE and compare per metric: a drop beyond the "
        "threshold that a paired test finds significant (Holm across metrics) is a "
        "regression. Exit codes: 0: pass; 1: regression or insufficient gain; "
        "2: usage or config error; 3: runtime failure (no verdict).",
        epilog=FLAGS,
    )
    gt.add_argument("candidate", help="checkpoint directory, LoRA adapter directory, hub id or embedded:...")
    gt.add_argument(
        "--baseline",
        required=True,
        help="results JSON (forgetting eval / base/eval.json / --output of a gate) or a model",
    )
    gt.add_argument("--adapter", help="PEFT adapter directory to apply on CANDIDATE")
    gt.add_argument(
        "--thresholds", help="YAML: default, metrics (task[/metric] -> max_drop/min_gain), test, alpha, compare"
    )
    gt.add_argument(
        "--max-drop",
        action="append",
        metavar="TASK[/METRIC]=X",
        help="allowed drop, absolute (0.02) or relative (5%%); repeatable",
    )
    gt.add_argument(
        "--min-gain", action="append", metavar="TASK[/METRIC]=X", help="required gain, e.g. forgetting_target=0.5"
    )
    gt.add_argument("--test", choices=["paired", "threshold"], help="paired (default): a drop must also be significant")
    gt.add_argument("--alpha", type=float, help="familywise significance level across metrics, Holm (default 0.05)")
    gt.add_argument("--tasks", help="tasks when BASELINE is a model (a results file brings its own)")
    gt.add_argument("--limit", type=int, help="documents per task when BASELINE is a model")
    gt.add_argument("--batch-size", type=int, help="lm-eval batch size when BASELINE is a model (refused with a file)")
    gt.add_argument("--output", help="write the candidate's results JSON here (the next baseline)")
    gt.add_argument("--markdown", help="write the verdict table as Markdown (for a PR comment)")
    gt.add_argument("--junit", help="write JUnit XML, one test case per metric")
    gt.add_argument("--overwrite", action="store_true", help="replace existing output files")
    gt.add_argument("--no-cache", action="store_true", help="ignore and do not write the result cache")
    gt.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
    gt.set_defaults(command_name="gate", config=None, overrides=[])


def _add_eval(commands) -> None:
    ev = commands.add_parser(
        "eval",
        help="evaluate a model or checkpoint with lm-eval (offline suite by default)",
        description="Evaluate MODEL (checkpoint dir, hub id, .gguf, embedded:...) with lm-eval.",
        epilog=FLAGS,
    )
    ev.add_argument("model", help="checkpoint directory, hub id, .gguf file or embedded:smollm2-135m-instruct")
    ev.add_argument("--adapter", help="PEFT adapter directory to apply on MODEL")
    ev.add_argument("--tasks", default="forgetting_suite", help="comma-separated lm-eval tasks/groups")
    ev.add_argument("--limit", type=int, help="only the first N documents per task")
    ev.add_argument("--batch-size", type=int, default=16, help="lm-eval batch size")
    ev.add_argument("--no-chat-template", action="store_true", help="do not wrap prompts in the chat template")
    ev.add_argument("--include-path", action="append", help="extra lm-eval task folder (repeatable)")
    ev.add_argument("--output", default="eval_results.json", help="results JSON to write")
    ev.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    ev.add_argument("--no-cache", action="store_true", help="ignore and do not write the result cache")
    ev.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
    ev.set_defaults(command_name="eval", config=None, overrides=[])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with key=value overrides and the config path anywhere after the command.

    argparse fills positionals only up to the first flag (`run EXP.yaml --quick output_dir=x` would be
    'unrecognized arguments') and its parse_intermixed_args refuses subcommands, so the words left over
    are collected here: the config is the first word that is not a key=value (an existing file wins).
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and (not getattr(args, "takes_overrides", False) or any(w.startswith("-") for w in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "takes_overrides", False):
        words = [w for w in [args.config] if w is not None] + args.overrides + extra
        args.config = next((w for w in words if "=" not in w or os.path.exists(w)), None)
        if args.config is not None:
            words.remove(args.config)  # its first occurrence: the one chosen
        args.overrides = words
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # deferred on purpose: the commands import torch, transformers, peft and lm-eval (~6 s), which `--help`
    # and a mistyped command line should not wait for
    try:
        from forgetting.harness import commands

        commands.quiet_libraries()
        return getattr(commands, f"cmd_{args.command_name}")(args)
    except HarnessError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:  # the system refused a read or write: disk full, permissions, ...
        if args.debug:
            raise
        where = f" ({err.filename})" if err.filename else ""
        print(f"error: {err.strerror or err}{where}; nothing was left half-written", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
