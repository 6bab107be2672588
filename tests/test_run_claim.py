"""A run folder's claim: one live process at a time, stale claims taken over, never lost."""

import json
import os
import socket
import subprocess
import sys

import pytest

from agentstate.run_claim import CLAIM_NAME, RunClaimedElsewhere, claim_run, read_claim

HOLD_CLAIM = """
import sys, time
from agentstate.run_claim import claim_run
with claim_run(sys.argv[1], "other-sweep"):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    """Another process holding ``tmp_path/run``'s claim for another sweep."""
    folder = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD_CLAIM, str(folder)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "held"
    yield folder, process
    process.kill()
    process.wait()


def test_a_claim_is_held_inside_the_block_and_removed_after(tmp_path):
    with claim_run(tmp_path / "run", "sweep-a"):
        claim = read_claim(tmp_path / "run")
        assert claim["sweep"] == "sweep-a" and claim["host"] == socket.gethostname()
    assert read_claim(tmp_path / "run") is None
    assert list((tmp_path / "run").iterdir()) == []  # no private files left behind


def test_a_claim_is_removed_when_the_run_raises(tmp_path):
    with pytest.raises(KeyError), claim_run(tmp_path, "sweep-a"):
        raise KeyError
    assert not (tmp_path / CLAIM_NAME).exists()


def test_a_live_process_keeps_its_claim_and_is_named(holder):
    folder, process = holder
    with pytest.raises(RunClaimedElsewhere) as refused, claim_run(folder, "sweep-b"):
        pytest.fail("ran a run another live sweep holds")
    message = str(refused.value)
    assert f"pid {process.pid}" in message and "other-sweep" in message
    assert f"delete {folder / CLAIM_NAME}" in message
    assert read_claim(folder)["pid"] == process.pid  # untouched


def test_the_claim_of_a_killed_process_is_taken_over(holder):
    folder, process = holder
    process.kill()
    process.wait()
    with claim_run(folder, "sweep-b"):
        assert read_claim(folder)["sweep"] == "sweep-b"
    assert read_claim(folder) is None


def test_an_earlier_attempt_of_the_same_sweep_is_taken_over(holder):
    """A Ray retry: the worker that made the claim died on a node that cannot be checked."""
    folder, process = holder
    with claim_run(folder, "other-sweep"):
        assert read_claim(folder)["pid"] == os.getpid() != process.pid


def test_a_claim_from_another_host_is_respected(tmp_path):
    record = {"claim": "x", "sweep": "s", "host": socket.gethostname() + "-elsewhere", "pid": 1}
    (tmp_path / CLAIM_NAME).write_text(json.dumps(record))
    with pytest.raises(RunClaimedElsewhere, match="-elsewhere"), claim_run(tmp_path, "mine"):
        pass
    assert json.loads((tmp_path / CLAIM_NAME).read_text()) == record


def test_a_reused_pid_does_not_keep_a_dead_claim(tmp_path):
    """This process's pid, recorded with another start time: the claim's process is gone."""
    if not sys.platform.startswith("linux"):
        pytest.skip("process start times come from /proc")
    record = {
        "claim": "x",
        "sweep": "s",
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "process_start": "-1",
    }
    (tmp_path / CLAIM_NAME).write_text(json.dumps(record))
    with claim_run(tmp_path, "mine"):
        assert read_claim(tmp_path)["sweep"] == "mine"
