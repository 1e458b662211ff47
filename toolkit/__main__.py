"""`python -m dtk` is the `dtk` command."""

from dtk.cli import run

run()
