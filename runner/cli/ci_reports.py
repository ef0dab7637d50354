"""What CI systems read besides the exit code: ``--junit FILE`` and ``$GITHUB_STEP_SUMMARY``.

``run``, ``rerun`` and ``sweep`` write a JUnit XML report when asked (``--junit``), and
append a Markdown summary to the file ``$GITHUB_STEP_SUMMARY`` names when it is set (as
GitHub Actions does for every step). Both are written whatever the verdict, and also
when the command fails before it has a result: then the report is one error case and
the summary says why. The renderers are :mod:`runner.render.junit` and
:mod:`runner.render.step_summary`; this module only writes their output.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from runner.errors import EvalrunError, InputError

STEP_SUMMARY_ENV = "GITHUB_STEP_SUMMARY"
log = logging.getLogger("evalrun")


def add_junit_arg(p: argparse.ArgumentParser) -> None:
    """``--junit FILE``."""
    p.add_argument(
        "--junit",
        type=Path,
        metavar="FILE",
        help="also write a JUnit XML report for CI test reporters: one test case per gating "
        "metric (a failed or crashed run: one failing case with the reason); replaced if it "
        f"exists. A Markdown summary is appended to ${STEP_SUMMARY_ENV} when that is set",
    )


class CiReports:
    """Where this command's CI reports go, and writing them (at most once)."""

    def __init__(
        self, command: str, junit: Path | None, environ: Mapping[str, str] | None = None
    ) -> None:
        env = os.environ if environ is None else environ
        self.command = command
        self.junit = junit
        summary = env.get(STEP_SUMMARY_ENV, "").strip()
        self.summary = Path(summary) if summary else None
        self.written = False

    @property
    def wanted(self) -> bool:
        """Whether any report goes anywhere (``--junit`` or ``$GITHUB_STEP_SUMMARY``)."""
        return self.junit is not None or self.summary is not None

    def write(self, suites: Sequence[Any], summary: str) -> None:
        """Write the JUnit report (replacing the file) and append the Markdown summary.

        ``suites`` are :class:`runner.render.junit_xml.JUnitSuite`. A file that cannot be
        written is InputError (exit 2) naming it.
        """
        self.written = True
        if self.junit is not None:
            from runner.render.junit_xml import render_junit

            _replace(self.junit, render_junit(suites))
        if self.summary is not None:
            try:
                with self.summary.open("a", encoding="utf-8") as f:
                    f.write(summary + "\n")
            except OSError as exc:
                raise InputError(
                    f"cannot append the step summary: {exc.strerror}",
                    file=str(self.summary),
                    hint=f"${STEP_SUMMARY_ENV} names the file",
                ) from exc

    def failed(self, name: str, err: EvalrunError) -> None:
        """Report a command that failed before it had a result (never raises)."""
        from runner.render.junit import error_suite
        from runner.render.step_summary import error_summary

        suite = error_suite(
            f"evalrun {self.command} {name}".strip(),
            error=err.kind,
            message=err.diagnostics(),
            exit_code=err.exit_code,
        )
        try:
            self.write([suite], error_summary(self.command, err.message, err.exit_code))
        except EvalrunError as problem:  # the command's own error is the one to report
            log.warning(problem.message, extra={"event": "ci_report_failed"})


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        tmp.replace(path)
    except OSError as exc:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise InputError(f"cannot write the JUnit report: {exc.strerror}", file=str(path)) from exc


@contextmanager
def ci_reports(args: argparse.Namespace, command: str, name: str) -> Iterator[CiReports]:
    """The command's CI reports; an evalrun error escaping the block is reported, then raised.

    ``name`` says what the command was about (the spec, the run), for the error case.
    """
    reports = CiReports(command, getattr(args, "junit", None))
    try:
        yield reports
    except EvalrunError as err:
        if not reports.written and reports.wanted:
            reports.failed(name, err)
        raise


def properties_of(outcome: Any, verified: str | None = None) -> dict[str, str | None]:
    """The suite properties of a stored run beyond its predicate: bundle, digest, verify."""
    return {
        "bundle": str(outcome.bundle.path),
        "bundle_digest": outcome.bundle.digest,
        "verified": verified,
    }
