"""Gradient diagnostics: a learner's online ``grad`` against exact BPTT through its own cell.

A learner (float64, parameters held fixed) steps through an input stream ``x: [T, B, d]``.
Next to it, an autograd oracle runs the learner's pure ``functional_step`` on the same inputs
and keeps the graph, so at step ``t`` the true gradient of ``v_b . h_b,t`` (one fixed random
``v_b`` per stream) is one backward pass through the whole history: full BPTT. Per checked
step the table holds, against that truth,

* ``cosine``: cosine similarity of ``grad(v)`` and the truth, mean over streams;
* ``relative_error``: ``|grad - truth| / |truth|`` (all parameters flattened), mean over streams;
* ``cosine_of_mean`` and ``relative_error_of_mean``: the same for the *stream-averaged*
  gradient, the direction a shared-parameter update takes. With identical streams (same
  inputs, same ``v``) the streams are independent draws of one estimator, so this measures
  bias: it tends to 1 for an unbiased estimator (UORO) and stays put for a biased one.

Cost: one backward per checked step, O(t) each, so O(T^2 / check_every) in all.

Learners whose network changes as they run (``ccn`` moves to a new stage and builds new
columns) are checked against the network *as it ran*: the oracle's step ``t`` is
``functional_step`` called right before ``learner.step(x_t)``, i.e. the network the step runs
(the stage, frozen columns and feature statistics of that moment; columns not built yet
output 0). A due stage change is made first, through the learner's public ``advance_stage()``,
exactly as ``step`` would at its start. When ``params`` is replaced (a new stage), the oracle
restarts from the carry of that moment: the new weights did not exist before, so the truth is
the gradient through everything since (``oracle_start`` in the table).

Example:
    >>> from agentstate.gradcheck import gradient_check
    >>> check = gradient_check("columnar", 20, input_size=3, streams=2, check_every=10)
    >>> check.steps.tolist(), bool(abs(check.cosine - 1).max() < 1e-12)
    ([10, 20], True)
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from torch import Tensor

from agentstate.learner import Carry, StateLearner
from agentstate.registry import make_learner

__all__ = [
    "BPTTOracle",
    "GradientCheck",
    "SweepCase",
    "gradient_check",
    "paper_sweep",
    "plot_gradient_checks",
    "run_sweep",
    "summary_markdown",
    "trace_patterning_inputs",
    "write_csv",
]

CSV_COLUMNS = (
    "label",
    "step",
    "cosine",
    "cosine_min",
    "relative_error",
    "cosine_of_mean",
    "relative_error_of_mean",
    "oracle_start",
)


class BPTTOracle:
    """Exact ``d(v_b . h_b,t) / d theta`` by autograd through ``functional_step``, step by step.

    The graph from the start carry to the latest step is kept; ``gradient`` back-propagates
    through all of it (``retain_graph``), so the oracle can be extended and queried again.
    Parameters are per-stream leaves ``[B, ...]`` (shared ``[1, ...]`` values are expanded),
    so the answer is one gradient per stream, like ``grad``.

    Args:
        learner: provides ``functional_step``; its ``params`` are the values differentiated.
        carry: the recurrent state entering the first step (treated as a constant).
    """

    def __init__(self, learner: StateLearner, carry: Carry) -> None:
        self.learner = learner
        self.source_params = dict(learner.params)
        streams = learner.streams
        self.leaves = {
            key: value.detach().expand(streams, *value.shape[1:]).clone().requires_grad_(True)
            for key, value in learner.params.items()
        }
        self.carry = tuple(part.detach() for part in carry)
        self.h: Tensor | None = None

    def tracks(self, params: Mapping[str, Tensor]) -> bool:
        """Whether ``params`` are the very tensors this oracle differentiates."""
        return params.keys() == self.source_params.keys() and all(
            params[key] is self.source_params[key] for key in params
        )

    def step(self, x: Tensor) -> None:
        """Extend the graph by one ``functional_step`` on ``x: [B, input_size]``."""
        self.carry, self.h = self.learner.functional_step(self.leaves, self.carry, x)

    def gradient(self, v: Tensor) -> dict[str, Tensor]:
        """Per-stream gradient of ``v_b . h_b`` at the latest step, ``v: [B, n_features]``.

        Returns:
            Same keys as the learner's ``params``, each ``[B, *param.shape[1:]]``.
        """
        if self.h is None:
            raise RuntimeError("BPTTOracle.gradient called before any step")
        leaves = list(self.leaves.values())
        gradients = torch.autograd.grad(
            (v * self.h).sum(), leaves, retain_graph=True, allow_unused=True
        )
        return {
            key: torch.zeros_like(leaf) if gradient is None else gradient
            for (key, leaf), gradient in zip(self.leaves.items(), gradients, strict=True)
        }


@dataclass
class GradientCheck:
    """Per checked step, how close ``grad`` is to the BPTT truth (the table of a check).

    Every array is ``[C]``, one entry per checked step.

    Attributes:
        label: what was checked (learner name and settings).
        steps: 1-based step index ``t`` (the learner has seen ``t`` inputs).
        cosine: cosine similarity of estimate and truth, mean over streams.
        cosine_min: its minimum over streams.
        relative_error: ``|estimate - truth| / |truth|``, mean over streams.
        cosine_of_mean: cosine of the stream-averaged estimate and stream-averaged truth.
        relative_error_of_mean: relative error of the stream-averaged estimate.
        oracle_start: step index from which the oracle differentiates (0 unless the
            learner replaced its ``params``, e.g. a new CCN stage).
    """

    label: str
    steps: np.ndarray
    cosine: np.ndarray
    cosine_min: np.ndarray
    relative_error: np.ndarray
    cosine_of_mean: np.ndarray
    relative_error_of_mean: np.ndarray
    oracle_start: np.ndarray

    def rows(self) -> Iterable[dict[str, Any]]:
        """One dict per checked step, keyed by ``CSV_COLUMNS``."""
        for index in range(len(self.steps)):
            yield {
                "label": self.label,
                "step": int(self.steps[index]),
                "cosine": float(self.cosine[index]),
                "cosine_min": float(self.cosine_min[index]),
                "relative_error": float(self.relative_error[index]),
                "cosine_of_mean": float(self.cosine_of_mean[index]),
                "relative_error_of_mean": float(self.relative_error_of_mean[index]),
                "oracle_start": int(self.oracle_start[index]),
            }

    def format_table(self, max_rows: int = 10) -> str:
        """The table as text, at most ``max_rows`` evenly spaced checked steps (last included)."""
        picked = np.unique(np.linspace(0, len(self.steps) - 1, min(max_rows, len(self.steps))))
        lines = [
            self.label,
            f"{'step':>7} {'cosine':>12} {'min cos':>12} {'rel.err':>9} "
            f"{'cos(mean)':>12} {'rel.err(mean)':>13}",
        ]
        for index in picked.astype(int):
            lines.append(
                f"{self.steps[index]:>7d} {self.cosine[index]:>12.9f} "
                f"{self.cosine_min[index]:>12.9f} {self.relative_error[index]:>9.2e} "
                f"{self.cosine_of_mean[index]:>12.9f} {self.relative_error_of_mean[index]:>13.2e}"
            )
        return "\n".join(lines)


def _flatten(gradients: Mapping[str, Tensor], keys: Sequence[str]) -> Tensor:
    """Concatenate every parameter's per-stream gradient: ``[B, total parameters]``."""
    return torch.cat([gradients[key].flatten(1) for key in keys], dim=1)


def _compare(estimate: Tensor, truth: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row cosine and relative error of ``estimate`` against ``truth``, both ``[R, P]``."""
    truth_norm = truth.norm(dim=1)
    cosine = (estimate * truth).sum(1) / (estimate.norm(dim=1) * truth_norm).clamp_min(1e-300)
    relative_error = (estimate - truth).norm(dim=1) / truth_norm.clamp_min(1e-300)
    return cosine, relative_error


def _start_due_stage(learner: StateLearner) -> None:
    """Make a staged learner's due stage change now, as its next ``step`` would at its start."""
    steps_per_stage = getattr(learner.config, "steps_per_stage", None)
    if steps_per_stage is not None and learner.steps_in_stage >= steps_per_stage:  # type: ignore[attr-defined]
        learner.advance_stage()  # type: ignore[attr-defined]


def trace_patterning_inputs(steps: int, streams: int, seed: int = 0) -> Tensor:
    """Observations of the trace-patterning benchmark (JMLR preset), float64.

    Args:
        steps: number of steps ``T``.
        streams: number of independent streams ``B``.
        seed: root seed of the environment.

    Returns:
        ``[T, B, 12]``.
    """
    env = gym.make_vec("agentstate/TracePatterning-v0", num_envs=streams)
    env.reset(seed=seed)
    trace_env: Any = env.unwrapped  # a TracePatterningVectorEnv: rollout() steps in bulk
    observations, _, _ = trace_env.rollout(steps)
    env.close()
    return torch.as_tensor(observations, dtype=torch.float64)


def gradient_check(
    learner_name: str,
    steps: int,
    *,
    input_size: int = 8,
    streams: int = 8,
    learner_kwargs: Mapping[str, Any] | None = None,
    seed: int = 0,
    inputs: Tensor | None = None,
    check_every: int = 1,
    identical_streams: bool = False,
    independent_params: bool = False,
    label: str | None = None,
) -> GradientCheck:
    """Run a learner next to exact BPTT and compare ``grad`` with the truth every few steps.

    Args:
        learner_name: registered learner name.
        steps: number of steps ``T``.
        input_size: size ``d`` of each input.
        streams: number of streams ``B``.
        learner_kwargs: the learner's keyword arguments.
        seed: seeds the learner's initialisation, the random inputs and ``v``.
        inputs: ``[T, B, d]`` input stream (float64); None draws ``N(0, 1)`` inputs.
        check_every: compare at every ``check_every``-th step (and at the last one).
        identical_streams: every stream gets the same random inputs and the same ``v``, so
            with shared parameters the streams are independent draws of one estimator
            (with ``inputs`` given, only ``v`` is shared).
        independent_params: one network per stream instead of one shared network.
        label: the table's label; None writes the learner name and its kwargs.

    Returns:
        The table of the check.

    Raises:
        ValueError: on a bad ``steps``/``check_every`` or an ``inputs`` of the wrong shape.
    """
    if steps < 1 or check_every < 1:
        raise ValueError(f"steps and check_every must be >= 1, got {steps} and {check_every}")
    learner_kwargs = dict(learner_kwargs or {})
    learner = make_learner(
        learner_name,
        input_size,
        streams=streams,
        independent_params=independent_params,
        dtype=torch.float64,
        seed=seed,
        **learner_kwargs,
    )
    generator = torch.Generator().manual_seed(seed)
    drawn_streams = 1 if identical_streams else streams
    if inputs is None:
        inputs = torch.randn(
            steps, drawn_streams, input_size, generator=generator, dtype=torch.float64
        ).expand(steps, streams, input_size)
    elif tuple(inputs.shape) != (steps, streams, input_size):
        raise ValueError(
            f"inputs must have shape [steps, streams, input_size] = "
            f"{[steps, streams, input_size]}, got {list(inputs.shape)}"
        )
    inputs = inputs.to(torch.float64)
    v = torch.randn(
        drawn_streams, learner.n_features, generator=generator, dtype=torch.float64
    ).expand(streams, -1)

    columns: dict[str, list[float]] = {name: [] for name in CSV_COLUMNS[1:]}
    oracle: BPTTOracle | None = None
    oracle_start = 0
    for t in range(steps):
        _start_due_stage(learner)
        if oracle is None or not oracle.tracks(learner.params):
            oracle, oracle_start = BPTTOracle(learner, learner.carry), t
        oracle.step(inputs[t])
        learner.step(inputs[t])
        if (t + 1) % check_every and t != steps - 1:
            continue
        keys = sorted(learner.params)
        truth = _flatten(oracle.gradient(v), keys)
        estimate = _flatten(learner.grad(v), keys)
        cosine, relative_error = _compare(estimate, truth)
        cosine_of_mean, relative_error_of_mean = _compare(
            estimate.mean(0, keepdim=True), truth.mean(0, keepdim=True)
        )
        for name, value in (
            ("step", t + 1),
            ("cosine", cosine.mean()),
            ("cosine_min", cosine.min()),
            ("relative_error", relative_error.mean()),
            ("cosine_of_mean", cosine_of_mean[0]),
            ("relative_error_of_mean", relative_error_of_mean[0]),
            ("oracle_start", oracle_start),
        ):
            columns[name].append(float(value))
    if label is None:
        settings = ", ".join(f"{key}={value}" for key, value in learner_kwargs.items())
        label = f"{learner_name} ({settings})" if settings else learner_name
    return GradientCheck(
        label=label,
        steps=np.array(columns["step"], dtype=int),
        cosine=np.array(columns["cosine"]),
        cosine_min=np.array(columns["cosine_min"]),
        relative_error=np.array(columns["relative_error"]),
        cosine_of_mean=np.array(columns["cosine_of_mean"]),
        relative_error_of_mean=np.array(columns["relative_error_of_mean"]),
        oracle_start=np.array(columns["oracle_start"], dtype=int),
    )


def write_csv(checks: Sequence[GradientCheck], path: str | Path) -> Path:
    """Write every check's rows (``CSV_COLUMNS``) to one CSV file; return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for check in checks:
            for row in check.rows():
                writer.writerow(
                    {
                        key: f"{value:.10g}" if isinstance(value, float) else value
                        for key, value in row.items()
                    }
                )
    return path


def summary_markdown(checks: Sequence[GradientCheck]) -> str:
    """One markdown row per check: its curves summarised over all checked steps.

    Columns: mean and worst cosine, mean relative error, mean cosine of the stream-averaged
    gradient.
    """
    lines = [
        "| setting | cosine (mean over steps) | worst cosine | relative error (mean) | "
        "cosine of the stream mean |",
        "|---|---|---|---|---|",
    ]
    for check in checks:
        lines.append(
            f"| {check.label} | {check.cosine.mean():.4f} | {check.cosine_min.min():.4f} | "
            f"{check.relative_error.mean():.1e} | {check.cosine_of_mean.mean():.3f} |"
        )
    return "\n".join(lines)


def plot_gradient_checks(
    checks: Sequence[GradientCheck],
    path: str | Path,
    *,
    title: str,
    mean_curves: Sequence[str] = (),
) -> Path:
    """Cosine, 1 - cosine and relative error against the step, one line per check.

    The two right panels are log-scaled, so exact rules (~1e-16) and approximate ones
    (1e-3 .. 1) are told apart at a glance.

    Args:
        checks: the tables to draw (at most 20 get distinct colours).
        path: PNG file to write (parent folders are created).
        title: figure title.
        mean_curves: labels of checks whose stream-averaged curves (``cosine_of_mean``,
            ``relative_error_of_mean``) are drawn too, dashed.

    Returns:
        The path written.
    """
    figure = Figure(figsize=(17, 5.5), layout="constrained")
    cosine_axes, gap_axes, error_axes = figure.subplots(1, 3)
    colours = colormaps["tab20"]  # a listed map: colours(i) is its i-th of 20 colours
    for index, check in enumerate(checks):
        curves = [(check.label, check.cosine, check.relative_error, "-")]
        if check.label in mean_curves:
            curves.append(
                (
                    f"{check.label}: stream mean",
                    check.cosine_of_mean,
                    check.relative_error_of_mean,
                    "--",
                )
            )
        for label, cosine, relative_error, linestyle in curves:
            style = {"color": colours(index % colours.N), "linestyle": linestyle}
            cosine_axes.plot(check.steps, cosine, label=label, **style)
            gap_axes.plot(check.steps, np.clip(1 - cosine, 1e-17, None), **style)
            error_axes.plot(check.steps, relative_error, **style)
    cosine_axes.set_ylabel("cosine(grad, BPTT), mean over streams")
    gap_axes.set_ylabel("1 - cosine (floored at 1e-17)")
    error_axes.set_ylabel("|grad - BPTT| / |BPTT|, mean over streams")
    for axes in (gap_axes, error_axes):
        axes.set_yscale("log")
    for axes in (cosine_axes, gap_axes, error_axes):
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
    figure.legend(loc="outside right center", fontsize="small")
    figure.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, format="png")
    return path


@dataclass(frozen=True)
class SweepCase:
    """One curve of the sweep: a learner, its kwargs and how its streams are drawn."""

    label: str
    learner: str
    learner_kwargs: dict[str, Any] = field(default_factory=dict)
    streams: int | None = None
    """Streams of this case; None: the sweep's default."""
    identical_streams: bool = False
    """Same inputs and ``v`` on every stream (draws of one estimator; see ``gradient_check``)."""


def paper_sweep(steps: int, units: int = 15) -> list[SweepCase]:
    """The comparisons of 2103.05787's synthetic test-bed, on this package's learners.

    The paper's own network sizes and input process are not reproduced; what is: one random
    input stream, fixed random networks, and each rule's gradient against the true one.
    Exact rules (columnar, CCN within its stages, eLSTM, full RTRL, SnAp-1 without
    connections, T-BPTT with ``k >= T``), SnAp-1 as the connection density grows, T-BPTT with
    short windows, and UORO as independent draws whose stream mean is also drawn.

    Args:
        steps: the sweep's length ``T`` (sets the T-BPTT window ``k = T`` and CCN's stages:
            three of ``T // 3`` steps).
        units: state size of every learner.

    Returns:
        The cases, in plotting order.
    """
    dense = {"n_features": units}
    return [
        SweepCase(f"columnar {units}", "columnar", dense),
        SweepCase(
            f"ccn {units}:{units // 3} (3 stages)",
            "ccn",
            {
                "n_features": units // 3 * 3,
                "columns_per_stage": units // 3,
                "steps_per_stage": max(1, steps // 3),
            },
        ),
        SweepCase(f"elstm {units}", "elstm", dense),
        SweepCase(f"rtrl {units} (dense)", "rtrl", dense),
        *(
            SweepCase(
                f"snap1 density {density:g}", "snap1", {**dense, "connection_density": density}
            )
            for density in (0.0, 0.1, 0.5, 1.0)
        ),
        *(
            SweepCase(f"tbptt k={window}", "tbptt", {**dense, "truncation": window})
            for window in (1, 2, 4)
        ),
        SweepCase("tbptt k=T", "tbptt", {**dense, "truncation": steps}),
        *(
            SweepCase(f"uoro {units}, {draws} draws", "uoro", dense, draws, identical_streams=True)
            for draws in (32, 512)
        ),
    ]


def run_sweep(
    cases: Sequence[SweepCase],
    *,
    steps: int,
    streams: int = 8,
    input_size: int = 8,
    check_every: int = 5,
    seed: int = 0,
) -> list[GradientCheck]:
    """Run ``gradient_check`` for every case on the same kind of random input stream.

    Args:
        cases: what to check (e.g. ``paper_sweep(steps)``).
        steps: steps ``T`` of every check.
        streams: streams of a case that does not set its own.
        input_size: size of the ``N(0, 1)`` inputs.
        check_every: compare every ``check_every``-th step.
        seed: seed of every check (same network initialisation for the dense learners).

    Returns:
        One table per case, in order.
    """
    return [
        gradient_check(
            case.learner,
            steps,
            input_size=input_size,
            streams=case.streams or streams,
            learner_kwargs=case.learner_kwargs,
            seed=seed,
            check_every=check_every,
            identical_streams=case.identical_streams,
            label=case.label,
        )
        for case in cases
    ]
