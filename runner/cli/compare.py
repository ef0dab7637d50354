"""``evalrun compare GROUP``: rank a comparison group's runs, refusing unfair comparisons.

Wired into ``evalrun`` by :func:`register`; errors go back to ``cli.main``, which maps
them to exit codes: 0 ranked; 2 not comparable (naming the differing fields), no runs,
or a ``--candidate`` that is not ranked; 3 a run of the group does not verify; 6 the
``--candidate`` ranks significantly below the leader.
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
        compare_group,
        format_json,
        format_markdown,
        format_text,
        gate,
    )

    trust = trust_for(args, settings)
    comparison = compare_group(
        Store(settings.home), args.group, trust=trust, allow=args.allow or ()
    )
    verdict = gate(comparison, args.candidate) if args.candidate else None
    fmt = "json" if args.json else args.format
    render = {"json": format_json, "md": format_markdown, "text": format_text}[fmt]
    sys.stdout.write(render(comparison, verdict))
    return verdict.exit_code if verdict is not None else 0


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    """Add ``compare``."""
    # a light module: every evalrun command registers compare
    from runner.model.comparability import COMPARABILITY_FIELDS

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
    p.add_argument("--format", choices=("text", "json", "md"), default="text")
    p.add_argument(
        "--candidate",
        metavar="RUN",
        help="CI gate: exit 6 when RUN (a run id, or `newest`) ranks below the leader with "
        "disjoint confidence intervals",
    )
    p.set_defaults(fn=cmd_compare)
