"""Fused TD step speed of two git revisions, side by side: before/after a change.

Each revision is exported (``git archive``) into a temporary folder laid out as the installed
package (``agentstate/`` with ``plugins/`` and ``envs/`` inside it) and put first on
``PYTHONPATH``, so the two run the same cases in alternating subprocesses on the same machine
at the same time (a shared machine's load then weighs on both alike). Each subprocess times
``agentstate.benchmark``'s cases with the fused backend (µs per stream-step, one thread, the
best of several windows); the table gives the minimum and the median over the rounds.

Run: ``python benchmarks/compare_revisions.py OLD NEW [--rounds 6] [--case LABEL ...]`` (LABEL as
in ``agentstate bench``'s table, e.g. ``"columnar (1, 7, 12)"``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CASES = [
    "columnar (1, 7, 12)",
    "columnar (32, 7, 12)",
    "CCN 20:4 (32 streams)",
    "columnar (32, 6, 275)",
    "T-BPTT 15, k=4 (32 streams)",
]
TIMER = """
import json, sys, time, torch
from agentstate import benchmark as bm
torch.set_num_threads(1)
out = {}
for case in bm.CASES:
    if case.label not in sys.argv[1:]:
        continue
    learner = bm.build(case.learner, case.streams, case.input_size, case.options)
    if case.last_stage:
        bm.last_stage(learner)
    step = bm.td_step(bm.predictor_for(learner, "fused"))
    for _ in range(200):
        step()
    best = float("inf")
    for _ in range(7):
        started = time.perf_counter()
        for _ in range(300):
            step()
        best = min(best, (time.perf_counter() - started) / 300)
    out[case.label] = best / case.streams * 1e6
print(json.dumps(out))
"""


def export(revision: str, into: Path) -> Path:
    """``revision``'s package, laid out as installed, under ``into``; returns the folder."""
    tree = into / revision.replace("/", "_")
    source = tree / "source"
    source.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", revision], capture_output=True, check=True
    ).stdout
    archive_path = into / f"{tree.name}.tar"
    archive_path.write_bytes(archive)
    with tarfile.open(archive_path) as handle:
        handle.extractall(source, filter="data")
    package = tree / "site" / "agentstate"
    package.parent.mkdir()
    (source / "agentstate").rename(package)
    (source / "plugins").rename(package / "plugins")
    (source / "envs").rename(package / "envs")
    return tree / "site"


def time_revision(site: Path, cases: list[str], cache: Path) -> dict[str, float]:
    """One subprocess timing ``cases`` with the package at ``site``."""
    environment = {**os.environ, "PYTHONPATH": str(site), "AGENTSTATE_CACHE_DIR": str(cache)}
    result = subprocess.run(
        [sys.executable, "-c", TIMER, *cases],
        capture_output=True,
        text=True,
        env=environment,
        check=True,
        cwd=site,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    """Time both revisions in alternating rounds and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--case", action="append", default=None, dest="cases")
    args = parser.parse_args()
    cases = args.cases or DEFAULT_CASES
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        sites = {revision: export(revision, folder) for revision in (args.old, args.new)}
        times: dict[str, dict[str, list[float]]] = {
            revision: {case: [] for case in cases} for revision in sites
        }
        for round_number in range(args.rounds):
            for revision, site in sites.items():
                for case, value in time_revision(site, cases, folder / "cache").items():
                    times[revision][case].append(value)
            print(f"round {round_number + 1} of {args.rounds} done", file=sys.stderr)
    print(f"| case | {args.old} min | {args.new} min | {args.old} median | {args.new} median |")
    print("|---|---:|---:|---:|---:|")
    for case in cases:
        old, new = times[args.old][case], times[args.new][case]
        print(
            f"| {case} | {min(old):.2f} | {min(new):.2f} | {statistics.median(old):.2f} | "
            f"{statistics.median(new):.2f} |"
        )


if __name__ == "__main__":
    main()
