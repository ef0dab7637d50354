"""What ``evalrun compare`` returns and how it is written: text, Markdown and JSON."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TypedDict

from pydantic import JsonValue

from runner._internal.sanitize import markdown_text, one_line
from runner.model.predicate import JsonObject
from runner.render.markdown import percent
from runner.workflows.compare_rank import RankedRun


class VariantJson(TypedDict):
    value: JsonValue
    runs: list[str]


class DifferenceJson(TypedDict):
    field: str
    variants: list[VariantJson]


@dataclass(frozen=True)
class Difference:
    """One comparability field and the distinct values it takes (with the runs of each)."""

    field: str
    variants: tuple[tuple[str, tuple[str, ...]], ...]

    def as_dict(self) -> DifferenceJson:
        return {
            "field": self.field,
            "variants": [{"value": json.loads(v), "runs": list(r)} for v, r in self.variants],
        }


@dataclass(frozen=True)
class Comparison:
    group: str
    metric: str
    direction: str
    criterion: str
    ranking: tuple[RankedRun, ...]
    allowed: tuple[Difference, ...] = ()
    excluded: tuple[tuple[str, str], ...] = field(default=())
    # the filters and grouping asked for, as written on the command line (shown on output)
    selection: tuple[str, ...] = ()
    group_by: str | None = None

    def as_dict(self) -> JsonObject:
        """``evalrun compare --format json``: every field, the ranking row by row."""
        data = asdict(self)
        data["allowed"] = [d.as_dict() for d in self.allowed]
        data["excluded"] = [{"run_id": r, "why": why} for r, why in self.excluded]
        data["selection"] = list(self.selection)
        return data


@dataclass(frozen=True)
class Gate:
    """A CI gate's verdict on one candidate run of a comparison."""

    candidate: str
    rank: int
    leader: str
    significantly_worse: bool
    exit_code: int

    def line(self) -> str:
        if self.significantly_worse:
            return (
                f"gate: FAIL — candidate {self.candidate} ranks {self.rank}, significantly "
                f"worse than the leader {self.leader} (exit {self.exit_code})"
            )
        return f"gate: pass — candidate {self.candidate} ranks {self.rank}" + (
            "" if self.rank == 1 else f"; not significantly worse than {self.leader}"
        )


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def _yes_no(value: bool | None) -> str:
    return {True: "yes", False: "no", None: "—"}[value]


# How a value from a bundle (or the command line) is written: one line for the
# terminal, escaped for Markdown.
_Escape = Callable[[object], str]


def _rank(r: RankedRun) -> str:
    return f"={r.rank}" if r.tied else str(r.rank)


def _entry(r: RankedRun, esc: _Escape) -> str:
    text = esc(r.run_id)
    return text + " (run set)" if r.kind == "run_set" else text


def _vs_leader(r: RankedRun) -> str:
    verdict = _yes_no(r.significant_vs_leader)
    if r.paired_vs_leader is not None:
        p = r.paired_vs_leader
        return f"{verdict} (paired, n={p.shared}, Δ [{p.low:+.4f}, {p.high:+.4f}])"
    return verdict


def _rows(c: Comparison, esc: _Escape) -> list[list[str]]:
    rows = []
    for r in c.ranking:
        row = [_rank(r), _entry(r, esc)]
        if c.group_by == "model":
            row.append(esc(r.model or (r.model_sha256 or "—")[:12]))
        row += [
            esc(r.spec_name or "—"),
            _num(r.value),
            f"[{_num(r.ci_low)}, {_num(r.ci_high)}]"
            + (f" ({percent(r.ci_level)}% {esc(r.ci_method)})" if r.ci_level else ""),
            _vs_leader(r),
            _yes_no(r.significant_vs_next),
        ]
        rows.append(row)
    return rows


def header(c: Comparison) -> list[str]:
    model = ["model"] if c.group_by == "model" else []
    return [
        "rank",
        "run",
        *model,
        "spec",
        "value",
        "confidence interval",
        "sig. vs leader",
        "sig. vs next",
    ]


def _heading(c: Comparison, esc: _Escape) -> list[str]:
    """What the ranking is by, the significance criterion, and every allowed difference."""
    arrow = "higher" if c.direction == "higher_is_better" else "lower"
    lines = [
        f"comparison group {esc(c.group)}: ranked by {esc(c.metric)} ({arrow} is better)",
        f"significance: {c.criterion}; tied runs (not significantly different) share a rank (=N)",
    ]
    if c.selection:
        lines.append(f"selected: {esc(' '.join(c.selection))}")
    if c.group_by == "model":
        lines.append("grouped by model: the newest run (or run set) of each model")
    for d in c.allowed:
        lines.append(f"ALLOWED difference in {d.field} (--allow {d.field}):")
        lines += [f"  {esc(', '.join(runs))}: {esc(value)}" for value, runs in d.variants]
    return lines


def _footer(c: Comparison, esc: _Escape) -> list[str]:
    return [f"left out {esc(run_id)}: {esc(why)}" for run_id, why in c.excluded]


def format_text(c: Comparison, candidate: Gate | None = None) -> str:
    rows = _rows(c, one_line)
    head = header(c)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = [*_heading(c, one_line), ""]
    for row in [head, ["-" * w for w in widths], *rows]:
        lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    if c.excluded:
        lines += ["", *_footer(c, one_line)]
    if candidate is not None:
        lines += ["", one_line(candidate.line())]
    return "\n".join(lines) + "\n"


def _md_item(line: str) -> str:
    return f"  - {line.strip()}" if line.startswith("  ") else f"- {line}"


def format_markdown(c: Comparison, candidate: Gate | None = None) -> str:
    head = header(c)
    lines = [
        f"# evalrun comparison — {markdown_text(c.group)}",
        "",
        *map(_md_item, _heading(c, markdown_text)),
        "",
    ]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    lines += ["| " + " | ".join(r) + " |" for r in _rows(c, markdown_text)]
    if c.excluded:
        lines += ["", *map(_md_item, _footer(c, markdown_text))]
    if candidate is not None:
        lines += ["", f"- {markdown_text(candidate.line())}"]
    return "\n".join(lines) + "\n"


def format_json(c: Comparison, candidate: Gate | None = None) -> str:
    data = c.as_dict()
    if candidate is not None:
        data["gate"] = {
            "candidate": candidate.candidate,
            "rank": candidate.rank,
            "leader": candidate.leader,
            "significantly_worse": candidate.significantly_worse,
            "exit_code": candidate.exit_code,
        }
    return json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"
