"""The `forgetting` command line.

    forgetting train CONFIG.yaml [key=value ...]   fine-tune (resumes if output_dir holds an unfinished run)
    forgetting config [CONFIG.yaml] [key=value ...] print the resolved config (validates it); --reference: all knobs
    forgetting data CONFIG.yaml [key=value ...]    data statistics and the first example with its loss mask

Bad input exits 2 and runtime failures exit 1, each with one line on stderr; `--debug` shows the traceback.
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

    from harness.config import TrainJob
    from harness.configlib import describe, to_dict

    if args.reference:
        print("| key | default | meaning |\n|---|---|---|")
        for key, default, help_text in describe(TrainJob):
            print(f"| `{key}` | `{default}` | {help_text} |")
        return 0
    print(yaml.safe_dump(to_dict(_job(args)), sort_keys=False), end="")
    return 0


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
        sub.set_defaults(func=func)
        return sub

    add("train", cmd_train, "fine-tune a model (SFT) with optional mitigations; resumes an unfinished run")
    config = add("config", cmd_config, "print the resolved config, or every knob with --reference", False)
    config.add_argument("--reference", action="store_true", help="print every config key with its default and meaning")
    add("data", cmd_data, "show data statistics and the loss mask of the first example")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "config" or args.config:
        # overrides were parsed as positional args; a config path with '=' is an override, not a file
        if args.config and "=" in args.config and not os.path.exists(args.config):
            args.overrides.insert(0, args.config)
            args.config = None
    _quiet_libraries()
    try:
        return args.func(args)
    except HarnessError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


def _quiet_libraries() -> None:
    """Keep the console to our own progress bar and messages (warnings still go to stderr)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
