"""µs per stream-step of the columnar learner, next to a naive eager-autograd RTRL, in one run.

Cases (streams, columns, inputs): (1, 7, 12), (32, 7, 12), (32, 6, 275). For each case:

* ``learner``: ``learner.step(x)`` + ``learner.grad(v)`` (the RTRL hot path);
* ``td``: one full ``TDPredictor.step`` (normalisation, learner, heads, traces, RMSProp update);
* ``naive``: the same exact RTRL done the obvious way, with ``torch.func.jacrev`` of the cell
  for the immediate Jacobians of every stream each step (what one writes without deriving
  the sensitivity update by hand).

Run: ``python benchmarks/bench_columnar.py [--json PATH] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date

import torch

import agentstate
from agentstate.td import TDConfig, TDPredictor

CASES = [(1, 7, 12), (32, 7, 12), (32, 6, 275)]


def per_stream_step_us(step, streams: int, seconds: float) -> float:
    """Median over 5 repeats of µs per stream-step; each repeat runs for ~seconds/5."""
    for _ in range(20):
        step()
    start = time.perf_counter()
    calls = 0
    while time.perf_counter() - start < 0.2:
        step()
        calls += 1
    per_call = (time.perf_counter() - start) / calls
    n_calls = max(10, int(seconds / 5 / per_call))
    timings = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n_calls):
            step()
        timings.append((time.perf_counter() - start) / n_calls)
    timings.sort()
    return timings[2] / streams * 1e6


class NaiveColumnarRTRL:
    """Exact RTRL with autograd-computed Jacobians each step (the baseline)."""

    def __init__(self, learner: agentstate.StateLearner) -> None:
        self.learner = learner
        self.weight = learner.params["weight"]
        streams, n_params = learner.streams, self.weight[0].numel()
        n_state = 2 * learner.n_features
        self.state = torch.zeros(streams, n_state)
        self.sensitivity = torch.zeros(streams, n_state, n_params)

        def cell(state, weight_flat, x):
            carry = state.view(2, 1, -1)
            (h, c), _ = learner.functional_step(
                {"weight": weight_flat.view(1, *self.weight.shape[1:])},
                (carry[0], carry[1]),
                x[None],
            )
            return torch.cat([h[0], c[0]])

        jacobians = torch.func.jacrev(cell, argnums=(0, 1))
        self.jacobians = torch.func.vmap(jacobians, in_dims=(0, None, 0))
        self.cell = torch.func.vmap(cell, in_dims=(0, None, 0))

    def step(self, x: torch.Tensor) -> None:
        weight_flat = self.weight[0].reshape(-1)
        d_state, d_weight = self.jacobians(self.state, weight_flat, x)
        self.sensitivity = torch.bmm(d_state, self.sensitivity) + d_weight
        self.state = self.cell(self.state, weight_flat, x)

    def grad(self, v: torch.Tensor) -> torch.Tensor:
        n = self.learner.n_features
        return torch.einsum("bn,bnp->bp", v, self.sensitivity[:, :n])


def bench_case(streams: int, columns: int, inputs: int, seconds: float) -> dict[str, float]:
    x = torch.rand(streams, inputs)
    v = torch.rand(streams, columns)
    cumulant = torch.rand(streams, 1)

    learner = agentstate.make_learner(
        "columnar", inputs, streams=streams, n_features=columns, seed=0
    )

    def learner_step() -> None:
        learner.step(x)
        learner.grad(v)

    engine = TDPredictor(
        agentstate.make_learner("columnar", inputs, streams=streams, n_features=columns, seed=0),
        1,
        TDConfig(),
    )

    naive = NaiveColumnarRTRL(
        agentstate.make_learner("columnar", inputs, streams=streams, n_features=columns, seed=0)
    )

    def naive_step() -> None:
        naive.step(x)
        naive.grad(v)

    return {
        "learner_us": per_stream_step_us(learner_step, streams, seconds),
        "td_us": per_stream_step_us(lambda: engine.step(x, cumulant), streams, seconds),
        "naive_us": per_stream_step_us(naive_step, streams, seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print("| streams | columns | inputs | learner µs | TD step µs | naive µs | naive / learner |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for streams, columns, inputs in CASES:
        result = bench_case(streams, columns, inputs, args.seconds)
        rows.append({"streams": streams, "columns": columns, "inputs": inputs, **result})
        print(
            f"| {streams} | {columns} | {inputs} | {result['learner_us']:.2f} | "
            f"{result['td_us']:.2f} | {result['naive_us']:.2f} | "
            f"{result['naive_us'] / result['learner_us']:.1f}× |"
        )
    print(
        f"\nµs per stream-step, float32, {args.threads} thread(s), torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, {date.today()}"
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {"threads": args.threads, "torch": torch.__version__, "rows": rows},
                handle,
                indent=2,
            )


if __name__ == "__main__":
    main()
