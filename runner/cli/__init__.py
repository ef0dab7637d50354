"""The ``evalrun`` command line: the only place that prints, configures logging and exits."""

from runner.cli.main import main

__all__ = ["main"]
