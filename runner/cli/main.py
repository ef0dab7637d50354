"""The ``evalrun`` command line. The only place that configures logging and exits.

Commands live by area (:mod:`~runner.cli.build`, :mod:`~runner.cli.evaluate`: run and sweep,
:mod:`~runner.cli.signing`: verify and keys, :mod:`~runner.cli.runs`,
:mod:`~runner.cli.history`, :mod:`~runner.cli.blueprints`, :mod:`~runner.cli.compare`,
:mod:`~runner.cli.inputs`), each added to the parser by its ``register``; how output and
logs look is :mod:`runner.cli.output`. :func:`main` turns every error into an exit code and
a one-line message (a JSON error object under ``--json``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import select
import signal
import sys
import threading
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NoReturn

from runner._internal.settings import Settings
from runner.cli import blueprints as cli_blueprints
from runner.cli import build as cli_build
from runner.cli import compare as cli_compare
from runner.cli import evaluate as cli_evaluate
from runner.cli import history as cli_history
from runner.cli import inputs as cli_inputs
from runner.cli import runs as cli_runs
from runner.cli import signing as cli_signing
from runner.cli.common import (
    GLOBAL_OPTIONS_TITLE,
    add_global_options,
)
from runner.cli.output import Terminal, configure_logging, emit_json, safe_streams
from runner.errors import EvalrunError, InputError, Interrupted, StopRequested
from runner.shared.quick_exit import leave

log = logging.getLogger("evalrun")


# --------------------------------------------------------------------------- parser


def build_parser(
    parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser,
) -> argparse.ArgumentParser:
    """The whole ``evalrun`` command tree.

    ``common`` (given to every command's parser, and to each area's ``register``) holds
    the global options without defaults; the top-level parser holds them with defaults.
    So ``evalrun --json validate X`` and ``evalrun validate X --json`` mean the same.
    """
    common = argparse.ArgumentParser(add_help=False)
    add_global_options(common, defaults=False)

    parser = parser_class(
        prog="evalrun",
        usage="evalrun [global options] COMMAND [options]",
        description="Build digest-pinned evaluation images, run them sandboxed, and seal "
        "the results into signed, verifiable bundles.",
    )
    add_global_options(parser, defaults=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", prog="evalrun")
    cli_build.register(sub, common)

    cli_evaluate.register(sub, common)
    cli_signing.register(sub, common)
    cli_runs.register(sub, common, cli_evaluate.report_run)
    cli_history.register(sub, common)
    cli_blueprints.register(sub, common)
    cli_compare.register(sub, common)
    cli_inputs.register(sub, common)
    describe_command_tree(parser)
    return parser


def command_tree(parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    """Every command under ``parser`` as (``"keys generate"``, its one-line help), in order."""
    rows: list[tuple[str, str]] = []
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {a.dest: a.help or "" for a in action._choices_actions}
        for name, child in action.choices.items():
            nested = command_tree(child)
            rows += [(f"{name} {n}", h) for n, h in nested] or [(name, helps.get(name, ""))]
    return rows


def describe_command_tree(parser: argparse.ArgumentParser) -> None:
    """Make ``parser`` and every command under it describe themselves the same way.

    A command's usage line shows its own options and ``[global options]`` once (the
    group is in its help); a command with commands of its own lists the full tree
    below it, nested commands included, as ``evalrun --help`` does.
    """
    if parser.prog != "evalrun":
        own = [a for a in parser._actions if not _is_global(parser, a)]
        formatter = parser._get_formatter()
        formatter.add_usage(None, own, parser._mutually_exclusive_groups, prefix="usage: ")
        text = formatter.format_help().strip().removeprefix("usage: ")
        parser.usage = text.replace("%", "%%") + " [global options]"
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        rows = command_tree(parser)
        width = max(len(n) for n, _ in rows) + 2
        prefix = parser.prog.removeprefix("evalrun").strip()
        prefix += " " if prefix else ""
        lines = [f"  {prefix}{n:{width}}{h}" for n, h in rows]
        parser.epilog = "commands (COMMAND --help for its options):\n" + "\n".join(lines)
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        action.help = argparse.SUPPRESS
        for child in action.choices.values():
            describe_command_tree(child)


def _is_global(parser: argparse.ArgumentParser, action: argparse.Action) -> bool:
    return any(
        g.title == GLOBAL_OPTIONS_TITLE and action in g._group_actions
        for g in parser._action_groups
    )


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are raised (as InputError), not printed."""

    def error(self, message: str) -> NoReturn:
        raise InputError(message, command=self.prog, usage=self.format_usage().strip())


def main(argv: Sequence[str] | None = None) -> int:
    # everything any command prints passes one sanitiser (control characters shown escaped)
    with safe_streams(), _stop_on_sigterm():
        return _main(argv)


def console_main() -> NoReturn:
    """The ``evalrun`` program: :func:`main`, then exit without the interpreter's teardown.

    What Python's own exit does that matters still happens, in its order: other threads
    are waited for, the exit handlers run (logging flushes and closes its files, temporary
    directories go), cyclic garbage is collected (closing what it holds) and the standard
    streams are flushed. Only the teardown of some 700 modules is skipped (0.1 to 0.3 s of
    every command). A stream that cannot be flushed takes the ordinary exit, which
    reports it, and so does a run under a profiler or tracer (``python -m cProfile``
    writes its statistics after the program returns).

    Pydantic's plugins (found by scanning every installed distribution's entry points,
    0.1 to 0.2 s) are not loaded into evalrun's models unless ``PYDANTIC_DISABLE_PLUGINS``
    is set otherwise: the models validate specs, locks and bundles, nothing to observe.
    """
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    code = main()
    if sys.getprofile() is not None or sys.gettrace() is not None:
        sys.exit(code)
    leave(code)


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """SIGTERM (a CI runner cancelling the job) stops evalrun exactly as Ctrl-C does.

    The first SIGTERM raises :class:`StopRequested` in the main thread; later ones are
    ignored so that the clean-up and the sealing of the ``interrupted`` bundle finish.
    """

    def stop(signum: int, _frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise StopRequested(signal.Signals(signum).name)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv: Sequence[str] | None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(parser_class=_Parser)
    try:
        args = parser.parse_args(words)
    except InputError as usage:  # under --json (anywhere), a usage error is a JSON object too
        if "--json" in words:
            emit_json(usage.as_dict())
        else:
            f = usage.fields
            print(f"{f['usage']}\n{f['command']}: error: {usage.message}", file=sys.stderr)
        return usage.exit_code
    as_json = getattr(args, "json", False)
    try:
        settings = Settings()
    except InputError as err:  # a location from the environment that cannot be used
        return _reported(err, as_json=as_json)
    configure_logging(settings, getattr(args, "log_json", False), getattr(args, "verbose", False))
    term = Terminal(quiet=as_json)
    try:
        code: int = args.fn(args, settings, term)
    except KeyboardInterrupt as stop:
        by = getattr(stop, "signal_name", "Ctrl-C")
        stopped = Interrupted(f"interrupted ({by}); nothing was left half-written")
        print(f"evalrun: {stopped.diagnostics()}", file=sys.stderr)
        return stopped.exit_code
    except EvalrunError as err:
        log.error(err.message, extra={"event": "error", "error": err.as_dict()})
        return _reported(err, as_json=as_json)
    except BrokenPipeError as exc:
        if not _stdout_closed():  # another pipe or socket: not the reader of the output
            return _internal_error(exc, settings, as_json=as_json)
        # the reader of the output went away (`evalrun runs ls | head -1`): nothing more
        # can reach it; as Python's own recipe does, the rest goes to /dev/null, exit 1
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        log.warning("output cut short", extra={"event": "output_closed"})
        return 1
    except OSError as exc:
        unusable = _unusable_location(exc, settings)
        if unusable is None:  # a bug: the user still gets one line and exit 1, the log the rest
            return _internal_error(exc, settings, as_json=as_json)
        log.error(unusable.message, extra={"event": "error", "error": unusable.as_dict()})
        return _reported(unusable, as_json=as_json)
    except Exception as exc:  # a bug: the user still gets one line and exit 1, the log the rest
        return _internal_error(exc, settings, as_json=as_json)
    return code


def _stdout_closed() -> bool:
    """Whether the reader of this process's standard output has closed it (a pipe whose
    other end is gone polls as an error)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def _reported(err: EvalrunError, *, as_json: bool) -> int:
    """``err`` told the user (one JSON object under ``--json``); its exit code."""
    if as_json:
        emit_json(err.as_dict())
    else:
        print(f"evalrun: error: {err.diagnostics()}", file=sys.stderr)
    return err.exit_code


def _unusable_location(exc: OSError, settings: Settings) -> InputError | None:
    """``exc`` as the error of a store or cache folder the environment names that evalrun
    cannot make or write (``EVALRUN_HOME=/read-only/…``); None for any other OSError."""
    if not isinstance(exc.filename, str):
        return None
    path = Path(exc.filename)
    for variable, root in (("EVALRUN_HOME", settings.home), ("EVALRUN_CACHE", settings.cache)):
        if path == root or root in path.parents or path in root.parents:
            return InputError(
                f"evalrun cannot use {root} (${variable}): {exc.strerror or exc}",
                variable=variable,
                path=exc.filename,
                hint=f"set {variable} to a folder you can create and write",
            )
    return None


def _internal_error(exc: Exception, settings: Settings, *, as_json: bool) -> int:
    """Report an unexpected exception: the traceback to the log file, one line to the user.

    Under ``--json`` the line is a JSON error object on stdout. Returns exit code 1.
    """
    summary = f"{type(exc).__name__}: " + " ".join(str(exc).splitlines())
    logged = any(isinstance(h, logging.FileHandler) for h in logging.getLogger().handlers)
    log.error(
        summary,
        extra={
            "event": "internal_error",
            "traceback": "".join(traceback.format_exception(exc)),
        },
    )
    where = str(settings.log_file) if logged else "stderr"
    if not logged:  # no log file could be opened: the traceback must still go somewhere
        traceback.print_exception(exc, file=sys.stderr)
    if as_json:
        emit_json({"error": "internal", "exit_code": 1, "message": summary, "log": where})
    else:
        print(f"evalrun: internal error: {summary} (traceback in {where})", file=sys.stderr)
    return 1


if __name__ == "__main__":
    console_main()
