"""Speed of the TD(lambda) step, every case side by side in one process (``agentstate bench``).

All times are µs per *stream-step* (one call's time divided by its streams) of a full
``TDPredictor.step`` -- input normalisation, the learner's step and credit assignment, heads,
TD error, optimiser (``rmsprop_td``) and traces -- in float32 on one CPU thread. Each time is
the minimum over many ~2 ms windows (the machine may be shared: the minimum is the run
least disturbed), with the implementations measured alternately in rounds.

* ``cases``: the speed targets, for the fused kernel (``agentstate.fused``), the eager
  torch reference, and -- for the small columnar cases -- a naive eager RTRL that takes the
  cell's Jacobians from autograd every step (``NaiveColumnarRTRL``);
* ``bandwidth``: the STREAM triad ``a = b + s c`` (torch, one thread, 128 MB arrays, counted
  as 3 transfers of 4 bytes per element as STREAM does), timed in turns with the large
  columnar steps so that both see the same machine, and the fraction of it those steps reach
  by the bytes they must move (``columnar_step_bytes``);
* ``scaling``: per-step cost from ~1e3 to ~1e6 parameters per network, with the fitted
  log-log slope (cost ~ parameters^slope), for columnar, CCN, SnAp-1, eLSTM, UORO and T-BPTT
  (against its hidden units, where the theory says 2);
* ``actor_critic``: the streaming actor-critic's learning step (``agentstate.rl``), env
  excluded, against the fused TD step of the same learner (same core, float64 as the agent
  runs), side by side; target: at most ``ACTOR_CRITIC_TARGET`` times the TD step;
* ``threads``: the fused kernel on every core (``torch.set_num_threads(cores)``) against one,
  side by side, for the large cases and the scaling runs: the second core is used where a
  step is big enough to pay for a thread (``agentstate.fused.PARALLEL_GRAIN``).
"""

from __future__ import annotations

import itertools
import math
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import date
from typing import Any

import numpy as np
import torch
from torch import Tensor

from agentstate.learner import Carry, StateLearner
from agentstate.registry import make_learner
from agentstate.td import TDConfig, TDPredictor

INPUTS = 12
"""Observation size of the trace-patterning benchmark (and of the scaling runs)."""


@dataclass(frozen=True)
class Case:
    """One row of the targets table."""

    label: str
    learner: str
    streams: int
    input_size: int
    options: dict[str, Any]
    target_us: float | None = None
    """µs per stream-step to reach (None: the bandwidth cases, judged in their own table)."""
    authors_us: float | None = None
    """The authors' single-threaded C++ per step (background §2), for comparison."""
    naive: bool = False
    """Also time ``NaiveColumnarRTRL`` (small columnar cases: it is O(params x state))."""
    last_stage: bool = False
    """CCN: measure with every stage built (the most expensive stage)."""


CASES = (
    Case("columnar (1, 7, 12)", "columnar", 1, 12, {"n_features": 7}, 20.0, 3.7, naive=True),
    Case("columnar (32, 7, 12)", "columnar", 32, 12, {"n_features": 7}, 1.8, 3.7, naive=True),
    Case(
        "CCN 20:4 (32 streams)",
        "ccn",
        32,
        12,
        {"n_features": 20, "columns_per_stage": 4, "steps_per_stage": 10**12},
        2.8,
        5.7,
        last_stage=True,
    ),
    Case("columnar (32, 6, 275)", "columnar", 32, 275, {"n_features": 6}, 6.0, 51.0, naive=True),
    Case("T-BPTT 15, k=4 (32 streams)", "tbptt", 32, 12, {"n_features": 15}, 15.0, 15.0),
    Case("columnar (8, 256, 275)", "columnar", 8, 275, {"n_features": 256}),
    Case("columnar (32, 256, 275)", "columnar", 32, 275, {"n_features": 256}),
)
BANDWIDTH_TARGET = 0.6
"""Fraction of the triad bandwidth the large columnar step must reach."""


@dataclass(frozen=True)
class Scaling:
    """One learner's scaling run: networks of ~1e3, 1e4, 1e5, 1e6 parameters."""

    option: str
    """The size knob (a learner option)."""
    sizes: tuple[int, ...]
    fixed: dict[str, Any] = field(default_factory=dict)
    input_size: int = INPUTS
    quadratic_in_size: bool = False
    """Judge the slope against ``sizes`` (target 2) rather than against parameters."""


SCALING: dict[str, Scaling] = {
    "columnar": Scaling("n_features", (18, 179, 1786, 17857)),
    "ccn": Scaling("columns_per_stage", (3, 12, 46, 155), {"steps_per_stage": 10**12}),
    "snap1": Scaling("n_features", (10, 44, 152, 494), {"connection_density": 0.1}),
    "elstm": Scaling("n_features", (17, 81, 296, 980)),
    "uoro": Scaling("n_features", (10, 44, 152, 494)),
    # T-BPTT costs O(k n (n + d)) per step: quadratic in its hidden units n once n >> d, so
    # its inputs are few (2) and n runs 15..499 for ~1e3..1e6 parameters.
    "tbptt": Scaling("n_features", (15, 49, 157, 499), {"truncation": 4}, 2, True),
}
CCN_STAGES = 5
"""CCN scaling: ``n_features = 5 columns_per_stage``, measured in the last stage."""
SCALING_STREAMS = 32
LINEAR_SLOPE = (0.9, 1.1)
QUADRATIC_SLOPE = (1.8, 2.2)
"""T-BPTT's slope against its hidden units (2 x the linear band)."""


@dataclass(frozen=True)
class ActorCriticCase:
    """One row of the actor-critic table: a core, its options and the envs (streams)."""

    label: str
    learner: str
    streams: int
    options: dict[str, Any]
    last_stage: bool = False


ACTOR_CRITIC_OBSERVATION = 12
ACTOR_CRITIC_ACTIONS = 2
"""The agent's observation size and discrete actions: the core reads 12 + 2 inputs."""
ACTOR_CRITIC_TARGET = 2.0
"""The actor-critic step may cost at most this many fused TD steps of the same core."""
CCN_20_4 = {"n_features": 20, "columns_per_stage": 4, "steps_per_stage": 10**12}
ACTOR_CRITIC_CASES = tuple(
    ActorCriticCase(f"{name} ({streams} streams)", learner, streams, options, learner == "ccn")
    for name, learner, options in (
        ("columnar 7", "columnar", {"n_features": 7}),
        ("CCN 20:4", "ccn", CCN_20_4),
        ("eLSTM 8", "elstm", {"n_features": 8}),
        ("RTU 8 units", "rtu", {"n_features": 16}),
    )
    for streams in (1, 32)
)


# ---------------------------------------------------------------------- timing
def time_side_by_side(
    steps: Mapping[str, Callable[[], Any]], budget: float, window: float = 0.002, rounds: int = 3
) -> dict[str, float]:
    """Seconds per call of each step: the minimum over windows of ~``window`` seconds.

    The steps take turns for ``rounds`` rounds of ``budget / rounds`` seconds each, so a
    slow spell of a shared machine hits them all alike. Every step runs at least 2 windows.
    """
    calls_per_window = {}
    for name, step in steps.items():
        step()  # warm-up: first-use costs (allocation, binding) are not per-step costs
        start = time.perf_counter()
        step()
        calls_per_window[name] = max(1, int(window / max(time.perf_counter() - start, 1e-9)))
    best = dict.fromkeys(steps, math.inf)
    for _ in range(rounds):
        for name, step in steps.items():
            calls = calls_per_window[name]
            end, windows = time.perf_counter() + budget / rounds / len(steps), 0
            while windows < 2 or time.perf_counter() < end:
                start = time.perf_counter()
                for _ in range(calls):
                    step()
                best[name] = min(best[name], (time.perf_counter() - start) / calls)
                windows += 1
    return best


def td_step(predictor: TDPredictor, seed: int = 0, pool: int = 64) -> Callable[[], Tensor]:
    """A closure stepping ``predictor`` on a cycle of ``pool`` pre-drawn sparse observations."""
    learner = predictor.learner
    generator = torch.Generator().manual_seed(seed)
    shape = (pool, learner.streams, learner.input_size)
    observations = (torch.rand(shape, generator=generator) < 0.3).to(learner.dtype)
    cumulants = torch.rand(pool, learner.streams, predictor.n_cumulants, generator=generator)
    cumulants = cumulants.to(learner.dtype)
    # One tensor per step, made up front: indexing a [pool, B, d] tensor costs a few µs per
    # call, which would be timed as if it were the engine's.
    inputs = itertools.cycle(list(zip(observations.unbind(0), cumulants.unbind(0), strict=True)))

    def step() -> Tensor:
        observation, cumulant = next(inputs)
        return predictor.step(observation, cumulant)

    return step


# ---------------------------------------------------------------------- the naive reference
class NaiveColumnarRTRL(StateLearner):
    """Exact RTRL for a columnar network the obvious way: autograd Jacobians every step.

    ``S_t = (d s_t / d s_t-1) S_t-1 + d s_t / d W`` over the whole state ``s = (h, c)`` and
    every weight, with both Jacobians from ``torch.func.jacrev`` of the cell, vmapped over the
    streams: what one writes without deriving the columnar update by hand. Shared parameters
    only. Sensitivity ``[B, 2n, params]``.
    """

    name = "naive_columnar"
    exact = True

    def __init__(self, cell: StateLearner) -> None:
        super().__init__(cell.input_size, cell.config, streams=cell.streams, dtype=cell.dtype)
        if cell.independent_params:
            raise ValueError("NaiveColumnarRTRL: shared parameters only")
        self.cell = cell
        self.params = cell.params
        self.carry = cell.initial_carry()
        weight_shape = cell.params["weight"].shape[1:]
        n_params = math.prod(weight_shape)
        self.sensitivity = torch.zeros(cell.streams, 2 * cell.n_features, n_params)

        def state_step(state: Tensor, weight: Tensor, x: Tensor) -> Tensor:
            h, c = state.view(2, 1, -1)
            (h, c), _ = cell.functional_step({"weight": weight.view(1, *weight_shape)}, (h, c), x)
            return torch.cat([h[0], c[0]])

        jacobians = torch.func.jacrev(state_step, argnums=(0, 1))
        self._jacobians = torch.func.vmap(jacobians, in_dims=(0, None, 0))
        self._state_step = torch.func.vmap(state_step, in_dims=(0, None, 0))

    @property
    def n_features(self) -> int:
        """Number of columns."""
        return self.cell.n_features

    def initial_carry(self) -> Carry:
        """``(h, c)`` zeros, ``[B, n]`` each."""
        return self.cell.initial_carry()

    def functional_step(
        self, params: Mapping[str, Tensor], carry: Carry, x: Tensor
    ) -> tuple[Carry, Tensor]:
        """The columnar cell."""
        return self.cell.functional_step(params, carry, x)

    def _advance(self, x: Tensor) -> Tensor:
        state = torch.cat(self.carry, dim=1)
        weight = self.params["weight"][0].reshape(-1)
        d_state, d_weight = self._jacobians(state, weight, x[:, None])
        self.sensitivity = torch.bmm(d_state, self.sensitivity) + d_weight
        state = self._state_step(state, weight, x[:, None])
        self.carry = (state[:, : self.n_features], state[:, self.n_features :])
        return self.carry[0]

    def _grad(self, v: Tensor) -> dict[str, Tensor]:
        flat = torch.einsum("bn,bnp->bp", v, self.sensitivity[:, : self.n_features])
        return {"weight": flat.view(self.streams, *self.params["weight"].shape[1:])}

    def _reset_credit(self, mask: Tensor) -> None:
        self.sensitivity[mask] = 0.0


# ---------------------------------------------------------------------- measurements
def build(
    case_learner: str,
    streams: int,
    input_size: int,
    options: dict[str, Any],
    independent: bool = False,
) -> Any:
    """A float32 learner with seed 0, parameters shared (or one network per stream)."""
    return make_learner(
        case_learner,
        input_size,
        streams=streams,
        independent_params=independent,
        seed=0,
        **options,
    )


def predictor_for(learner: StateLearner, backend: str) -> TDPredictor:
    """A TD(lambda) engine with the paper's defaults (``rmsprop_td``) and ``backend``."""
    return TDPredictor(learner, 1, TDConfig(backend=backend))


def n_params(learner: StateLearner) -> int:
    """Parameters of one network: the trained ones plus, for CCN, the frozen stages."""
    stages = getattr(learner, "stage_weights", None)
    tensors = stages if stages is not None else list(learner.params.values())
    return sum(t[0].numel() for t in tensors)


def last_stage(learner: Any) -> Any:
    """Advance a CCN learner to its last stage (every column built)."""
    while learner.advance_stage():
        pass
    return learner


def measure_case(
    case: Case, budget: float, triad: Triad | None = None, threads: int = 1
) -> dict[str, Any]:
    """µs per stream-step of ``case`` for each implementation (fused, eager, naive).

    With more than one stream (cases with a target), the fused step of one network per
    stream (independent parameters, as B seeds run) is timed beside the shared one:
    ``fused_independent_us``,
    the figure to set against code that runs one network per seed. With ``triad``, the
    triad is timed in the same rounds: ``triad_gb_per_s`` in the row.
    With ``threads > 1``, the fused step (and the triad) also run on that many threads:
    ``fused_threads_us`` (and ``triad_threads_gb_per_s``).
    """
    predictors = {}
    variants = [("fused", "fused", False), ("eager", "eager", False)]
    if case.streams > 1 and case.target_us is not None:  # not the bandwidth cases
        variants.append(("fused_independent", "fused", True))
    for name, backend, independent in variants:
        learner = build(case.learner, case.streams, case.input_size, case.options, independent)
        if case.last_stage:
            last_stage(learner)
        predictors[name] = predictor_for(learner, backend)
    if case.naive:
        cell = build(case.learner, case.streams, case.input_size, case.options)
        predictors["naive"] = predictor_for(NaiveColumnarRTRL(cell), "eager")
    steps: dict[str, Callable[[], Any]] = {
        name: with_threads(td_step(p), 1) for name, p in predictors.items()
    }
    if triad is not None:
        steps["triad"] = with_threads(triad, 1)
    if threads > 1:
        steps["fused_threads"] = with_threads(td_step(predictors["fused"], seed=1), threads)
        if triad is not None:
            steps["triad_threads"] = with_threads(triad, threads)
    seconds = time_side_by_side(steps, budget)
    torch.set_num_threads(1)
    timed = [name for name in steps if not name.startswith("triad")]
    per_stream = {f"{name}_us": seconds[name] / case.streams * 1e6 for name in timed}
    learner = predictors["fused"].learner
    row = {**asdict(case), "params": n_params(learner), **per_stream}
    if threads > 1:
        row["threads"] = threads
    for name in ("triad", "triad_threads"):
        if name in seconds:
            row[f"{name}_gb_per_s"] = triad.bytes / seconds[name] / 1e9  # type: ignore[union-attr]
    row["met"] = case.target_us is not None and per_stream["fused_us"] <= case.target_us
    return row


def actor_critic_steps(case: ActorCriticCase, pool: int = 64) -> dict[str, Callable[[], Any]]:
    """Closures of one learning step each, on pre-drawn observations, rewards and ends.

    The actor-critic's compiled and eager steps (``RTRLActorCritic._agent_step``: everything
    between two env steps) and the fused TD step of the same core.
    """
    import gymnasium as gym
    from stable_baselines3.common.vec_env import DummyVecEnv

    from agentstate.rl import RTRLActorCritic

    observation_space = gym.spaces.Box(-1.0, 1.0, (ACTOR_CRITIC_OBSERVATION,), np.float32)
    action_space = gym.spaces.Discrete(ACTOR_CRITIC_ACTIONS)

    class Blank(gym.Env):
        def __init__(self) -> None:
            self.observation_space, self.action_space = observation_space, action_space

    generator = np.random.default_rng(0)
    shape = (pool, case.streams, ACTOR_CRITIC_OBSERVATION)
    observations = (generator.random(shape) < 0.3).astype(np.float32)
    rewards = generator.standard_normal((pool, case.streams)).astype(np.float32)
    dones = generator.random((pool, case.streams)) < 0.01
    infos = [{} for _ in range(case.streams)]
    steps: dict[str, Callable[[], Any]] = {}
    for name, backend in (("actor_critic", "fused"), ("actor_critic_eager", "eager")):
        env = DummyVecEnv([Blank] * case.streams)
        model = RTRLActorCritic(env, case.learner, case.options, seed=0, backend=backend)
        if case.last_stage:
            last_stage(model.policy.core)
            model.policy.match_core_traces()
        model._agent_step(observations[0], None, None, None)
        transitions = itertools.cycle(range(pool))

        def step(model: Any = model, transitions: Any = transitions) -> Any:
            t = next(transitions)
            return model._agent_step(observations[t], rewards[t], dones[t], infos)

        steps[name] = step
    core_inputs = ACTOR_CRITIC_OBSERVATION + ACTOR_CRITIC_ACTIONS
    learner = make_learner(
        case.learner, core_inputs, streams=case.streams, dtype=torch.float64, seed=0,
        **case.options,
    )  # fmt: skip
    if case.last_stage:
        last_stage(learner)
    steps["td"] = td_step(predictor_for(learner, "fused"))
    return steps


def measure_actor_critic(case: ActorCriticCase, budget: float) -> dict[str, Any]:
    """µs per stream-step of the actor-critic's steps and the TD step, side by side."""
    seconds = time_side_by_side(
        {name: with_threads(step, 1) for name, step in actor_critic_steps(case).items()}, budget
    )
    row: dict[str, Any] = asdict(case)
    for name, value in seconds.items():
        row[f"{name}_us"] = value / case.streams * 1e6
    row["ratio"] = row["actor_critic_us"] / row["td_us"]
    row["met"] = row["ratio"] <= ACTOR_CRITIC_TARGET
    return row


def columnar_step_bytes(streams: int, columns: int, inputs: int, cumulants: int = 1) -> int:
    """Bytes a fused TD step of a shared-parameter columnar network must move (``rmsprop_td``).

    Per stream, ``S^h``, ``S^c`` and one trace per cumulant are each read and written once;
    the weights are read by the forward pass and read and written by the update after it
    (the TD error needs every column's output first), the second moment read and written::

        4 bytes x ((2 + 2 + 2K) B N + 5 N),    N = columns x 4 x (inputs + 2)
    """
    per_network = columns * 4 * (inputs + 2)
    return 4 * ((4 + 2 * cumulants) * streams * per_network + 5 * per_network)


class Triad:
    """STREAM triad ``a = b + 3 c`` in float32 (torch, the calling thread); one call, one pass.

    ``bytes``: 3 x 4 bytes per element, as STREAM counts (reads of b, c, the write of a).
    """

    def __init__(self, elements: int = 1 << 25) -> None:
        self.b, self.c = torch.rand(elements), torch.rand(elements)
        self.a = torch.empty(elements)
        self.bytes = 3 * 4 * elements

    def __call__(self) -> None:
        """One pass over the arrays."""
        torch.add(self.b, self.c, alpha=3.0, out=self.a)


def with_threads(step: Callable[[], Any], threads: int) -> Callable[[], Any]:
    """``step`` run with ``torch.set_num_threads(threads)`` (the fused kernel's thread budget)."""

    def threaded() -> Any:
        torch.set_num_threads(threads)
        return step()

    return threaded


def measure_scaling(
    name: str, budget: float, max_params: float = 2e6, threads: int = 1
) -> dict[str, Any]:
    """Per-step cost at ~1e3..1e6 parameters and the fitted log-log slope.

    With ``threads > 1``, fused learners are also timed on that many threads, side by side
    with one (``step_us_threads`` per point, ``slope_threads``).
    """
    scaling = SCALING[name]
    points = []
    backend = "eager"
    for size in scaling.sizes:
        options = {**scaling.fixed, scaling.option: size}
        if name == "ccn":
            options["n_features"] = CCN_STAGES * size
        learner = build(name, SCALING_STREAMS, scaling.input_size, options)
        if name == "ccn":
            last_stage(learner)
        params = n_params(learner)
        if params > max_params:
            break
        predictor = predictor_for(learner, "auto")
        backend = predictor.backend
        step = td_step(predictor)
        steps = {"one": with_threads(step, 1)}
        if threads > 1 and backend == "fused":
            steps["many"] = with_threads(step, threads)
        seconds = time_side_by_side(steps, budget, rounds=3)
        point = {"size": size, "params": params, "step_us": seconds["one"] * 1e6}
        if "many" in seconds:
            point["step_us_threads"] = seconds["many"] * 1e6
        points.append(point)
    torch.set_num_threads(1)
    param_counts = [p["params"] for p in points]
    along = [p["size"] for p in points] if scaling.quadratic_in_size else param_counts
    band = QUADRATIC_SLOPE if scaling.quadratic_in_size else LINEAR_SLOPE
    row: dict[str, Any] = {
        "learner": name,
        "backend": backend,
        "streams": SCALING_STREAMS,
        "input_size": scaling.input_size,
        "points": points,
        "slope_against": "hidden units" if scaling.quadratic_in_size else "parameters",
        "target": list(band),
        "slope": fitted_slope(along, [p["step_us"] for p in points]),
        "slope_vs_params": fitted_slope(param_counts, [p["step_us"] for p in points]),
        # Between the two largest networks only, where fixed per-call costs have faded.
        "top_slope": fitted_slope(along[-2:], [p["step_us"] for p in points[-2:]]),
    }
    row["met"] = band[0] <= row["slope"] <= band[1]
    if points and all("step_us_threads" in p for p in points):
        # Information, not the target (1 thread): the extra threads engage above
        # ``fused.PARALLEL_GRAIN`` only, so they bend the large end down by design.
        row["threads"] = threads
        row["slope_threads"] = fitted_slope(along, [p["step_us_threads"] for p in points])
    return row


def fitted_slope(x: list[float], y: list[float]) -> float:
    """Least-squares slope of ``log y`` against ``log x``."""
    if len(x) < 2:
        return math.nan
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


# ---------------------------------------------------------------------- the whole run
@dataclass
class Report:
    """Everything ``agentstate bench`` measured."""

    date: str
    machine: str
    torch: str
    command: str
    threads: int = 1
    """Threads of the headline numbers."""
    parallel_threads: int = 1
    """Threads of the ``fused_threads`` numbers: every core this process may use."""
    triad_gb_per_s: float = 0.0
    cases: list[dict[str, Any]] = field(default_factory=list)
    bandwidth: list[dict[str, Any]] = field(default_factory=list)
    scaling: list[dict[str, Any]] = field(default_factory=list)
    actor_critic: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def machine_name() -> str:
    """``lscpu``'s model name (else ``/proc/cpuinfo``'s, else the platform's) and core count."""
    model = ""
    if shutil.which("lscpu"):
        output = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(
            (line.split(":", 1)[1].strip() for line in output.splitlines() if "Model name" in line),
            "",
        )
    return f"{model or platform.processor() or platform.machine()}, {_cpu_count()} CPUs"


def _cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def run(command: str, quick: bool = False, log: Callable[[str], None] = print) -> Report:
    """Measure every case, the triad and the scaling; ``quick``: a smoke-test-sized run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure(command, quick, log)
    finally:
        torch.set_num_threads(threads)


def _measure(command: str, quick: bool, log: Callable[[str], None]) -> Report:
    started = time.perf_counter()
    cores = _cpu_count()
    report = Report(
        date=str(date.today()),
        machine=machine_name(),
        torch=torch.__version__,
        command=command,
        parallel_threads=cores,
    )
    budget = 0.05 if quick else 4.0
    triad = Triad(1 << 20 if quick else 1 << 25)
    for case in CASES:
        large = case.target_us is None
        if quick and large:
            continue  # the large cases take seconds even for a smoke test
        row = measure_case(case, budget, triad if large else None, threads=cores)
        report.cases.append(row)
        log(f"{case.label}: fused {row['fused_us']:.2f} µs, eager {row['eager_us']:.2f} µs")
        if large:
            report.triad_gb_per_s = max(report.triad_gb_per_s, row["triad_gb_per_s"])
            report.bandwidth += bandwidth_rows(case, row)
    for ac_case in ACTOR_CRITIC_CASES:
        row = measure_actor_critic(ac_case, 0.05 if quick else 3.0)
        report.actor_critic.append(row)
        log(
            f"actor-critic {ac_case.label}: {row['actor_critic_us']:.2f} µs, TD step "
            f"{row['td_us']:.2f} µs ({row['ratio']:.2f}x)"
        )
    for name in SCALING:
        row = measure_scaling(
            name, 0.02 if quick else 2.0, max_params=2e4 if quick else 2e6, threads=cores
        )
        report.scaling.append(row)
        log(f"scaling {name}: slope {row['slope']:.2f} against {row['slope_against']}")
    report.seconds = time.perf_counter() - started
    return report


def bandwidth_rows(case: Case, row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Fraction of the triad a large columnar case reaches, on one thread and on all."""
    moved = columnar_step_bytes(case.streams, case.options["n_features"], case.input_size)
    rows = []
    for suffix, threads in (("", 1), ("_threads", row.get("threads"))):
        if f"fused{suffix}_us" not in row:
            continue
        seconds = row[f"fused{suffix}_us"] * case.streams * 1e-6
        achieved = moved / seconds / 1e9
        triad = row[f"triad{suffix}_gb_per_s"]
        rows.append(
            {
                "label": case.label,
                "threads": threads,
                "bytes": moved,
                "step_ms": seconds * 1e3,
                "gb_per_s": achieved,
                "triad_gb_per_s": triad,
                "fraction_of_triad": achieved / triad,
                "met": achieved / triad >= BANDWIDTH_TARGET,
            }
        )
    return rows


# ---------------------------------------------------------------------- the markdown
def markdown(report: Report) -> str:
    """The report as the tables committed to ``benchmarks/README.md``."""
    many = report.parallel_threads
    lines = [
        f"Measured {report.date} on {report.machine}, torch {report.torch}, float32, with "
        f"`{report.command}` ({report.seconds / 60:.1f} min). Headline numbers on "
        f"{report.threads} thread; *fused ×{many}* is the same kernel allowed {many} threads.",
        "",
        "µs per stream-step, TD(λ) update included (`rmsprop_td`); *fused* is what "
        "`TDPredictor` runs by default (one network shared by the streams), *fused indep.* "
        "the same with one network per stream (B seeds at once), *eager* the torch "
        "reference, *naive* eager RTRL with autograd Jacobians; C++: the authors' code per "
        "step (background §2), which runs one network per seed: *C++ / indep.* compares like "
        "with like.",
        "",
        f"| case | params | target | fused | fused indep. | fused ×{many} | eager | naive | "
        "eager / fused | C++ / fused | C++ / indep. | met |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for row in report.cases:
        target = f"≤ {row['target_us']:g}" if row["target_us"] else "see below"
        naive = f"{row['naive_us']:.1f}" if "naive_us" in row else "–"
        threaded = f"{row['fused_threads_us']:.2f}" if "fused_threads_us" in row else "–"
        authors = f"{row['authors_us'] / row['fused_us']:.1f}×" if row["authors_us"] else "–"
        # One stream: its one network is as independent as it gets.
        independent_us = row.get(
            "fused_independent_us", row["fused_us"] if row["streams"] == 1 else None
        )
        independent = f"{independent_us:.2f}" if independent_us is not None else "–"
        authors_independent = (
            f"{row['authors_us'] / independent_us:.1f}×"
            if row["authors_us"] and independent_us is not None
            else "–"
        )
        met = ("yes" if row["met"] else "**no**") if row["target_us"] else "–"
        lines.append(
            f"| {row['label']} | {row['params']:,} | {target} | {row['fused_us']:.2f} | "
            f"{independent} | {threaded} | {row['eager_us']:.1f} | {naive} | "
            f"{row['eager_us'] / row['fused_us']:.0f}× | {authors} | {authors_independent} | "
            f"{met} |"
        )
    lines += [
        "",
        "STREAM triad: torch `add(b, c, alpha=3, out=a)`, 3 × 128 MB, 12 bytes per element as "
        "STREAM counts them, on as many threads as the step it is compared with, timed in "
        "turns with each case. Bytes a step must move: "
        "`agentstate.benchmark.columnar_step_bytes` (S^h, S^c, trace read and written once; "
        "weights read, then read and written; second moment read and written). Target: "
        f"≥ {BANDWIDTH_TARGET:.0%} of triad.",
        "",
        "| case | threads | MB per step | fused ms per step | GB/s | triad GB/s | of triad | met |",
        "|---|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for row in report.bandwidth:
        lines.append(
            f"| {row['label']} | {row['threads']} | {row['bytes'] / 1e6:.1f} | "
            f"{row['step_ms']:.2f} | {row['gb_per_s']:.1f} | {row['triad_gb_per_s']:.1f} | "
            f"{row['fraction_of_triad']:.0%} | {'yes' if row['met'] else '**no**'} |"
        )
    sizes = max((len(row["points"]) for row in report.scaling), default=0)
    lines += [
        "",
        f"Scaling: µs per step of all {SCALING_STREAMS} streams (`parameters p: µs on 1 thread "
        f"/ on {many}` for fused learners) from ~1e3 to ~1e6 parameters per network; slope of "
        "the log-log least-squares fit against parameters (target "
        f"{LINEAR_SLOPE[0]}–{LINEAR_SLOPE[1]} on 1 thread), for T-BPTT against its hidden units "
        f"(target {QUADRATIC_SLOPE[0]}–{QUADRATIC_SLOPE[1]}, with its slope against parameters). "
        "*Top decade*: the slope between the two largest networks, where fixed per-call "
        f"costs have faded. The {many}-thread slope is for information: extra threads engage "
        "only on large steps.",
        "",
        "| learner | backend | inputs | "
        + " | ".join(f"size {i + 1}" for i in range(sizes))
        + f" | slope, 1 thread | top decade | slope, {many} threads | met |",
        "|---|---|---:|" + "---:|" * sizes + "---:|---:|---:|:---:|",
    ]
    for row in report.scaling:
        cells = []
        for point in row["points"]:
            cell = f"{point['params']:,} p: {point['step_us']:,.0f}"
            if "step_us_threads" in point:
                cell += f" / {point['step_us_threads']:,.0f}"
            cells.append(cell)
        cells += [""] * (sizes - len(cells))
        slope = f"{row['slope']:.2f}"
        if row["slope_against"] != "parameters":
            slope += f" vs units ({row['slope_vs_params']:.2f} vs p)"
        threaded = f"{row['slope_threads']:.2f}" if "slope_threads" in row else "–"
        met = row["met"]
        lines.append(
            f"| {row['learner']} | {row['backend']} | {row['input_size']} | "
            + " | ".join(cells)
            + f" | {slope} | {row['top_slope']:.2f} | {threaded} | {'yes' if met else '**no**'} |"
        )
    lines += [
        "",
        "Actor-critic (`agentstate.rl.RTRLActorCritic`, float64 as it runs): µs per "
        "stream-step of its learning step between two env steps (the core's RTRL step, heads, "
        "sampling, AC(λ) traces, ObGD; the env excluded), compiled and eager, against the "
        "fused TD step of the same core (12 observations + 2 actions in), side by side. "
        f"Target: compiled ≤ {ACTOR_CRITIC_TARGET:g}× the TD step.",
        "",
        "| core | compiled | eager | TD step | compiled / TD | eager / compiled | met |",
        "|---|---:|---:|---:|---:|---:|:---:|",
    ]
    for row in report.actor_critic:
        lines.append(
            f"| {row['label']} | {row['actor_critic_us']:.2f} | "
            f"{row['actor_critic_eager_us']:.1f} | {row['td_us']:.2f} | {row['ratio']:.2f}× | "
            f"{row['actor_critic_eager_us'] / row['actor_critic_us']:.0f}× | "
            f"{'yes' if row['met'] else '**no**'} |"
        )
    return "\n".join(lines) + "\n"
