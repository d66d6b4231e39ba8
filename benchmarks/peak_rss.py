"""Run one `forgetting` command in this process and record its peak resident memory over the baseline after imports.

    python -m benchmarks.peak_rss OUT_DIR train CONFIG [key=value ...]
    python -m torch.distributed.run --nproc_per_node=2 -m benchmarks.peak_rss OUT_DIR train ...   (a file per rank)

The heavy imports (torch, transformers, peft, lm-eval: what `harness.commands` pulls in) come first; then the
peak-RSS counter is reset (Linux /proc/self/clear_refs) and the resident memory read as the baseline; the command
runs; OUT_DIR/rank<R>.json gets the baseline, the peak (VmHWM) and their difference in bytes, and whether the model
was sharded (`harness.sharding.shard_model` called: tells a real fsdp run from a config the loop ignored).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def status_bytes(field: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def main(argv: list[str]) -> int:
    out, command = Path(argv[0]), argv[1:]
    from forgetting.harness import sharding  # patched before the loop imports it, so that a call by any name is seen

    calls = {"shard_model": 0}
    original = sharding.shard_model

    def counted(*args, **kwargs):
        calls["shard_model"] += 1
        return original(*args, **kwargs)

    sharding.shard_model = counted
    from forgetting.harness import cli, commands  # noqa: F401  (the heavy imports, before the baseline)

    with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
        handle.write("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
    baseline = status_bytes("VmRSS")
    code = cli.main(command)
    peak = status_bytes("VmHWM")
    out.mkdir(parents=True, exist_ok=True)
    record = {"baseline": baseline, "peak": peak, "growth": peak - baseline, "sharded": calls["shard_model"] > 0}
    (out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(record))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
