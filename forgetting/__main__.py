"""`python -m forgetting` is the `forgetting` command."""

from forgetting.harness.cli import entry

entry()
