"""``agentstate results``: one table and one plot from every run under a folder."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from agentstate.results import (
    RESULTS_CSV,
    RESULTS_PLOT,
    aggregate,
    format_table,
    plot_results,
    write_results_csv,
)


def add_parser(verbs: Any) -> None:
    """Add ``results`` to the ``agentstate`` sub-commands."""
    results = verbs.add_parser(
        "results",
        help="aggregate every run under DIR: mean ± standard error over seeds per grid point",
        description=f"Pool the seeds of every grid point under DIR; write DIR/{RESULTS_CSV} "
        "(final MSRE ÷ the same seed's predict-zero MSRE, final and area-under-curve MSRE, "
        "mean ± standard error; the best step size per family by final ratio; the progress "
        f"of unfinished runs) and DIR/{RESULTS_PLOT} (per-seed ratio learning curves, best "
        "step size per family in bold).",
    )
    results.add_argument("dir", help="a sweep's output folder (or any folder of runs)")
    results.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    """Aggregate, print the table, write the CSV and the plot."""
    root = Path(args.dir)
    points = aggregate(root)
    write_results_csv(points, root / RESULTS_CSV, root)
    plot_results(points, root / RESULTS_PLOT, title=f"{root.resolve().name}: learning curves")
    print(format_table(points))
    running = sum(1 for point in points if point.unfinished)
    if running:
        print(f"{running} grid point(s) have unfinished runs: see the progress column")
    print(f"wrote {root / RESULTS_CSV} and {root / RESULTS_PLOT}")
    return 0
