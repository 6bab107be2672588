"""``agentstate learners``: what is installed, from where, exact or not."""

from __future__ import annotations

import argparse
from typing import Any

from agentstate.registry import get_registry, learner_table


def add_parser(verbs: Any) -> None:
    """Add ``learners`` to the ``agentstate`` sub-commands."""
    parser = verbs.add_parser("learners", help="list registered learners: name, source, exactness")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    """Print one row per registered learner, then any plugin that failed to load."""
    rows = learner_table()
    width = max(len(row["name"]) for row in rows)
    source_width = max(len(row["distribution"]) for row in rows)
    print(f"{'name':<{width}}  {'source':<{source_width}}  exact  summary")
    for row in rows:
        exact = "yes" if row["exact"] else "no"
        print(
            f"{row['name']:<{width}}  {row['distribution']:<{source_width}}  {exact:<5}  "
            f"{row['summary']}"
        )
    for failure in get_registry().load_errors:
        print(
            f"! plugin {failure.plugin!r} ({failure.distribution}) failed to load: {failure.error}"
        )
    return 0
