"""``evalrun compare GROUP``: rank a comparison group's runs, refusing unfair comparisons.

Wired into ``evalrun`` by :func:`register`; errors go back to ``cli.main``, which maps
them to exit codes (a refused comparison is exit 2, naming the differing fields).
"""

from __future__ import annotations

import argparse
import sys

from runner._internal.settings import Settings
from runner.cli.output import Term


def cmd_compare(args: argparse.Namespace, settings: Settings, term: Term) -> int:
    from runner.bundle.store import Store
    from runner.workflows.compare import compare_group, format_json, format_markdown, format_text

    comparison = compare_group(Store(settings.home), args.group, allow=args.allow or ())
    fmt = "json" if args.json else args.format
    render = {"json": format_json, "md": format_markdown, "text": format_text}[fmt]
    sys.stdout.write(render(comparison))
    return 0


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    """Add ``compare``."""
    from runner.workflows.compare import COMPARABILITY_FIELDS

    p = sub.add_parser(
        "compare",
        parents=[common],
        help="rank the runs of a comparison group (refused unless they are comparable)",
    )
    p.add_argument("group", help="metadata.comparison_group of the runs")
    p.add_argument(
        "--allow",
        action="append",
        choices=COMPARABILITY_FIELDS,
        metavar="FIELD",
        help="accept a difference in FIELD (repeatable; printed on the result): "
        + ", ".join(COMPARABILITY_FIELDS),
    )
    p.add_argument("--format", choices=("text", "json", "md"), default="text")
    p.set_defaults(fn=cmd_compare)
