"""``agentstate bench``: µs per stream-step of every target case, side by side in one run."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from agentstate import benchmark


def add_parser(verbs: Any) -> None:
    """Add ``bench`` to the ``agentstate`` sub-commands."""
    parser = verbs.add_parser(
        "bench",
        help="speed of the TD step: fused vs eager vs naive, triad bandwidth, scaling slopes",
        description="Time the TD(lambda) step of every benchmark case (float32, one thread; "
        "the fused kernel also on every core), the STREAM triad, and the per-step cost from "
        "1e3 to 1e6 parameters; print markdown tables (about 5 minutes).",
    )
    parser.add_argument("--json", type=Path, help="also write every number to this JSON file")
    parser.add_argument(
        "--quick", action="store_true", help="tiny budgets and sizes: a smoke test, not a result"
    )
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    """Run the benchmark, print the tables, write the JSON."""
    command = "agentstate " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else ""
    report = benchmark.run(
        command or "agentstate bench", quick=args.quick, log=lambda line: print(line, flush=True)
    )
    print()
    print(benchmark.markdown(report), end="")
    if args.json:
        args.json.write_text(json.dumps(dataclasses.asdict(report), indent=2) + "\n")
    return 0
