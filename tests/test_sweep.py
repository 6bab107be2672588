"""Sweeps: spec expansion, a tiny sweep on the process pool and on Ray, resumption, skipping."""

import importlib.util
import json
import queue
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from agentstate.experiment import CHECKPOINT_NAME, RunConfig, run_experiment
from agentstate.run_claim import RunClaimedElsewhere
from agentstate.sweep import DONE_NAME, execute_run, expand_spec, load_spec, run_sweep

TINY_SPEC = """
[sweep]
seeds = 2
checkpoint_every = 300

[run]
env = "trace-conditioning"
steps = 700
log_every = 100
msre_window = 200
optimizer = "adam"

[grid]
step_size = [0.001, 0.01]

[grid.learner_kwargs]
n_features = [2]
"""
EXAMPLES = Path(__file__).parents[1] / "examples" / "sweeps"
TINY_RUNS = ["step_size=0.001,n_features=2", "step_size=0.01,n_features=2"]


class Crash(Exception):
    pass


def write_spec(tmp_path, text):
    path = tmp_path / "spec.toml"
    path.write_text(text)
    return path


def test_spec_expands_into_named_runs_with_seeds_as_streams(tmp_path):
    spec = load_spec(
        write_spec(
            tmp_path,
            """
[sweep]
seeds = 3
[run]
env = "trace-patterning"
learner_kwargs = {n_features = 4}
[[grid]]
learner = ["columnar"]
step_size = [0.1, 0.01]
[[grid]]
learner = ["tbptt"]
[grid.learner_kwargs]
truncation = [2, 8]
""",
        )
    )
    runs = expand_spec(spec)
    assert [run.name for run in runs] == [
        "learner=columnar,step_size=0.1",
        "learner=columnar,step_size=0.01",
        "learner=tbptt,truncation=2",
        "learner=tbptt,truncation=8",
    ]
    assert all(run.config.streams == 3 and run.config.independent for run in runs)
    assert runs[3].config.learner_kwargs == {"n_features": 4, "truncation": 8}
    default_step_size = RunConfig(env="trace-patterning").step_size
    assert runs[1].config.step_size == 0.01 and runs[3].config.step_size == default_step_size


def test_shared_parameter_runs_get_one_run_per_seed(tmp_path):
    text = '[sweep]\nseeds = 2\n[run]\nenv = "trace-patterning"\nindependent = false\nseed = 7\n'
    text += "streams = 4\n[grid]\nlambda_ = [0.9]\n"
    runs = expand_spec(load_spec(write_spec(tmp_path, text)))
    assert [(run.name, run.config.seed, run.config.streams) for run in runs] == [
        ("lambda_=0.9,seed=7", 7, 4),
        ("lambda_=0.9,seed=8", 8, 4),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[run]\nenv = "x"\nstep = 3\n', "unknown run options ['step']"),
        ('[run]\nenv = "x"\n[grid]\nstep_size = 0.1\n', "grid entry step_size must be a non"),
        ("[sweep]\nworkers = 2\n", "unknown [sweep] options ['workers']"),
        ('[run]\nenv = "x"\nstreams = 4\n', "the seeds are the streams"),
    ],
)
def test_bad_specs_are_refused_with_a_clear_message(tmp_path, text, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        expand_spec(load_spec(write_spec(tmp_path, text)))


def crash_at_step_400(step, _msre):
    if step >= 400:
        raise Crash


def start_and_crash_first_run(spec_path, out):
    """Run the spec's first run until it crashes after its checkpoint at step 300."""
    first = expand_spec(load_spec(spec_path))[0]
    with pytest.raises(Crash):
        run_experiment(
            first.config,
            out / first.name,
            progress=False,
            on_log=crash_at_step_400,
            checkpoint_every=first.checkpoint_every,
        )
    assert (out / first.name / CHECKPOINT_NAME).exists()


@pytest.fixture(scope="module")
def finished_in_process(tmp_path_factory):
    """The tiny sweep's runs done here by ``execute_run`` (the pool's task), one resumed."""
    root = tmp_path_factory.mktemp("in_process")
    spec_path = write_spec(root, TINY_SPEC)
    out = root / "out"
    start_and_crash_first_run(spec_path, out)
    threads = torch.get_num_threads()  # execute_run sets the run's CPUs for the process
    try:
        outcomes = [
            execute_run(run, str(out), queue.Queue()) for run in expand_spec(load_spec(spec_path))
        ]
    finally:
        torch.set_num_threads(threads)
    return spec_path, out, outcomes


def test_a_run_task_resumes_its_checkpoint_and_marks_the_run_done(finished_in_process):
    _, out, outcomes = finished_in_process
    assert [outcome.name for outcome in outcomes] == TINY_RUNS
    assert [outcome.first_step for outcome in outcomes] == [300, 0]
    for name in TINY_RUNS:
        marker = json.loads((out / name / DONE_NAME).read_text())
        assert marker["run"]["streams"] == 2 and len(marker["final_msre"]) == 2
        assert not (out / name / CHECKPOINT_NAME).exists()


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    """The tiny sweep on the process pool, one run interrupted beforehand (a crash)."""
    root = tmp_path_factory.mktemp("local")
    spec_path = write_spec(root, TINY_SPEC)
    start_and_crash_first_run(spec_path, root / "out")
    report = run_sweep(spec_path, root / "out", workers=2, progress=False, log=print)
    return spec_path, root / "out", report


@pytest.mark.expensive
def test_local_sweep_runs_every_point_and_resumes_the_crashed_one(local_sweep):
    _, out, report = local_sweep
    assert not report.failed and not report.skipped
    assert sorted(outcome.name for outcome in report.finished) == TINY_RUNS
    first_steps = {outcome.name: outcome.first_step for outcome in report.finished}
    assert first_steps == {TINY_RUNS[0]: 300, TINY_RUNS[1]: 0}
    for name in TINY_RUNS:
        marker = json.loads((out / name / DONE_NAME).read_text())
        assert marker["run"]["streams"] == 2 and len(marker["final_msre"]) == 2
        assert not (out / name / CHECKPOINT_NAME).exists()


def test_rerunning_a_finished_sweep_does_no_work(finished_in_process, capsys):
    spec_path, out, _ = finished_in_process
    files = sorted(path for path in out.rglob("*") if path.is_file())
    modified = [path.stat().st_mtime_ns for path in files]
    report = run_sweep(spec_path, out, workers=2, progress=False, log=print)
    assert report.finished == [] and sorted(report.skipped) == TINY_RUNS
    assert "2 of 2 runs already finished" in capsys.readouterr().out
    assert sorted(path for path in out.rglob("*") if path.is_file()) == files
    assert [path.stat().st_mtime_ns for path in files] == modified


def test_changed_spec_over_finished_runs_is_refused(finished_in_process, tmp_path):
    _, out, _ = finished_in_process
    changed = write_spec(tmp_path, TINY_SPEC.replace("steps = 700", "steps = 800"))
    with pytest.raises(ValueError, match="holds a finished run of another config.*steps is 700"):
        run_sweep(changed, out, progress=False)


@pytest.mark.expensive
@pytest.mark.skipif(
    importlib.util.find_spec("ray") is None,
    reason="ray is not installed: pip install 'agentstate[ray]' to test the Ray backend",
)
def test_ray_sweep_gives_the_local_results(local_sweep, tmp_path):
    spec_path, local_out, _ = local_sweep
    report = run_sweep(spec_path, tmp_path, backend="ray", workers=2, progress=False, log=print)
    assert not report.failed and sorted(o.name for o in report.finished) == TINY_RUNS
    for name in TINY_RUNS:
        assert (tmp_path / name / "metrics.csv").read_bytes() == (
            local_out / name / "metrics.csv"
        ).read_bytes()
        ray_marker = json.loads((tmp_path / name / DONE_NAME).read_text())
        local_marker = json.loads((local_out / name / DONE_NAME).read_text())
        assert ray_marker["final_msre"] == local_marker["final_msre"]


def test_example_specs_expand():
    for spec_path in sorted(EXAMPLES.glob("*.toml")):
        runs = expand_spec(load_spec(spec_path))
        assert runs and len({run.name for run in runs}) == len(runs), spec_path


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal: Linux")
def test_pool_workers_end_with_a_sweep_killed_by_its_pid(tmp_path):
    """A worker left behind would finish its run with stale code and mark it done; the
    progress queue's server would linger."""
    script = tmp_path / "parent.py"
    script.write_text(
        "import time\n"
        "from agentstate.sweep import _LocalPool\n"
        "if __name__ == '__main__':\n"
        "    pool = _LocalPool(1)\n"
        "    pool._executor.submit(time.sleep, 120)\n"
        "    time.sleep(0.5)\n"
        "    print(*pool._executor._processes, pool._manager._process.pid, flush=True)\n"
        "    time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    children = [int(pid) for pid in parent.stdout.readline().split()]  # worker, manager
    assert len(children) == 2 and all(_alive(pid) for pid in children)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(pid) for pid in children):
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in children)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


HOLD_CLAIM = """
import sys, time
from agentstate.run_claim import claim_run
with claim_run(sys.argv[1], "another-sweep"):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.mark.expensive
def test_a_run_another_live_sweep_holds_is_left_to_it(tmp_path):
    """Two sweeps over one folder: the run the other one is running is not run twice."""
    spec_path = write_spec(tmp_path, TINY_SPEC)
    out = tmp_path / "out"
    held, free = TINY_RUNS
    other_sweep = subprocess.Popen(
        [sys.executable, "-c", HOLD_CLAIM, str(out / held)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert other_sweep.stdout.readline().strip() == "held"
        report = run_sweep(spec_path, out, workers=2, progress=False, log=print)
        assert [outcome.name for outcome in report.finished] == [free]
        assert list(report.elsewhere) == [held] and not report.failed
        assert f"pid {other_sweep.pid}" in report.elsewhere[held]
        assert not (out / held / DONE_NAME).exists() and not (out / held / "metrics.csv").exists()
    finally:
        other_sweep.kill()
        other_sweep.wait()
    # Its sweep died without finishing it: the next sweep takes the stale claim over.
    report = run_sweep(spec_path, out, workers=2, progress=False, log=print)
    assert [outcome.name for outcome in report.finished] == [held] and report.skipped == [free]
    assert (out / held / DONE_NAME).exists() and not (out / held / "running.json").exists()


def test_a_run_finished_by_another_sweep_meanwhile_is_not_run_again(finished_in_process):
    """Listed as unfinished by this sweep, finished by another before this one claimed it."""
    spec_path, out, _ = finished_in_process
    run = expand_spec(load_spec(spec_path))[0]
    metrics = (out / run.name / "metrics.csv").read_bytes()
    with pytest.raises(RunClaimedElsewhere, match="finished by another sweep meanwhile"):
        execute_run(run, str(out), queue.Queue())
    assert (out / run.name / "metrics.csv").read_bytes() == metrics
    assert not (out / run.name / "running.json").exists()
