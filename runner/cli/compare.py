"""``evalrun compare GROUP``: rank a comparison group's runs, refusing unfair comparisons.

Wired into ``evalrun`` by :func:`register`; errors go back to ``cli.main``, which maps
them to exit codes: 0 ranked; 2 not comparable (naming the differing fields), no runs,
or a ``--candidate`` that is not ranked; 3 a run of the group does not verify; 6 the
``--candidate`` ranks significantly below the leader. ``--metric`` chooses the metric;
``--spec``/``--backend``/``--since`` narrow the runs; ``--group-by model`` keeps one
entry per model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runner._internal.settings import Settings
from runner.cli.common import add_keyring_arg, add_no_verify_arg, trust_for
from runner.cli.output import Term


def cmd_compare(args: argparse.Namespace, settings: Settings, term: Term) -> int:
    from runner.bundle.store import Store
    from runner.workflows.compare import (
        Selection,
        compare_group,
        format_json,
        format_markdown,
        format_text,
        gate,
    )

    trust = trust_for(args, settings)
    comparison = compare_group(
        Store(settings.home),
        args.group,
        trust=trust,
        allow=args.allow or (),
        metric=args.metric,
        selection=Selection(spec=args.spec, backend=args.backend, since=args.since),
        group_by=args.group_by,
    )
    verdict = gate(comparison, args.candidate) if args.candidate else None
    fmt = "json" if args.json else args.format
    render = {"json": format_json, "md": format_markdown, "text": format_text}[fmt]
    sys.stdout.write(render(comparison, verdict))
    return verdict.exit_code if verdict is not None else 0


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    """Add ``compare``."""
    # a light module: every evalrun command registers compare
    from runner.model.comparability import COMPARABILITY_FIELDS, GROUP_BY

    keys = argparse.ArgumentParser(add_help=False)
    keys.add_argument(
        "--pub", type=Path, help="public key to verify bundles (default: $EVALRUN_HOME/keys)"
    )
    add_keyring_arg(keys)
    add_no_verify_arg(keys)
    p = sub.add_parser(
        "compare",
        parents=[common, keys],
        help="rank the runs of a comparison group (every run verified first; refused unless "
        "they are comparable)",
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
    p.add_argument(
        "--metric",
        metavar="NAME",
        help="rank by this metric (default: the group's first primary metric)",
    )
    p.add_argument("--spec", metavar="NAME", help="only runs of this spec (metadata.name)")
    p.add_argument("--backend", metavar="NAME", help="only runs made on this backend")
    p.add_argument(
        "--since",
        metavar="WHEN",
        help="only runs started since WHEN (YYYY-MM-DD, ISO date-time, or 30d/12h/2w ago)",
    )
    p.add_argument(
        "--group-by",
        choices=GROUP_BY,
        help="one entry per model: its newest run or run set (the others listed as left out)",
    )
    p.add_argument("--format", choices=("text", "json", "md"), default="text")
    p.add_argument(
        "--candidate",
        metavar="RUN",
        help="CI gate: exit 6 when RUN (a run id, or `newest`) ranks below the leader and "
        "differs significantly from it (paired test on shared samples, else disjoint CIs)",
    )
    p.set_defaults(fn=cmd_compare)
