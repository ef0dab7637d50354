"""The JUnit XML document: its test suites and cases, and the dialect they are written in.

The dialect is the one GitLab, Jenkins (xUnit's ``junit-10.xsd``) and the GitHub JUnit
reporters read, kept to what the strictest of them (Ant's schema) requires:
``<testsuites>`` of ``<testsuite name tests failures errors skipped time timestamp
hostname>``, each with ``<properties>``, ``<testcase classname name time>`` holding at
most one ``<failure>``/``<error>`` (``type``, ``message``, text) and a ``<system-out>``.
Strings from a bundle are made XML-safe (characters XML 1.0 forbids are replaced) and
bounded in length; the XML itself escapes the rest. What goes into a run's suites is
:mod:`runner.render.junit`.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

# A message attribute is one line a reporter shows in a list; the text under it may be longer.
MESSAGE_MAX = 1000
TEXT_MAX = 16_384
# Characters XML 1.0 allows; anything else (control characters, lone surrogates) is replaced.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


@dataclass(frozen=True)
class JUnitProblem:
    """Why a test case did not pass: ``failure`` (a verdict) or ``error`` (no verdict)."""

    kind: Literal["failure", "error"]
    type: str
    message: str
    text: str


@dataclass(frozen=True)
class JUnitCase:
    """One test case: a gating metric, a re-run's metric, or the run as a whole."""

    classname: str
    name: str
    output: str
    problem: JUnitProblem | None = None
    time: float = 0.0


@dataclass(frozen=True)
class JUnitSuite:
    """One run (or run-set seed, or sweep cell) and its test cases."""

    name: str
    cases: tuple[JUnitCase, ...]
    properties: tuple[tuple[str, str], ...] = ()
    timestamp: str | None = None
    time: float = 0.0
    hostname: str = "localhost"
    output: str = ""

    def count(self, kind: str) -> int:
        return sum(1 for c in self.cases if c.problem is not None and c.problem.kind == kind)


def bounded(text: str, limit: int) -> str:
    text = _NOT_XML.sub("\ufffd", text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def one_line(text: str) -> str:
    return " ".join(text.split())


def render_junit(suites: Sequence[JUnitSuite], *, name: str = "evalrun") -> bytes:
    """The JUnit XML document (UTF-8, with declaration) of ``suites``. Deterministic."""
    root = ET.Element("testsuites")
    totals = {"tests": 0, "failures": 0, "errors": 0}
    elapsed = 0.0
    for suite in suites:
        tests, failures, errors = len(suite.cases), suite.count("failure"), suite.count("error")
        totals["tests"] += tests
        totals["failures"] += failures
        totals["errors"] += errors
        elapsed += suite.time
        node = ET.SubElement(
            root,
            "testsuite",
            {
                "name": bounded(one_line(suite.name), MESSAGE_MAX),
                "tests": str(tests),
                "failures": str(failures),
                "errors": str(errors),
                "skipped": "0",
                "time": f"{suite.time:.3f}",
                "timestamp": suite.timestamp or _EPOCH,
                "hostname": bounded(one_line(suite.hostname), MESSAGE_MAX) or "localhost",
            },
        )
        props = ET.SubElement(node, "properties")
        for key, value in suite.properties:
            ET.SubElement(
                props,
                "property",
                {"name": bounded(key, MESSAGE_MAX), "value": bounded(value, MESSAGE_MAX)},
            )
        for case in suite.cases:
            _case_element(node, case)
        ET.SubElement(node, "system-out").text = bounded(suite.output, TEXT_MAX)
        ET.SubElement(node, "system-err").text = ""
    root.attrib = {
        "name": name,
        "tests": str(totals["tests"]),
        "failures": str(totals["failures"]),
        "errors": str(totals["errors"]),
        "time": f"{elapsed:.3f}",
    }
    ET.indent(root)
    data: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return data + b"\n"


# Ant's schema requires a timestamp; a suite without one (an error before any run) gets this.
_EPOCH = "1970-01-01T00:00:00"


def _case_element(parent: ET.Element, case: JUnitCase) -> None:
    node = ET.SubElement(
        parent,
        "testcase",
        {
            "classname": bounded(one_line(case.classname), MESSAGE_MAX),
            "name": bounded(one_line(case.name), MESSAGE_MAX),
            "time": f"{case.time:.3f}",
        },
    )
    if case.problem is not None:
        problem = ET.SubElement(
            node,
            case.problem.kind,
            {
                "type": bounded(one_line(case.problem.type), MESSAGE_MAX),
                "message": bounded(one_line(case.problem.message), MESSAGE_MAX),
            },
        )
        problem.text = bounded(case.problem.text, TEXT_MAX)
    if case.output:
        ET.SubElement(node, "system-out").text = bounded(case.output, TEXT_MAX)
