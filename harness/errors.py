"""Error types the CLI turns into one-line messages and exit codes.

`UserError` is bad input (config, data, paths, flags): exit 2. `RunError` is a failure while running
(non-finite loss, a model that cannot load): exit 1 (`forgetting gate` exits 3 instead, because its 1 means
"regression"). `Preempted`: the run was asked to stop (SIGTERM, SIGUSR1) and saved a checkpoint to resume
from: exit 75 (EX_TEMPFAIL, "try again"), for a scheduler to requeue. Both carry a message that names the file, line or
field at fault; the CLI prints it without a traceback unless `--debug` is given.
"""


class HarnessError(Exception):
    exit_code = 1


class UserError(HarnessError):
    """Bad input from the user: a config field, a data file, a path, a flag."""

    exit_code = 2


class RunError(HarnessError):
    """A failure while running that is not the user's input."""

    exit_code = 1


class Preempted(HarnessError):
    """Stopped on request (SIGTERM, SIGUSR1 or SIGUSR2: a scheduler's preemption or time-limit warning) after saving a
    checkpoint; rerunning the same command resumes from it."""

    exit_code = 75
