"""The JMLR 2023 comparison on trace patterning, at the step budget one shared CPU affords.

Learners (Javed, Shah, Sutton, White 2023, Fig. "trace patterning"):

* ``columnar 7:7``       ``columnar``, 7 columns;
* ``CCN 20:4``           ``ccn``, 20 columns in stages of 4, ``steps / 5`` steps per stage;
* ``constructive 10:1``  ``ccn``, 10 columns built one at a time, ``steps / 10`` per stage;
* ``T-BPTT 15, k=4``     ``tbptt``, dense LSTM, 15 units, window 4;
* ``UORO``               ``uoro``, dense LSTM sized for the same per-step compute as T-BPTT.

Matching UORO's compute: a FLOP model of both rules as this package implements them
(``dense_rule_flops``; counted from the code of ``plugins/tbptt.py`` and ``plugins/uoro.py``)
picks the UORO size whose FLOPs per stream-step are closest to T-BPTT's, and the script also
measures µs per stream-step of ``step`` + ``grad`` with 256 streams (where tensor work, not
Python overhead, dominates) for every learner, written next to the table.

Every run is ``agentstate.experiment.run_experiment`` on ``trace-patterning`` (JMLR preset,
gamma 0.9, lambda 0.99, the authors' ``rmsprop_td`` optimiser) with ``--seeds`` independent
networks as the streams of one process. A short pilot over ``--step-sizes`` picks each
learner's step size by area under its MSRE curve; the main runs use it for ``--steps``.

Outputs in ``--out`` (default ``benchmarks/results/paper_comparison``): ``runs/<run>/`` (each
run's ``metrics.csv``, ``config.json``), ``msre_table.md`` and ``results.json`` (final and
area-under-curve MSRE, mean ± standard error over seeds, final MSRE / predict-zero paired per
seed, the paper's reference points, compute matching), ``msre_curves.png`` (MSRE) and
``msre_ratio_curves.png`` (MSRE / predict-zero per seed).

Run: ``python benchmarks/paper_comparison.py [--steps 300000] [--seeds 8] [--pilot-steps 20000]``.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

import agentstate
from agentstate.experiment import ENV_ALIASES, RunConfig, run_experiment
from agentstate.metrics import mean_and_standard_error
from agentstate.plotting import format_step_count, plot_learning_curve

OBSERVATION_SIZE = 12  # trace patterning, JMLR preset
TBPTT_UNITS, TBPTT_WINDOW = 15, 4

PAPER_PREDICT_ZERO = 0.019
"""MSRE of predicting 0 on the JMLR preset, as the paper reports it (background §4)."""


@dataclass(frozen=True)
class Contender:
    """One learner of the comparison."""

    label: str
    learner: str
    learner_kwargs: dict[str, Any] = field(default_factory=dict)
    paper_msre: float | None = None
    """Final MSRE the JMLR paper reports after 10M steps (background §4), if it does."""


def dense_rule_flops(rule: str, units: int, inputs: int, window: int = TBPTT_WINDOW) -> int:
    """FLOPs per stream-step (``step`` + one ``grad``) of a dense-LSTM rule, as implemented.

    With ``D = inputs + units + 1`` and ``P = 4 units D`` weights (a multiply-add is 2 FLOPs;
    O(units) element-wise terms are left out):

    * forward ``W z``: ``2P``; state Jacobian ``d(h, c)_t/d(h, c)_t-1``: ``14 n^2``;
    * T-BPTT: forward, then per window step the parameter VJP (outer product + accumulate,
      ``2P``), the state Jacobian and its transpose applied to the adjoints (``14 n^2 + 4 n^2``):
      ``2P + k (2P + 18 n^2)``;
    * UORO: forward, state Jacobian + JVP of the state tangent (``18 n^2``), parameter VJP of
      the noise (``P``), two norms of weight-sized tensors (``4P``), the tangent update
      (``3P``), ``grad`` (``P``): ``11P + 18 n^2``.

    Args:
        rule: ``"tbptt"`` or ``"uoro"``.
        units: LSTM units ``n``.
        inputs: input size ``d``.
        window: T-BPTT's ``k``.

    Returns:
        FLOPs per stream-step.
    """
    weights = 4 * units * (inputs + units + 1)
    state_jacobian = 18 * units * units
    if rule == "tbptt":
        return 2 * weights + window * (2 * weights + state_jacobian)
    if rule == "uoro":
        return 11 * weights + state_jacobian
    raise ValueError(f"no FLOP model for rule {rule!r}")


def uoro_units_matching_tbptt() -> int:
    """UORO size whose FLOPs per step are closest to T-BPTT's (15 units, k = 4)."""
    target = dense_rule_flops("tbptt", TBPTT_UNITS, OBSERVATION_SIZE)
    return min(
        range(1, 64),
        key=lambda units: abs(dense_rule_flops("uoro", units, OBSERVATION_SIZE) - target),
    )


def contenders(steps: int, uoro_units: int) -> list[Contender]:
    """The five learners; CCN stage lengths scale with ``steps`` as the paper's 10M did."""
    return [
        Contender("columnar 7:7", "columnar", {"n_features": 7}, paper_msre=0.015),
        Contender(
            "CCN 20:4",
            "ccn",
            {"n_features": 20, "columns_per_stage": 4, "steps_per_stage": max(1, steps // 5)},
            paper_msre=0.004,
        ),
        Contender(
            "constructive 10:1",
            "ccn",
            {"n_features": 10, "columns_per_stage": 1, "steps_per_stage": max(1, steps // 10)},
        ),
        Contender(
            f"T-BPTT {TBPTT_UNITS}, k={TBPTT_WINDOW}",
            "tbptt",
            {"n_features": TBPTT_UNITS, "truncation": TBPTT_WINDOW},
            paper_msre=0.018,
        ),
        Contender(f"UORO {uoro_units}", "uoro", {"n_features": uoro_units}),
    ]


def measured_us_per_stream_step(contender: Contender, streams: int = 256) -> float:
    """Median µs per stream-step of ``step`` + ``grad`` over 3 repeats (float32, last stage)."""
    kwargs = dict(contender.learner_kwargs)
    if "steps_per_stage" in kwargs:
        kwargs["steps_per_stage"] = 10**9  # stages are entered by hand below
    learner = agentstate.make_learner(
        contender.learner,
        OBSERVATION_SIZE,
        streams=streams,
        independent_params=True,
        seed=0,
        **kwargs,
    )
    advance_stage = getattr(learner, "advance_stage", None)
    while advance_stage is not None and advance_stage():
        pass  # time the largest network a constructive learner reaches
    x = torch.rand(streams, OBSERVATION_SIZE)
    v = torch.ones(streams, learner.n_features)
    for _ in range(10):
        learner.step(x)
        learner.grad(v)
    timings = []
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(50):
            learner.step(x)
            learner.grad(v)
        timings.append((time.perf_counter() - started) / 50 / streams * 1e6)
    return float(np.median(timings))


def run_name(contender: Contender, step_size: float, phase: str) -> str:
    """Folder name of one run, e.g. ``main-ccn-20-4-lr0.01``."""
    slug = "".join(ch if ch.isalnum() else "-" for ch in contender.label.lower()).strip("-")
    return f"{phase}-{'-'.join(part for part in slug.split('-') if part)}-lr{step_size:g}"


def read_curves(metrics_csv: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(steps [N], msre [N, seeds], msre_zero [N])`` from a run's ``metrics.csv``."""
    with metrics_csv.open() as handle:
        rows = list(csv.DictReader(handle))
    stream_columns = [key for key in rows[0] if key.startswith("msre_") and key[5:].isdigit()]
    steps = np.array([int(row["step"]) for row in rows])
    msre = np.array([[float(row[key]) for key in stream_columns] for row in rows])
    zero = np.array([float(row["msre_zero"]) for row in rows])
    return steps, msre, zero


def predict_zero_curves(steps: int, seeds: int, window: int, log_steps: np.ndarray) -> np.ndarray:
    """Sliding MSRE of predicting 0 per seed at every log point: ``[log points, seeds]``.

    ``metrics.csv`` keeps only its mean over streams; every run sees the same env streams
    (same seed, and the env does not depend on the learner), so they are replayed here.
    """
    env = gym.make_vec(ENV_ALIASES["trace-patterning"], num_envs=seeds)
    _, info = env.reset(seed=0)
    trace_env: Any = env.unwrapped
    _, _, later_targets = trace_env.rollout(steps - 1)
    env.close()
    targets = np.concatenate([np.asarray(info["return_target"])[None], later_targets])
    cumulative = np.concatenate([np.zeros((1, seeds)), np.cumsum(targets**2, axis=0)])
    window_start = np.maximum(log_steps - window, 0)
    counts = (log_steps - window_start)[:, None]
    return (cumulative[log_steps] - cumulative[window_start]) / counts


def summarise(msre: np.ndarray, zero: np.ndarray, zero_per_seed: np.ndarray) -> dict[str, float]:
    """Final and area-under-curve MSRE, mean ± s.e. over seeds, and final / predict-zero.

    Args:
        msre: ``[log points, seeds]`` sliding MSRE.
        zero: ``[log points]`` sliding MSRE of predicting 0 (mean over seeds).
        zero_per_seed: ``[log points, seeds]`` the same per seed; the ratio
            ``final / predict-zero`` is paired per seed, so the trial-to-trial variation of
            the env (most of the s.e. of the final MSRE) cancels.

    Returns:
        ``final``, ``auc`` (mean over log points), ``final_ratio`` with their ``*_se``, and
        predict-zero's ``final_zero`` and ``auc_zero``.
    """
    if not np.allclose(zero_per_seed.mean(1), zero, rtol=1e-6):
        raise RuntimeError(
            "the replayed predict-zero MSRE differs from the run's: the env no longer "
            "replays identically"
        )
    final_mean, final_se = mean_and_standard_error(msre[-1:])
    auc_mean, auc_se = mean_and_standard_error(msre.mean(0, keepdims=True))
    ratio_mean, ratio_se = mean_and_standard_error((msre[-1] / zero_per_seed[-1])[None])
    return {
        "final": float(final_mean[0]),
        "final_se": float(final_se[0]),
        "auc": float(auc_mean[0]),
        "auc_se": float(auc_se[0]),
        "final_ratio": float(ratio_mean[0]),
        "final_ratio_se": float(ratio_se[0]),
        "final_zero": float(zero[-1]),
        "auc_zero": float(zero.mean()),
    }


def run(
    contender: Contender, step_size: float, steps: int, seeds: int, out: Path, phase: str
) -> dict[str, Any]:
    """One run through the experiment runner; returns its curves and summary."""
    window = min(10_000, steps // 5)
    config = RunConfig(
        env="trace-patterning",
        learner=contender.learner,
        steps=steps,
        streams=seeds,
        independent=True,
        seed=0,
        step_size=step_size,
        optimizer="rmsprop_td",
        msre_window=window,
        log_every=max(1, steps // 100),
        learner_kwargs=contender.learner_kwargs,
    )
    folder = out / "runs" / run_name(contender, step_size, phase)
    started = time.perf_counter()
    result = run_experiment(config, folder, progress=False)
    elapsed = time.perf_counter() - started
    (folder / "learning_curve.png").unlink(missing_ok=True)  # the comparison plot has them all
    log_steps, msre, zero = read_curves(folder / "metrics.csv")
    zero_per_seed = predict_zero_curves(steps, seeds, window, log_steps)
    summary = summarise(msre, zero, zero_per_seed)
    print(
        f"  {phase:5s} {contender.label:18s} lr {step_size:<6g} final {summary['final']:.5f} "
        f"± {summary['final_se']:.5f} ({summary['final_ratio']:.3f} of zero)  "
        f"auc {summary['auc']:.5f}  zero {summary['final_zero']:.5f}  "
        f"{elapsed:5.0f} s ({result.steps_per_second:,.0f} steps/s)",
        flush=True,
    )
    return {
        "label": contender.label,
        "paper_msre": contender.paper_msre,
        "step_size": step_size,
        "steps": log_steps,
        "msre": msre,
        "zero": zero,
        "ratio": msre / zero_per_seed,
        "summary": summary,
        "seconds": elapsed,
        "folder": str(folder),
    }


def markdown_table(
    results: list[dict[str, Any]], pilot: dict[str, dict[float, float]], steps: int, seeds: int
) -> str:
    """The MSRE table as markdown (one row per learner, predict-zero last)."""
    lines = [
        f"Trace patterning (JMLR preset), {format_step_count(steps)} steps, {seeds} seeds "
        "(mean ± s.e.); AUC = mean of the sliding MSRE over the run's log points.",
        "",
        "| learner | step size (pilot AUC per step size) | final MSRE | final / predict-zero "
        "(paired) | AUC MSRE | paper, 10M steps |",
        "|---|---|---|---|---|---|",
    ]
    for result in results:
        summary = result["summary"]
        pilot_text = ", ".join(
            f"{size:g}: {value:.4f}" for size, value in pilot.get(result["label"], {}).items()
        )
        reference = result["paper_msre"]
        lines.append(
            f"| {result['label']} | {result['step_size']:g} ({pilot_text}) | "
            f"{summary['final']:.4f} ± {summary['final_se']:.4f} | "
            f"{summary['final_ratio']:.3f} ± {summary['final_ratio_se']:.3f} | "
            f"{summary['auc']:.4f} ± {summary['auc_se']:.4f} | "
            f"{'' if reference is None else f'≈ {reference:g}'} |"
        )
    zero = results[0]["summary"]
    lines.append(
        f"| predict zero | – | {zero['final_zero']:.4f} | 1 | {zero['auc_zero']:.4f} | "
        f"≈ {PAPER_PREDICT_ZERO:g} |"
    )
    return "\n".join(lines)


def main() -> None:
    """Pilot the step sizes, run the comparison, write the table, JSON and plot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300_000, help="steps of each main run")
    parser.add_argument("--seeds", type=int, default=8, help="independent networks (streams)")
    parser.add_argument("--step-sizes", type=float, nargs="+", default=[0.001, 0.003, 0.01])
    parser.add_argument(
        "--pilot-steps", type=int, default=20_000, help="steps of each pilot run (0: no pilot)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", default="benchmarks/results/paper_comparison")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    uoro_units = uoro_units_matching_tbptt()
    learners = contenders(args.steps, uoro_units)
    compute = {
        "flops_per_stream_step": {
            f"T-BPTT {TBPTT_UNITS}, k={TBPTT_WINDOW}": dense_rule_flops(
                "tbptt", TBPTT_UNITS, OBSERVATION_SIZE
            ),
            f"UORO {uoro_units}": dense_rule_flops("uoro", uoro_units, OBSERVATION_SIZE),
        },
        "us_per_stream_step_256_streams": {
            contender.label: measured_us_per_stream_step(contender) for contender in learners
        },
    }
    print("compute per stream-step:", json.dumps(compute, indent=1), flush=True)

    pilot: dict[str, dict[float, float]] = {}
    chosen: dict[str, float] = {}
    for contender in learners:
        if args.pilot_steps and len(args.step_sizes) > 1:
            pilot_contender = contenders(args.pilot_steps, uoro_units)[learners.index(contender)]
            pilot[contender.label] = {
                size: run(pilot_contender, size, args.pilot_steps, args.seeds, out, "pilot")[
                    "summary"
                ]["auc"]
                for size in args.step_sizes
            }
            chosen[contender.label] = min(pilot[contender.label], key=pilot[contender.label].get)
        else:
            chosen[contender.label] = args.step_sizes[0]
    print(f"pilot done after {time.perf_counter() - started:.0f} s; step sizes {chosen}")

    results = [
        run(contender, chosen[contender.label], args.steps, args.seeds, out, "main")
        for contender in learners
    ]
    table = markdown_table(results, pilot, args.steps, args.seeds)
    (out / "msre_table.md").write_text(table + "\n")
    print(table)
    steps = results[0]["steps"]
    plot_learning_curve(
        steps,
        {f"{result['label']} (lr {result['step_size']:g})": result["msre"] for result in results},
        out / "msre_curves.png",
        title=f"Trace patterning (JMLR preset): {args.seeds} seeds per learner, "
        f"{format_step_count(args.steps)} steps",
        ylabel=f"MSRE (sliding mean over {min(10_000, args.steps // 5):,} steps)",
        reference_lines={"predict zero": results[0]["zero"]},
    )
    plot_learning_curve(
        steps,
        {f"{result['label']} (lr {result['step_size']:g})": result["ratio"] for result in results},
        out / "msre_ratio_curves.png",
        title="Trace patterning: MSRE / MSRE of predicting 0, paired per seed",
        ylabel="MSRE / predict-zero MSRE (same sliding window, same seed)",
        reference_lines={"predict zero": 1.0},
    )
    total = time.perf_counter() - started
    (out / "results.json").write_text(
        json.dumps(
            {
                "command": "python benchmarks/paper_comparison.py "
                f"--steps {args.steps} --seeds {args.seeds} --step-sizes "
                f"{' '.join(f'{size:g}' for size in args.step_sizes)} "
                f"--pilot-steps {args.pilot_steps}",
                "wall_clock_seconds": round(total),
                "machine": f"{platform.processor() or platform.machine()}, torch "
                f"{torch.__version__}, {args.threads} thread(s), shared with other jobs",
                "paper_predict_zero": PAPER_PREDICT_ZERO,
                "compute_matching": compute,
                "pilot_auc": {
                    label: {f"{k:g}": v for k, v in by_size.items()}
                    for label, by_size in pilot.items()
                },
                "results": [
                    {
                        key: result[key]
                        for key in (
                            "label",
                            "paper_msre",
                            "step_size",
                            "summary",
                            "seconds",
                            "folder",
                        )
                    }
                    for result in results
                ],
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}/msre_table.md, results.json and two plots in {total:.0f} s")


if __name__ == "__main__":
    main()
