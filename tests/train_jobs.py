"""Train several jobs one after another in one launch: `torchrun ... tests/train_jobs.py JOBS.json`.

JOBS.json is a list of override lists (`key=value` strings, as `forgetting train` takes them). One launch
amortises the process start-up and the process group over many short jobs; every process trains every job.
"""

from __future__ import annotations

import json
import sys

from forgetting.harness.job import load_job
from forgetting.harness.train import train


def main(path: str) -> None:
    for overrides in json.loads(open(path).read()):
        train(load_job(None, overrides))


if __name__ == "__main__":
    main(sys.argv[1])
