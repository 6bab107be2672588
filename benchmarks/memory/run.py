"""Memory for SB3 on POPGym and the cue-memory task: run a spec, aggregate, list tasks.

    python benchmarks/memory/run.py sweep benchmarks/memory/suite.toml --out runs/memory
    python benchmarks/memory/run.py results runs/memory
    python benchmarks/memory/run.py results runs/more --to DIR/more --merge-into DIR
    python benchmarks/memory/run.py timing runs/memory-timing --steps 100000
    python benchmarks/memory/run.py tasks

The harness modules lie beside this script; Python puts this folder on the path of the
script, of the process pool's workers and (Ray does it) of local Ray workers.
"""

from __future__ import annotations

import argparse

from memory_harness import run_bench
from memory_results import aggregate, merge_into, timing_table
from memory_tasks import CUE_TASK, describe_tasks, popgym_easy_tasks

from agentstate.sweep import BACKENDS


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    sweep = commands.add_parser("sweep", help="run every unfinished run of a spec")
    sweep.add_argument("spec", help="TOML spec (suite.toml, wrapper_search.toml, smoke.toml)")
    sweep.add_argument("--out", required=True, help="output folder, one sub-folder per run")
    sweep.add_argument("--backend", choices=BACKENDS, default="local")
    sweep.add_argument("--address", help="Ray cluster address (default: start a local one)")
    sweep.add_argument("--workers", type=int, help="runs at once (default: CPUs / cpus_per_run)")
    results = commands.add_parser("results", help="write results.csv, results.md, curves.png")
    results.add_argument("out", help="a sweep's output folder")
    results.add_argument("--to", help="folder for the three files (default: OUT)")
    results.add_argument(
        "--merge-into",
        help="a folder of committed results whose cells the runs of OUT replace "
        "(for a suite that spans sessions)",
    )
    timing = commands.add_parser("timing", help="extrapolate short runs' wall-clock")
    timing.add_argument("out", help="a sweep's output folder (e.g. of timing.toml)")
    timing.add_argument("--steps", type=int, default=100_000, help="target env steps")
    commands.add_parser("tasks", help="each task's spaces and what DQN does with its actions")
    args = parser.parse_args(argv)

    if args.command == "sweep":
        report = run_bench(
            args.spec, args.out, backend=args.backend, address=args.address, workers=args.workers
        )
        print(
            f"{len(report.finished)} finished, {len(report.skipped)} skipped, "
            f"{len(report.failed)} failed, {len(report.not_applicable)} not applicable, "
            f"{len(report.elsewhere)} left to another sweep"
        )
        if report.failed:
            raise SystemExit(1)
    elif args.command == "results":
        summary = aggregate(args.out, args.to)
        print("wrote " + ", ".join(map(str, summary["paths"])))
        if args.merge_into:
            print(f"merged into {merge_into(args.merge_into, summary['rows'])}")
    elif args.command == "timing":
        print(timing_table(args.out, args.steps), end="")
    else:
        print(describe_tasks([*popgym_easy_tasks(), CUE_TASK]), end="")


if __name__ == "__main__":
    main()
