"""``agentstate sweep``: a grid of runs from a TOML spec, locally or on Ray."""

from __future__ import annotations

import argparse
from typing import Any

from agentstate.sweep import BACKENDS, run_sweep


def add_parser(verbs: Any) -> None:
    """Add ``sweep`` to the ``agentstate`` sub-commands."""
    sweep = verbs.add_parser(
        "sweep",
        help="run a grid of experiments (learners x step sizes x seeds ...) from a TOML spec",
        description="Run every grid point of SPEC in its own folder under --out; finished runs "
        "are skipped and unfinished ones resume from their checkpoints when run again. Two "
        "sweeps may share --out: a run one of them is running, the other leaves to it.",
    )
    sweep.add_argument("spec", help="TOML spec: [sweep] options, [run] base options, [grid]")
    sweep.add_argument("--out", required=True, help="output folder, one sub-folder per run")
    sweep.add_argument(
        "--backend",
        default="local",
        choices=BACKENDS,
        help="local: a process pool on this machine (default); ray: Ray tasks",
    )
    sweep.add_argument(
        "--address",
        default=None,
        help="Ray cluster address (default: start a local Ray cluster)",
    )
    sweep.add_argument(
        "--workers",
        type=int,
        default=None,
        help="runs at once (default: CPUs / cpus_per_run; a Ray cluster at --address decides)",
    )
    sweep.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    sweep.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    """Run the sweep; exit 1 if any run failed."""
    if args.address is not None and args.backend != "ray":
        raise ValueError("--address needs --backend ray")
    report = run_sweep(
        args.spec,
        args.out,
        backend=args.backend,
        address=args.address,
        workers=args.workers,
        progress=not args.no_progress,
    )
    print(
        f"sweep {args.out}: {len(report.finished)} runs finished, {len(report.skipped)} "
        f"already done, {len(report.failed)} failed, {len(report.elsewhere)} left to "
        "another sweep"
    )
    return 1 if report.failed else 0
