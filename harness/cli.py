"""The `forgetting` command line.

    forgetting train CONFIG.yaml [key=value ...]   fine-tune (resumes if output_dir holds an unfinished run)
    forgetting config [CONFIG.yaml] [key=value ...] print the resolved config (validates it); --reference: all knobs
    forgetting data CONFIG.yaml [key=value ...]    data statistics and the first example with its loss mask
    forgetting eval MODEL [--adapter DIR] [--tasks T1,T2] [--limit N]   lm-eval results JSON + table
    forgetting run EXPERIMENT.yaml [key=value ...] [--quick]   base eval, strategies x seeds, reports (resumes)
    forgetting report RUN_DIR                       regenerate a run's tables, plots and reports
    forgetting gate CANDIDATE --baseline B [--max-drop T=0.02] [--junit F]   exit 0 pass, 1 regression, 2 usage,
                                                    3 runtime failure (no verdict)

Bad input exits 2 and runtime failures exit 1 (gate: 3), each with one line on stderr; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from harness.errors import HarnessError

FLAGS = "--debug shows tracebacks. Overrides are dotted keys, e.g. train.lr=1e-5 data.format=chatml."


def _job(args):
    from harness.config import load_job

    return load_job(args.config, args.overrides)


def cmd_train(args) -> int:
    from harness.train import train

    job = _job(args)
    result = train(job)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained {result.steps} steps; final loss {result.last_loss:.4f}; "
              f"padding {result.padding_fraction:.1%}; saved to {result.final_dir}")
        if result.heldout_loss:
            h = result.heldout_loss
            print(f"held-out response loss ({h['split']}, {h['examples']} examples): "
                  f"{h['before']:.4f} before -> {h['after']:.4f} after")
    return 0


def cmd_config(args) -> int:
    import yaml

    from harness.configlib import to_dict

    if args.reference:
        print(reference())
        return 0
    print(yaml.safe_dump(to_dict(_job(args)), sort_keys=False), end="")
    return 0


def reference() -> str:
    """Every knob as Markdown tables: a training job, an experiment, a strategy, each registered mitigation."""
    from harness.config import TrainJob
    from harness.configlib import describe
    from harness.experiment import Experiment, Strategy
    from mitigations import registered

    def table(rows) -> list[str]:
        return ["| key | default | meaning |", "|---|---|---|"] + [
            f"| `{key}` | `{default}` | {help_text} |" for key, default, help_text in rows]

    job_sections = ("model.", "data.", "train.")
    lines = ["### A training job (`forgetting train`, `forgetting config`)", ""] + table(describe(TrainJob))
    lines += ["", "### An experiment (`forgetting run`)", "",
              "`model.*`, `data.*` and `train.*` as in a training job (shared by every strategy), and:", ""]
    lines += table(row for row in describe(Experiment) if not row[0].startswith(job_sections))
    lines += ["", "### A strategy (an item of an experiment's `strategies`)", ""] + table(describe(Strategy))
    lines += ["", "### Mitigations (an item of `mitigations`: `{name: NAME, KNOB: value}`; a sweep axis is "
              "`NAME.KNOB`)", ""]
    lines += table((f"{name}.{key}", default, help_text) for name, (config_cls, _) in sorted(registered().items())
                   for key, default, help_text in describe(config_cls))
    return "\n".join(lines)


def cmd_data(args) -> int:
    from harness.data import load_conversations, tokenize_all
    from harness.formats import IGNORE_INDEX, attach_format
    from harness.models import load_tokenizer

    job = _job(args)
    tokenizer = load_tokenizer(job.model)
    attach_format(tokenizer, job.data.format)
    examples, stats = tokenize_all(load_conversations(job.data), tokenizer, job.data)
    lengths = sorted(len(e) for e in examples)
    print(f"records {stats.records}, examples {stats.examples}, truncated {stats.truncated}, "
          f"dropped (response cut away) {stats.dropped_truncated}")
    print(f"tokens {stats.tokens} (response {stats.target_tokens}); length min {lengths[0]}, "
          f"median {lengths[len(lengths) // 2]}, max {lengths[-1]}")
    first = examples[0]
    shown = "".join(
        f"[{tokenizer.decode([t])}]" if label != IGNORE_INDEX else tokenizer.decode([t])
        for t, label in zip(first.input_ids, first.labels))
    print("first example ([bracketed] tokens are learned, the rest is masked):\n" + shown)
    return 0


def cmd_eval(args) -> int:
    from pathlib import Path

    from evals.runner import EvalSettings, evaluate, headline, load_for_eval, refuse_overwrite, save_results
    from harness.configlib import from_dict
    from harness.models import cache_root

    output = Path(args.output)
    refuse_overwrite(output, args.overwrite)  # before the (long) evaluation, not only when saving
    fields = {"tasks": [t for t in args.tasks.split(",") if t], "limit": args.limit,
              "batch_size": args.batch_size, "apply_chat_template": not args.no_chat_template,
              "include_path": args.include_path or []}
    settings = from_dict(EvalSettings, fields)
    model, tokenizer = load_for_eval(args.model, args.adapter)
    cache = None if args.no_cache else cache_root() / "eval"
    results = evaluate(model, tokenizer, settings, cache_dir=cache)
    results["forgetting"]["model"] = {"source": args.model, "adapter": args.adapter}
    save_results(results, output, overwrite=args.overwrite)
    print(f"{'task':<24} {'metric':<28} {'value':>9} {'stderr':>9}")
    for task, metric, value, stderr in headline(results):
        print(f"{task:<24} {metric:<28} {value:>9.4f} {stderr if stderr is not None else float('nan'):>9.4f}")
    print(f"results written to {output}")
    return 0


def cmd_run(args) -> int:
    from harness.experiment import load_experiment
    from harness.pipeline import run_experiment
    from reports import headline

    exp = load_experiment(args.config, args.overrides, quick=args.quick)
    run_dir = run_experiment(exp)
    print(headline(run_dir))
    print(f"reports: {run_dir / 'reports' / 'report.html'} (and forgetting.md, instruction_following.md); "
          f"tidy table: {run_dir / 'results.csv'}")
    return 0


def cmd_report(args) -> int:
    from pathlib import Path

    from reports import headline, write_reports

    run_dir = write_reports(Path(args.run_dir))
    print(headline(run_dir))
    print(f"reports written to {run_dir / 'reports'}")
    return 0


def cmd_gate(args) -> int:
    """Exit 0 pass, 1 regression, 2 usage (UserError), 3 any failure while running (1 would read as a verdict)."""
    from evals.gate import runtime_failure
    from harness.errors import UserError

    try:
        return _gate(args)
    except UserError:
        raise
    except Exception as err:
        if not args.debug:
            raise runtime_failure(err) from err
        import traceback

        traceback.print_exc()  # --debug: the traceback, and still exit 3
        print(f"error: {runtime_failure(err)}", file=sys.stderr)
        return 3


def _gate(args) -> int:
    import time
    from pathlib import Path

    from evals import gate
    from evals.runner import refuse_overwrite, save_results
    from harness.configlib import from_dict, read_yaml
    from harness.io import atomic_write_text
    from harness.models import cache_root

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
    overrides = {k: v for k, v in {"tasks": args.tasks and [t for t in args.tasks.split(",") if t],
                                   "limit": args.limit, "batch_size": args.batch_size}.items() if v is not None}
    checks, results = gate.run_gate(args.candidate, args.adapter, args.baseline, thresholds, overrides,
                                    None if args.no_cache else cache_root() / "eval")
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
    print(f"{len(checks) - len(failed)} of {len(checks)} checks passed" + (
        f"; failed: {', '.join(f'{c.task}/{c.metric}' for c in failed)}" if failed else ""))
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="forgetting", description="Measure and mitigate forgetting in SFT.",
                                     epilog=FLAGS)
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, func, help_text, config_required=True):
        sub = commands.add_parser(name, help=help_text, description=help_text, epilog=FLAGS)
        sub.add_argument("config", nargs=None if config_required else "?", help="YAML config file")
        sub.add_argument("overrides", nargs="*", help="key=value overrides")
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
        sub.set_defaults(func=func, takes_overrides=True)
        return sub

    add("train", cmd_train, "fine-tune a model (SFT) with optional mitigations; resumes an unfinished run")
    config = add("config", cmd_config, "print the resolved config, or every knob with --reference", False)
    config.add_argument("--reference", action="store_true", help="print every config key with its default and meaning")
    add("data", cmd_data, "show data statistics and the loss mask of the first example")
    run = add("run", cmd_run, "run an experiment: evaluate the base, train and evaluate every strategy x seed, "
                              "write the reports; a rerun resumes")
    run.add_argument("--quick", action="store_true",
                     help="smoke run: 2 steps, 8 documents per task, the first seed, output_dir + '-quick'")
    rep = commands.add_parser("report", help="regenerate the reports of a run directory without retraining",
                              description="Rebuild tables, plots and reports of RUN_DIR from its saved results.",
                              epilog=FLAGS)
    rep.add_argument("run_dir", help="the experiment's output_dir")
    rep.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
    rep.set_defaults(func=cmd_report, config=None, overrides=[])
    gt = commands.add_parser("gate", help="fail (exit 1) when a checkpoint forgot more than allowed vs a baseline",
                             description="Evaluate CANDIDATE like BASELINE and compare per metric: a drop beyond the "
                                         "threshold that a paired test finds significant (Holm across metrics) is a "
                                         "regression. Exit codes: 0: pass; 1: regression or insufficient gain; "
                                         "2: usage or config error; 3: runtime failure (no verdict).", epilog=FLAGS)
    gt.add_argument("candidate", help="checkpoint directory, LoRA adapter directory, hub id or embedded:...")
    gt.add_argument("--baseline", required=True, help="results JSON (forgetting eval / base/eval.json / --output of a gate) or a model")
    gt.add_argument("--adapter", help="PEFT adapter directory to apply on CANDIDATE")
    gt.add_argument("--thresholds", help="YAML: default, metrics (task[/metric] -> max_drop/min_gain), test, alpha, compare")
    gt.add_argument("--max-drop", action="append", metavar="TASK[/METRIC]=X",
                    help="allowed drop, absolute (0.02) or relative (5%%); repeatable")
    gt.add_argument("--min-gain", action="append", metavar="TASK[/METRIC]=X", help="required gain, e.g. forgetting_target=0.5")
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
    gt.set_defaults(func=cmd_gate, config=None, overrides=[])
    ev = commands.add_parser("eval", help="evaluate a model or checkpoint with lm-eval (offline suite by default)",
                             description="Evaluate MODEL (checkpoint dir, hub id, .gguf, embedded:...) with lm-eval.",
                             epilog=FLAGS)
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
    ev.set_defaults(func=cmd_eval, config=None, overrides=[])
    return parser


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
    _quiet_libraries()
    try:
        return args.func(args)
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


def _quiet_libraries() -> None:
    """Keep the console to our own progress bar and messages (warnings still go to stderr)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # per-task notices about custom datasets and defaults
    hf_logging.disable_progress_bar()


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
