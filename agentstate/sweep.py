"""Sweeps: a grid of ``agentstate run`` configurations, run in parallel, resumable.

A spec (TOML) holds the base ``run`` options and a grid of lists::

    [sweep]                    # all optional
    seeds = 5                  # independent seeds per grid point (default 1)
    checkpoint_every = 50000   # checkpoint period of every run (steps)
    cpus_per_run = 1           # torch threads of a run, and its Ray CPU request
    max_retries = 3            # Ray: re-runs of a run whose worker or node died

    [run]                      # RunConfig fields; ``env`` is required
    env = "trace-patterning"
    steps = 200000
    optimizer = "adam"

    [grid]                     # every combination is one grid point
    learner = ["columnar", "tbptt"]
    step_size = [0.001, 0.003, 0.01]

    [grid.learner_kwargs]      # keyword-argument grids are tables of lists
    n_features = [4, 8]

``[[grid]]`` (an array of tables) instead of ``[grid]`` runs the union of several grids, e.g.
one per learner with its own keyword arguments.

Seeds. In a sweep ``independent`` defaults to true: the seeds of a grid point are the
``streams`` of one process (one network per stream, independent parameters), the cheap way
to get 30 seeds. With ``independent = false`` (one network shared by the streams) each seed
is a run of its own, with seeds ``seed, seed + 1, ...``.

Each run writes into ``OUT/<name>``, where the name lists the point's grid values
(``learner=columnar,step_size=0.003``), and drops ``done.json`` (atomically) when it
finishes. Running the sweep again skips runs with a ``done.json`` and resumes the others from
their checkpoints, so a crashed sweep, or a lost Ray node, costs at most one checkpoint
period per run. A run claims its folder while it runs (``agentstate.run_claim``), so two
sweeps over one folder (one per core, say) share out its runs: a run another live sweep is
running is left to it and reported as running elsewhere, not run twice. On a multi-node
Ray cluster, OUT must be on a file system every node shares, and agentstate installed on
every node.
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import itertools
import json
import multiprocessing
import multiprocessing.managers
import os
import queue
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from tqdm import tqdm

from agentstate.checkpoint import atomic_write_bytes, describe_differences, saved_step
from agentstate.experiment import CHECKPOINT_NAME, RunConfig, run_experiment, run_identity
from agentstate.metrics import mean_and_standard_error
from agentstate.registry import get_registry
from agentstate.run_claim import RunClaimedElsewhere, claim_run

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

BACKENDS = ("local", "ray")
DONE_NAME = "done.json"
"""Completion marker of a run folder: the run's config and final figures."""
_KWARG_FIELDS = ("learner_kwargs", "env_kwargs")
_SWEEP_OPTIONS = {"seeds", "checkpoint_every", "cpus_per_run", "max_retries"}
_POLL_SECONDS = 0.5


@dataclass(frozen=True)
class SweepSpec:
    """A parsed sweep spec."""

    base: dict[str, Any]
    """Base RunConfig fields (``[run]``)."""
    grids: list[dict[str, Any]]
    """Each grid: field -> list of values; ``learner_kwargs`` / ``env_kwargs`` -> table."""
    seeds: int = 1
    """Independent seeds per grid point."""
    checkpoint_every: int | None = None
    """Checkpoint period of every run, in steps; None: no checkpoints."""
    cpus_per_run: int = 1
    """Torch threads of each run, and the CPUs a Ray task requests."""
    max_retries: int = 3
    """Ray: how often a run whose worker or node died (or that hit an OSError) is re-run."""


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: a folder name under the sweep's output folder and its config."""

    name: str
    config: RunConfig
    checkpoint_every: int | None
    cpus: int


@dataclass(frozen=True)
class RunOutcome:
    """What a finished run reports back."""

    name: str
    final_msre: float
    """Final sliding MSRE, mean over streams."""
    final_msre_se: float
    """Its standard error over streams (NaN for one stream)."""
    streams: int
    steps_per_second: float
    first_step: int
    """0, or the checkpoint step the run resumed from."""


@dataclass
class SweepReport:
    """What one ``run_sweep`` call did."""

    finished: list[RunOutcome]
    skipped: list[str]
    """Runs already finished before this call (a matching ``done.json``)."""
    failed: dict[str, str]
    """Run name -> error message."""
    elsewhere: dict[str, str] = dataclasses.field(default_factory=dict)
    """Run name -> the live process of another sweep that runs it (or finished it)."""


def load_spec(path: str | os.PathLike[str]) -> SweepSpec:
    """Read a sweep spec from a TOML file (format in the module docstring).

    Raises:
        ValueError: on unknown tables or sweep options, or a grid that is not lists.
    """
    with Path(path).open("rb") as handle:
        document = tomllib.load(handle)
    unknown_tables = set(document) - {"sweep", "run", "grid"}
    if unknown_tables:
        raise ValueError(f"{path}: unknown tables {sorted(unknown_tables)}; use sweep, run, grid")
    options = document.get("sweep", {})
    unknown_options = set(options) - _SWEEP_OPTIONS
    if unknown_options:
        raise ValueError(
            f"{path}: unknown [sweep] options {sorted(unknown_options)}; known: "
            f"{', '.join(sorted(_SWEEP_OPTIONS))}"
        )
    grids = document.get("grid", {})
    grids = grids if isinstance(grids, list) else [grids]
    for grid in grids:
        for field_path, values in _grid_axes(grid):
            if not isinstance(values, list) or not values:
                raise ValueError(
                    f"{path}: grid entry {'.'.join(field_path)} must be a non-empty list"
                )
    for name, value in options.items():
        smallest = 0 if name == "max_retries" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < smallest:
            raise ValueError(f"{path}: [sweep] {name} must be an integer >= {smallest}")
    return SweepSpec(base=document.get("run", {}), grids=grids, **options)


def expand_spec(spec: SweepSpec) -> list[SweepRun]:
    """Every run of a spec, in grid order, with unique folder names.

    Raises:
        ValueError: on an unknown run option, a bad value, or two different runs that would
            share a folder name.
    """
    runs: dict[str, SweepRun] = {}
    for grid in spec.grids:
        axes = _grid_axes(grid)
        for point in itertools.product(*(values for _, values in axes)):
            fields = copy.deepcopy(spec.base)
            labels = []
            for (field_path, _), value in zip(axes, point, strict=True):
                if len(field_path) == 2:
                    fields.setdefault(field_path[0], {})[field_path[1]] = value
                else:
                    fields[field_path[0]] = value
                labels.append(f"{field_path[-1]}={_format_value(value)}")
            for run in _seed_runs(spec, fields, ",".join(labels) or "base"):
                previous = runs.setdefault(run.name, run)
                if previous.config != run.config:
                    differences = describe_differences(
                        dataclasses.asdict(previous.config), dataclasses.asdict(run.config)
                    )
                    raise ValueError(
                        f"two grid points share the folder name {run.name!r} but differ: "
                        + "; ".join(differences)
                    )
    return list(runs.values())


def _grid_axes(grid: Mapping[str, Any]) -> list[tuple[tuple[str, ...], Any]]:
    """``(field path, values)`` of each axis: ``("step_size",)``, ``("learner_kwargs", "n")``."""
    axes: list[tuple[tuple[str, ...], Any]] = []
    for key, values in grid.items():
        if key in _KWARG_FIELDS:
            axes += [((key, name), axis) for name, axis in values.items()]
        else:
            axes.append(((key,), values))
    return axes


def _seed_runs(spec: SweepSpec, fields: dict[str, Any], label: str) -> list[SweepRun]:
    """The runs of one grid point: one with a stream per seed, or one run per seed."""
    fields.setdefault("independent", True)
    if fields["independent"]:
        if fields.setdefault("streams", spec.seeds) != spec.seeds:
            raise ValueError(
                "with independent = true the seeds are the streams: set [sweep] seeds, "
                f"not [run] streams ({fields['streams']} streams, {spec.seeds} seeds)"
            )
        return [SweepRun(label, _run_config(fields), spec.checkpoint_every, spec.cpus_per_run)]
    first_seed = fields.get("seed", 0)
    return [
        SweepRun(
            f"{label},seed={seed}",
            _run_config({**fields, "seed": seed}),
            spec.checkpoint_every,
            spec.cpus_per_run,
        )
        for seed in range(first_seed, first_seed + spec.seeds)
    ]


def _run_config(fields: Mapping[str, Any]) -> RunConfig:
    known = {field.name for field in dataclasses.fields(RunConfig)}
    unknown = set(fields) - known
    if unknown:
        raise ValueError(
            f"unknown run options {sorted(unknown)}; known: {', '.join(sorted(known))}"
        )
    return RunConfig(**fields)


def _format_value(value: Any) -> str:
    """A grid value as it appears in a folder name (no path separators or spaces)."""
    text = value if isinstance(value, str) else json.dumps(value)
    return text.replace("/", "-").replace(" ", "")


def execute_run(
    run: SweepRun, out_root: str, progress: Any, sweep_id: str | None = None
) -> RunOutcome:
    """Run (or resume) one sweep run in this process and mark it done.

    This is the task both backends execute. It claims the run's folder for its whole
    length and reports ``(name, step)`` on ``progress`` (anything with ``put``) when it
    starts and at every log point.

    Args:
        run: the run.
        out_root: the sweep's output folder (absolute: Ray workers run elsewhere).
        progress: a queue shared with the sweep driver.
        sweep_id: the sweep's id (its earlier attempts' claims are taken over); None: a
            call of its own.

    Returns:
        The run's final figures.

    Raises:
        RunClaimedElsewhere: if another live sweep runs this run, or finished it after
            this sweep listed it as unfinished.
    """
    torch.set_num_threads(run.cpus)
    out = Path(out_root) / run.name
    with claim_run(out, sweep_id or uuid.uuid4().hex):
        if is_finished(run, Path(out_root)):
            raise RunClaimedElsewhere(f"{out} was finished by another sweep meanwhile")
        progress.put((run.name, saved_step(out / CHECKPOINT_NAME) or 0))
        result = run_experiment(
            run.config,
            out,
            progress=False,
            on_log=lambda step, _: progress.put((run.name, step)),
            checkpoint_every=run.checkpoint_every,
            resume=True,
        )
        marker = {
            **run_identity(run.config),
            "final_msre": result.final_msre.tolist(),
            "final_msre_zero": result.final_msre_zero.tolist(),
            "steps_per_second": result.steps_per_second,
            "first_step": result.first_step,
        }
        atomic_write_bytes(out / DONE_NAME, json.dumps(marker, indent=2).encode())
    mean, standard_error = mean_and_standard_error(result.final_msre[None])
    return RunOutcome(
        run.name,
        float(mean[0]),
        float(standard_error[0]),
        run.config.streams,
        result.steps_per_second,
        result.first_step,
    )


def is_finished(run: SweepRun, out_root: Path) -> bool:
    """Whether ``out_root/<run.name>`` holds this run, finished.

    Raises:
        ValueError: if the folder holds a finished run of another config.
    """
    marker_path = out_root / run.name / DONE_NAME
    if not marker_path.exists():
        return False
    saved = json.loads(marker_path.read_text())["run"]
    differences = describe_differences(saved, run_identity(run.config)["run"])
    if differences:
        raise ValueError(
            f"{marker_path.parent} holds a finished run of another config "
            f"({'; '.join(differences)}); use another --out or delete that folder"
        )
    return True


def run_sweep(
    spec_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    backend: str = "local",
    address: str | None = None,
    workers: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = tqdm.write,
) -> SweepReport:
    """Run every unfinished run of a spec and report what happened.

    Args:
        spec_path: the TOML spec.
        out_dir: the sweep's output folder; one sub-folder per run.
        backend: ``local`` (a process pool here) or ``ray`` (Ray tasks).
        address: Ray cluster address; None starts a local Ray cluster.
        workers: runs at once (default: CPUs / cpus_per_run); ignored with an address,
            where the cluster's CPUs decide.
        progress: show the overall progress bar.
        log: where the one line per finished run goes.

    Returns:
        The finished, skipped and failed runs, and those another live sweep runs.

    Raises:
        ValueError: on a bad spec, an unknown learner or env, or a run folder that holds a
            finished run of another config; nothing has run then.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    spec = load_spec(spec_path)
    runs = expand_spec(spec)
    _check_names(runs)
    out_root = Path(out_dir).resolve()
    skipped = [run.name for run in runs if is_finished(run, out_root)]
    pending = [run for run in runs if run.name not in skipped]
    report = SweepReport([], skipped, {})
    if skipped:
        log(f"{len(skipped)} of {len(runs)} runs already finished; skipping them")
    if not pending:
        return report
    out_root.mkdir(parents=True, exist_ok=True)
    if workers is None:
        workers = max(1, (os.cpu_count() or 1) // spec.cpus_per_run)
    if workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    pool: _LocalPool | _RayCluster = (
        _LocalPool(workers)
        if backend == "local"
        else _RayCluster(workers * spec.cpus_per_run, address, spec.max_retries)
    )
    try:
        _drive(pool, pending, out_root, len(runs), len(skipped), report, progress, log)
    finally:
        pool.close()
    return report


def _check_names(runs: Iterable[SweepRun]) -> None:
    """Fail before any work on an unknown learner or environment."""
    registry = get_registry()
    for run in runs:
        registry.spec(run.config.learner)
        if run.config.env_id not in gym.registry:
            raise ValueError(f"run {run.name}: unknown environment {run.config.env!r}")


def _drive(
    pool: _LocalPool | _RayCluster,
    pending: list[SweepRun],
    out_root: Path,
    total_runs: int,
    done_before: int,
    report: SweepReport,
    progress: bool,
    log: Callable[[str], None],
) -> None:
    """Submit every pending run, then follow progress until each has finished or failed."""
    sweep_id = uuid.uuid4().hex
    handles = {pool.submit(run, str(out_root), sweep_id): run for run in pending}
    last_step: dict[str, int] = {}
    steps_done = 0
    runs_done = done_before
    started = time.perf_counter()
    bar = tqdm(total=total_runs, initial=done_before, unit="run", disable=not progress)
    while handles:
        finished = pool.wait(list(handles), _POLL_SECONDS)
        # A run reports its steps before it returns: drain them before counting it finished.
        for name, step in pool.drain_progress():
            steps_done += step - last_step.get(name, step)
            last_step[name] = step
        for handle, outcome in finished:
            run = handles.pop(handle)
            reported_step = last_step.pop(run.name, run.config.steps)
            runs_done += 1
            bar.update(1)
            position = f"[{runs_done}/{total_runs}]"
            if isinstance(outcome, RunOutcome):
                steps_done += run.config.steps - reported_step
                report.finished.append(outcome)
                log(f"{position} {run.name}: {_describe_outcome(outcome)}")
            elif isinstance(outcome, RunClaimedElsewhere):
                report.elsewhere[run.name] = str(outcome)
                log(f"{position} {run.name}: left to another sweep: {outcome}")
            else:
                report.failed[run.name] = str(outcome)
                log(f"{position} {run.name}: FAILED: {outcome}")
        elapsed = time.perf_counter() - started
        bar.set_postfix_str(f"{steps_done / elapsed:,.0f} steps/s")
    bar.close()


def _describe_outcome(outcome: RunOutcome) -> str:
    spread = "" if np.isnan(outcome.final_msre_se) else f" ± {outcome.final_msre_se:.3g}"
    resumed = f", resumed at step {outcome.first_step:,}" if outcome.first_step else ""
    return (
        f"final MSRE {outcome.final_msre:.4g}{spread} over {outcome.streams} streams, "
        f"{outcome.steps_per_second:,.0f} steps/s{resumed}"
    )


def _die_with_parent(parent_pid: int) -> None:
    """A pool process's initializer: on Linux, end it when the sweep process ends.

    Otherwise a sweep killed by its pid (not Ctrl-C, which reaches the whole process group)
    leaves workers that finish their runs with the code they loaded and write them where a
    restarted sweep takes them as done.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    set_parent_death_signal = 1  # PR_SET_PDEATHSIG
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(set_parent_death_signal, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent ended before the signal was armed
        os._exit(1)


class _LocalPool:
    """Runs on this machine: a process pool started with ``spawn``."""

    def __init__(self, workers: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._manager = multiprocessing.managers.SyncManager(ctx=context)
        self._manager.start(_die_with_parent, (os.getpid(),))  # the progress queue's server
        self._progress = self._manager.Queue()
        self._executor = concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=context, initializer=_die_with_parent, initargs=(os.getpid(),)
        )

    def submit(
        self, run: SweepRun, out_root: str, sweep_id: str
    ) -> concurrent.futures.Future[RunOutcome]:
        return self._executor.submit(execute_run, run, out_root, self._progress, sweep_id)

    def wait(
        self, futures: list[concurrent.futures.Future[RunOutcome]], timeout: float
    ) -> list[tuple[Any, RunOutcome | BaseException]]:
        """Futures finished within ``timeout`` seconds, each with its outcome or error."""
        finished, _ = concurrent.futures.wait(
            futures, timeout, return_when=concurrent.futures.FIRST_COMPLETED
        )
        outcomes: list[tuple[Any, RunOutcome | BaseException]] = []
        for future in finished:
            error = future.exception()
            outcomes.append((future, future.result() if error is None else error))
        return outcomes

    def drain_progress(self) -> list[tuple[str, int]]:
        reports = []
        while True:
            try:
                reports.append(self._progress.get_nowait())
            except queue.Empty:
                return reports

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._manager.shutdown()


class _RayCluster:
    """Runs as Ray tasks: a local Ray cluster, or the cluster at ``address``.

    Each task requests ``cpus`` CPUs; a task whose worker or node dies, or that raises an
    OSError (a flaky shared file system), is retried up to ``max_retries`` times and resumes
    from its run's checkpoint.
    """

    def __init__(self, local_cpus: int, address: str | None, max_retries: int) -> None:
        import ray
        from ray.util.queue import Queue

        self._ray = ray
        if address is None:
            ray.init(address="local", num_cpus=local_cpus, include_dashboard=False)
        else:
            ray.init(address=address)
        self._progress = Queue(actor_options={"num_cpus": 0})
        self._task = ray.remote(execute_run)
        self._max_retries = max_retries

    def submit(self, run: SweepRun, out_root: str, sweep_id: str) -> Any:
        return self._task.options(
            num_cpus=run.cpus,
            max_retries=self._max_retries,
            retry_exceptions=[OSError],
            name=run.name,
        ).remote(run, out_root, self._progress, sweep_id)

    def wait(self, refs: list[Any], timeout: float) -> list[tuple[Any, RunOutcome | BaseException]]:
        """Tasks finished within ``timeout`` seconds, each with its outcome or error."""
        ready, _ = self._ray.wait(refs, num_returns=len(refs), timeout=timeout)
        outcomes: list[tuple[Any, RunOutcome | BaseException]] = []
        for ref in ready:
            try:
                outcomes.append((ref, self._ray.get(ref)))
            except self._ray.exceptions.RayError as error:
                cause = getattr(error, "cause", None)
                outcomes.append((ref, cause if isinstance(cause, BaseException) else error))
        return outcomes

    def drain_progress(self) -> list[tuple[str, int]]:
        waiting = self._progress.qsize()
        return list(self._progress.get_nowait_batch(waiting)) if waiting else []

    def close(self) -> None:
        self._ray.shutdown()
