"""The learner-level eager step on a GPU: ``learner.step`` + ``learner.grad`` with many streams.

The compiled steps are CPU-only; on a GPU a user's own loop (an actor-critic, say) runs the
eager step, whose cost per stream falls as the streams fill the device. This script times it
per learner and stream count, on the device asked for and, beside it in the same run, on the
CPU (the smaller stream counts only: the CPU's time grows linearly), and writes a markdown
table and a JSON file.

    python benchmarks/gpu_eager_step.py --out gpu_eager                 # CUDA if present
    python benchmarks/gpu_eager_step.py --device cpu --streams 8 64 --seconds 0.5 --out x

One call is one step of every stream: ``h = learner.step(x)`` (``x: [B, 14]``, the actor-
critic's 12 observation inputs and 2 actions), then ``learner.grad(v)`` (``v: [B, n]``, as the
heads' gradient would be). Float32, parameters shared across streams (``--independent``: one
network per stream). Per call the device is synchronised, so a time is a whole step.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

import agentstate

INPUTS = 14
LEARNERS: dict[str, dict[str, Any]] = {
    "columnar": {"n_features": 7},
    "elstm": {"n_features": 8},
    "rtu": {"n_features": 16},
    "ccn": {"n_features": 20, "columns_per_stage": 4, "steps_per_stage": 10**12},
}
"""The cores and sizes of ``agentstate bench``'s actor-critic table."""


def eager_step(
    name: str, streams: int, device: torch.device, independent: bool
) -> Callable[[], None]:
    """One learner-level step of ``streams`` streams on ``device`` (synchronised)."""
    learner = agentstate.make_learner(
        name,
        INPUTS,
        streams=streams,
        device=device,
        dtype=torch.float32,
        independent_params=independent,
        seed=0,
        **LEARNERS[name],
    )
    generator = torch.Generator(device=device).manual_seed(0)
    pool = 16  # pre-drawn inputs: drawing is not part of the step
    xs = (torch.rand(pool, streams, INPUTS, generator=generator, device=device) < 0.3).float()
    vs = torch.randn(pool, streams, learner.n_features, generator=generator, device=device)
    counter = [0]

    def step() -> None:
        i = counter[0] % pool
        counter[0] += 1
        learner.step(xs[i])
        learner.grad(vs[i])
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step


def seconds_per_call(step: Callable[[], None], seconds: float) -> float:
    """The median over 5 windows of ``seconds / 5`` each, after 5 warm-up calls."""
    for _ in range(5):
        step()
    per_window = []
    for _ in range(5):
        calls, start = 0, time.perf_counter()
        while calls < 3 or time.perf_counter() - start < seconds / 5:
            step()
            calls += 1
        per_window.append((time.perf_counter() - start) / calls)
    return sorted(per_window)[2]


def measure(
    device: torch.device,
    streams: Sequence[int],
    cpu_streams: Sequence[int],
    learners: Sequence[str],
    seconds: float,
    independent: bool,
) -> list[dict[str, Any]]:
    """One row per learner and stream count: µs per call and per stream-step, per device."""
    rows = []
    for name in learners:
        for count in streams:
            row: dict[str, Any] = {"learner": name, "streams": count}
            devices = [device] + ([torch.device("cpu")] if device.type != "cpu" else [])
            for where in devices:
                if where.type == "cpu" and where != device and count not in cpu_streams:
                    continue
                step = eager_step(name, count, where, independent)
                seconds_each = seconds_per_call(step, seconds)
                row[f"{where.type}_us_per_step"] = seconds_each * 1e6
                row[f"{where.type}_us_per_stream_step"] = seconds_each * 1e6 / count
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def markdown(rows: list[dict[str, Any]], device: torch.device, independent: bool) -> str:
    """A table: µs per step and per stream-step on each device."""
    kinds = [device.type] + (["cpu"] if device.type != "cpu" else [])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    header = ["learner", "streams"]
    for kind in kinds:
        header += [f"{kind} µs/step", f"{kind} µs/stream-step"]
    lines = [
        f"Eager `learner.step` + `learner.grad`, float32, {INPUTS} inputs, parameters "
        f"{'one network per stream' if independent else 'shared'}; device: {name}.",
        "",
        "| " + " | ".join(header) + " |",
        "|---|" + "---:|" * (len(header) - 1),
    ]
    for row in rows:
        cells = [row["learner"], f"{row['streams']:,}"]
        for kind in kinds:
            step = row.get(f"{kind}_us_per_step")
            stream_step = row.get(f"{kind}_us_per_stream_step")
            cells += ["–" if step is None else f"{step:,.0f}"]
            cells += ["–" if stream_step is None else f"{stream_step:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--streams", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument(
        "--cpu-streams",
        type=int,
        nargs="+",
        default=[1024, 4096],
        help="stream counts also timed on the CPU beside a GPU (default 1024 4096)",
    )
    parser.add_argument("--learners", nargs="+", default=list(LEARNERS), choices=list(LEARNERS))
    parser.add_argument("--seconds", type=float, default=2.0, help="timing budget per cell")
    parser.add_argument("--independent", action="store_true", help="one network per stream")
    parser.add_argument("--out", type=Path, required=True, help="folder for results.md/.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here (torch.cuda.is_available())")
    torch.set_num_threads(1)
    rows = measure(
        device, args.streams, args.cpu_streams, args.learners, args.seconds, args.independent
    )
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, device, args.independent)
    (args.out / "results.md").write_text(table)
    report = {"device": str(device), "independent": args.independent, "rows": rows}
    (args.out / "results.json").write_text(json.dumps(report, indent=2))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
