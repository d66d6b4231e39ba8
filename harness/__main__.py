"""`python -m harness` is the `forgetting` command."""

from harness.cli import entry

entry()
