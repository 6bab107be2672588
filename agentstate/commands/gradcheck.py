"""``agentstate gradcheck``: a learner's ``grad`` against exact BPTT, as a table and a plot."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from agentstate.commands.options import parse_key_values
from agentstate.gradcheck import (
    gradient_check,
    paper_sweep,
    plot_gradient_checks,
    run_sweep,
    summary_markdown,
    trace_patterning_inputs,
    write_csv,
)

TRACE_PATTERNING_INPUT_SIZE = 12


def add_parser(verbs: Any) -> None:
    """Add ``gradcheck`` to the ``agentstate`` sub-commands."""
    parser = verbs.add_parser(
        "gradcheck",
        help="compare a learner's online gradient with exact BPTT, step by step",
        description="Run a learner (float64, parameters fixed) next to autograd BPTT through "
        "its own functional_step and report, per step, the cosine similarity and relative "
        "error of grad(v) against the true gradient of v . h_t. Writes gradcheck.csv and "
        "gradcheck.png into --out. --sweep runs the paper's synthetic test-bed instead "
        "(columnar, ccn, elstm, rtrl, snap1 by density, tbptt by window, uoro).",
    )
    parser.add_argument("--learner", help="registered learner name (required without --sweep)")
    parser.add_argument(
        "--learner-kwarg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="learner keyword argument, e.g. connection_density=0.5 (repeatable)",
    )
    parser.add_argument("--steps", type=int, default=200, help="steps T (cost grows as T^2)")
    parser.add_argument("--streams", type=int, default=8, help="streams B")
    parser.add_argument(
        "--input",
        default="random",
        choices=["random", "trace-patterning"],
        help="N(0, 1) inputs, or the trace-patterning benchmark's observations (12 inputs)",
    )
    parser.add_argument("--input-size", type=int, default=8, help="size of random inputs")
    parser.add_argument("--check-every", type=int, default=1, help="compare every k-th step")
    parser.add_argument(
        "--identical-streams",
        action="store_true",
        help="same inputs and v on every stream: with shared parameters the streams are "
        "independent draws of one estimator (cos(mean) then measures bias)",
    )
    parser.add_argument(
        "--independent", action="store_true", help="one network per stream instead of shared"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (the ops are tiny: more threads mostly add contention)",
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="run the paper's test-bed sweep instead (one figure; random inputs, with "
        "--steps, --streams, --input-size, --check-every, --seed)",
    )
    parser.add_argument("--out", default="runs/gradcheck", help="output folder")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    """Run one check (or the sweep), print the table, write the CSV and the plot."""
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.sweep:
        return _handle_sweep(args, out)
    if args.learner is None:
        raise ValueError("--learner is required (or use --sweep)")
    if args.input == "trace-patterning":
        if args.identical_streams:
            raise ValueError("--identical-streams applies to --input random only")
        inputs = trace_patterning_inputs(args.steps, args.streams, args.seed)
        input_size = TRACE_PATTERNING_INPUT_SIZE
    else:
        inputs, input_size = None, args.input_size
    check = gradient_check(
        args.learner,
        args.steps,
        input_size=input_size,
        streams=args.streams,
        learner_kwargs=parse_key_values(args.learner_kwarg, "--learner-kwarg"),
        seed=args.seed,
        inputs=inputs,
        check_every=args.check_every,
        identical_streams=args.identical_streams,
        independent_params=args.independent,
    )
    print(check.format_table())
    csv_path = write_csv([check], out / "gradcheck.csv")
    plot_path = plot_gradient_checks(
        [check],
        out / "gradcheck.png",
        title=f"{check.label}: grad vs BPTT, {args.streams} streams, {args.input} inputs",
        mean_curves=[check.label],
    )
    print(f"wrote {csv_path} and {plot_path}")
    return 0


def _handle_sweep(args: argparse.Namespace, out: Path) -> int:
    started = time.perf_counter()
    cases = paper_sweep(args.steps)
    checks = run_sweep(
        cases,
        steps=args.steps,
        streams=args.streams,
        input_size=args.input_size,
        check_every=args.check_every,
        seed=args.seed,
    )
    summary = summary_markdown(checks)
    print(summary)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gradcheck_sweep.md").write_text(
        f"{args.steps} steps, {args.input_size} N(0, 1) inputs, {args.streams} streams "
        f"(uoro: identical streams), checked every {args.check_every} steps, seed {args.seed}."
        f"\n\n{summary}\n"
    )
    csv_path = write_csv(checks, out / "gradcheck_sweep.csv")
    plot_path = plot_gradient_checks(
        checks,
        out / "gradcheck_sweep.png",
        title=f"Gradient vs exact BPTT: {args.input_size} N(0,1) inputs, {args.streams} streams "
        "(uoro: identical streams; dashed: mean of the streams' estimates)",
        mean_curves=[case.label for case in cases if case.identical_streams],
    )
    print(
        f"wrote {csv_path}, {plot_path} and gradcheck_sweep.md in "
        f"{time.perf_counter() - started:.0f} s"
    )
    return 0
