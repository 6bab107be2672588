"""Checkpoints: a run killed and resumed writes the uninterrupted metrics; bad files refused."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from agentstate.checkpoint import (
    MAGIC,
    CheckpointError,
    atomic_write_bytes,
    remove_checkpoint,
    save_checkpoint,
)
from agentstate.cli import main
from agentstate.experiment import CHECKPOINT_NAME, RunConfig, run_experiment, run_identity

DEFAULT_STEP_SIZE = RunConfig(env="trace-conditioning").step_size
"""What a run gets without ``--lr``."""
SMALL_RUN = [
    "trace-conditioning",
    "--steps",
    "3000",
    "--streams",
    "2",
    "--independent",
    "--log-every",
    "100",
    "--msre-window",
    "300",
    "--learner-kwarg",
    "n_features=2",
    "--no-progress",
]


def run_command(out, *flags):
    return main(["run", *SMALL_RUN, *flags, "--out", str(out)])


class Interrupt(Exception):
    pass


def interrupted_run(config, out, *, at_step, checkpoint_every):
    """Run until a log point at or after ``at_step``, then stop as a crash would."""

    def stop(step, _msre):
        if step >= at_step:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_experiment(config, out, progress=False, on_log=stop, checkpoint_every=checkpoint_every)


@pytest.mark.expensive
def test_resume_after_sigkill_writes_the_uninterrupted_metrics(tmp_path, capsys):
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "agentstate.cli", "run", *SMALL_RUN]
        + ["--checkpoint-every", "500", "--out", str(killed)]
    )
    checkpoint = killed / CHECKPOINT_NAME
    deadline = time.monotonic() + 120
    while not checkpoint.exists():
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (killed / "metrics.csv").exists()

    assert run_command(killed, "--checkpoint-every", "500", "--resume") == 0
    assert "resumed at step" in capsys.readouterr().out
    assert run_command(tmp_path / "whole") == 0
    assert (killed / "metrics.csv").read_bytes() == (
        tmp_path / "whole" / "metrics.csv"
    ).read_bytes()
    assert not checkpoint.exists()  # a finished run needs no checkpoint


@pytest.mark.parametrize(
    ("learner", "kwargs", "optimizer", "independent"),
    [
        # a new stage starts after the checkpoint: stage, frozen weights, statistics restored
        ("ccn", {"n_features": 2, "columns_per_stage": 1, "steps_per_stage": 500}, "adam", True),
        # random signs every step: the learner's generator is restored; shared parameters
        ("uoro", {"n_features": 2}, "rmsprop_td", False),
    ],
)
def test_resume_is_exact_for_stateful_learners(tmp_path, learner, kwargs, optimizer, independent):
    config = RunConfig(
        env="trace-patterning",
        learner=learner,
        steps=900,
        streams=2,
        independent=independent,
        optimizer=optimizer,
        log_every=100,
        msre_window=200,
        learner_kwargs=kwargs,
    )
    run_experiment(config, tmp_path / "whole", progress=False)
    interrupted_run(config, tmp_path / "resumed", at_step=400, checkpoint_every=300)
    result = run_experiment(
        config, tmp_path / "resumed", progress=False, checkpoint_every=300, resume=True
    )
    assert result.first_step == 300
    assert (tmp_path / "resumed" / "metrics.csv").read_bytes() == (
        tmp_path / "whole" / "metrics.csv"
    ).read_bytes()


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    """A run of SMALL_RUN's settings stopped after its checkpoint at step 500."""
    out = tmp_path_factory.mktemp("stopped")
    config = RunConfig(
        env="trace-conditioning",
        steps=3000,
        streams=2,
        independent=True,
        log_every=100,
        msre_window=300,
        learner_kwargs={"n_features": 2},
    )
    interrupted_run(config, out, at_step=600, checkpoint_every=500)
    return out, config


def refused(tmp_path, capsys, content, *flags):
    """Resume from a copy of the checkpoint with ``content``; return the error printed."""
    out = tmp_path / "run"
    out.mkdir()
    (out / CHECKPOINT_NAME).write_bytes(content)
    assert run_command(out, "--resume", *flags) == 2
    assert not (out / "metrics.csv").exists()
    assert (out / CHECKPOINT_NAME).read_bytes() == content
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--learner", "tbptt"], "learner is 'columnar' there, 'tbptt' here"),
        (["--lr", "0.5"], f"step_size is {DEFAULT_STEP_SIZE} there, 0.5 here"),
        (["--env-kwarg", "isi_min=5"], "env_kwargs.isi_min is '<absent>' there, 5 here"),
    ],
)
def test_checkpoint_of_another_run_is_refused(tmp_path, saved_checkpoint, capsys, flags, message):
    content = (saved_checkpoint[0] / CHECKPOINT_NAME).read_bytes()
    error = refused(tmp_path, capsys, content, *flags)
    assert "belongs to another run" in error and message in error


def test_checkpoint_of_another_env_is_refused(tmp_path, saved_checkpoint, capsys):
    content = (saved_checkpoint[0] / CHECKPOINT_NAME).read_bytes()
    out = tmp_path / "run"
    out.mkdir()
    (out / CHECKPOINT_NAME).write_bytes(content)
    argv = ["run", "trace-patterning", *SMALL_RUN[1:], "--resume", "--out", str(out)]
    assert main(argv) == 2
    assert "env is 'trace-conditioning' there, 'trace-patterning' here" in capsys.readouterr().err


def with_header(content, **changes):
    end = content.index(b"\n", len(MAGIC))
    header = json.loads(content[len(MAGIC) : end])
    return MAGIC + json.dumps({**header, **changes}).encode() + content[end:]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda content: content[: len(content) // 2], "truncated or damaged"),
        (lambda content: content[:30], "truncated or damaged: unreadable header"),
        (lambda content: content[:-9] + bytes([content[-9] ^ 1]) + content[-8:], "SHA-256"),
        (lambda content: with_header(content, format=2), "format version 2; this agentstate"),
        (lambda content: b"PK\x03\x04" + content, "not an agentstate checkpoint"),
    ],
)
def test_damaged_checkpoint_is_refused(tmp_path, saved_checkpoint, capsys, damage, message):
    content = damage((saved_checkpoint[0] / CHECKPOINT_NAME).read_bytes())
    assert message in refused(tmp_path, capsys, content)


def test_checkpoint_whose_state_does_not_fit_is_refused(tmp_path, saved_checkpoint):
    out, config = tmp_path / "run", saved_checkpoint[1]
    out.mkdir()
    save_checkpoint(out / CHECKPOINT_NAME, run_identity(config), 500, {"engine": {"bad": 1}})
    with pytest.raises(CheckpointError, match="does not fit this run"):
        run_experiment(config, out, progress=False, resume=True)
    assert not (out / "metrics.csv").exists()


def test_existing_checkpoint_needs_resume(tmp_path, saved_checkpoint, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / CHECKPOINT_NAME).write_bytes((saved_checkpoint[0] / CHECKPOINT_NAME).read_bytes())
    assert run_command(out) == 2
    assert "pass --resume to continue it" in capsys.readouterr().err


def test_checkpoints_need_an_env_that_saves_its_state(tmp_path, capsys):
    argv = ["run", "CartPole-v1", "--steps", "10", "--checkpoint-every", "5", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path)]) == 2
    assert "checkpoints need an environment that saves its own state" in capsys.readouterr().err


def test_atomic_write_replaces_whole_files_only(tmp_path):
    target = tmp_path / CHECKPOINT_NAME
    atomic_write_bytes(target, b"old")
    atomic_write_bytes(target, b"new content")
    assert target.read_bytes() == b"new content"
    assert [path.name for path in tmp_path.iterdir()] == [CHECKPOINT_NAME]
    (tmp_path / f".{CHECKPOINT_NAME}.x1y2.tmp").write_bytes(b"left by a kill mid-write")
    remove_checkpoint(target)
    assert list(tmp_path.iterdir()) == []
