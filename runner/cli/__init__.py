"""The ``evalrun`` command line: the only place that prints, configures logging and exits."""

from runner.cli.main import console_main, main

__all__ = ["console_main", "main"]
