"""Peak memory and time of one system's optimizer steps, measured in a fresh process (run by the benchmarks).

    python -m benchmarks.memory_probe SYSTEM [--lora] [--precision fp32|bf16] [--gradient-checkpointing]
                                      [--seq-len L --batch B] [--steps N]

After the model, data and trainer are built, the process's peak-RSS counter is reset (Linux
/proc/self/clear_refs) and N optimizer steps run; the result is one JSON line: the resident memory before the
steps, the peak during them, their difference (what a step needs on top of the loaded model: gradients,
optimizer state, activations, logits) and the median seconds per step after the first. `--seq-len/--batch`
train ours on synthetic sequences of exactly that shape (the last quarter of each is the response) for the
scaling table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def rss_mb(field: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def synthetic_setup(seq_len: int, batch: int):
    """The embedded tokenizer and model with `batch` random sequences of `seq_len` tokens (response: last 25%)."""
    import torch

    from benchmarks.systems import embedded_setup
    from forgetting.harness.formats import IGNORE_INDEX, Example

    tokenizer, _, model = embedded_setup(batch=1)
    generator = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(batch):
        ids = torch.randint(100, model.config.vocab_size, (seq_len,), generator=generator).tolist()
        cut = seq_len - seq_len // 4
        examples.append(Example(input_ids=ids, labels=[IGNORE_INDEX] * cut + ids[cut:]))
    return tokenizer, examples, model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("system", choices=["ours", "hf_trainer", "trl"])
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)
    from benchmarks.systems import embedded_setup, make_step

    setup = synthetic_setup(args.seq_len, args.batch) if args.seq_len else embedded_setup()
    step = make_step(
        args.system, setup, args.precision, lora=args.lora, gradient_checkpointing=args.gradient_checkpointing
    )
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
    before = rss_mb("VmRSS")
    times = []
    for _ in range(args.steps):
        started = time.perf_counter()
        step.run()
        times.append(time.perf_counter() - started)
    peak = rss_mb("VmHWM")
    print(
        json.dumps(
            {
                "rss_before_mb": before,
                "peak_rss_mb": peak,
                "step_memory_mb": peak - before,
                "seconds_per_step": statistics.median(times[1:] or times),
                "tokens": step.tokens,
                "padded": step.padded,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
