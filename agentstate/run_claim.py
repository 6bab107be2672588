"""A run folder's claim: one process at a time writes into it, across sweeps and machines.

Two sweeps over one output folder (one per core, or a sweep started twice by mistake) would
otherwise run the same unfinished run twice, both writing its metrics and checkpoint. A run
claims its folder before it writes there, by creating ``<folder>/running.json`` atomically
(a hard link of a complete file: it appears whole or not at all, and only one creator
wins). The claim names the host, the process (pid and, on Linux, its start time, which a
reused pid does not share) and the sweep; it is removed when the run ends, however it ends.

A claim left behind by a process that died without removing it is *stale* and is taken
over when the holder ran on this host and its process is gone, or when it belongs to the
same sweep (a Ray retry of a run whose worker died). A claim held by a live process, or by
another sweep on another host (whose process cannot be checked from here), is respected:
``claim_run`` raises ``RunClaimedElsewhere`` with the holder and the file to delete if
that holder is known to be gone.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CLAIM_NAME = "running.json"
"""A run folder's claim file, present while a process runs into the folder."""
_ATTEMPTS = 5


class RunClaimedElsewhere(RuntimeError):
    """Another live process runs this run (or finished it while this one waited)."""


@contextlib.contextmanager
def claim_run(folder: str | os.PathLike[str], sweep_id: str) -> Iterator[None]:
    """Hold ``folder``'s claim for the body of the ``with`` block.

    Args:
        folder: the run's folder (created if missing).
        sweep_id: the claiming sweep's id; a claim of the same id is an earlier attempt of
            this run in this sweep and is taken over.

    Raises:
        RunClaimedElsewhere: if a live process (or another sweep on another host) holds
            the claim; the message names it and the file to delete if it is gone.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    claim = folder / CLAIM_NAME
    mine = _claim_record(sweep_id)
    pending = _write_private(folder, mine)
    try:
        _acquire(claim, pending, mine["claim"], sweep_id)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pending)
    try:
        yield
    finally:
        _release(claim, mine["claim"])


def read_claim(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The claim record in ``folder``, or None if no process holds it."""
    try:
        return json.loads((Path(folder) / CLAIM_NAME).read_text())
    except FileNotFoundError:
        return None


def _acquire(claim: Path, pending: Path, claim_id: str, sweep_id: str) -> None:
    for _ in range(_ATTEMPTS):
        try:
            os.link(pending, claim)
            return
        except FileExistsError:
            pass
        holder = read_claim(claim.parent)
        if holder is None:  # released between the link and the read
            continue
        if not _is_stale(holder, sweep_id):
            raise RunClaimedElsewhere(_describe_holder(claim, holder))
        _take_over_stale(claim, holder, claim_id)
    raise RunClaimedElsewhere(
        f"{claim.parent}: its claim changed hands {_ATTEMPTS} times while this process tried "
        "to take it; another sweep is starting this run"
    )


def _take_over_stale(claim: Path, stale: dict[str, Any], claim_id: str) -> None:
    """Move the stale claim aside; if another process replaced it first, put theirs back."""
    aside = claim.with_name(f".{CLAIM_NAME}.{claim_id}.stale")
    try:
        os.rename(claim, aside)
    except FileNotFoundError:
        return  # another process took it over or it was released: try again
    moved = json.loads(aside.read_text())
    if moved.get("claim") != stale.get("claim"):  # a fresh claim, made after our read
        os.rename(aside, claim)
        raise RunClaimedElsewhere(_describe_holder(claim, moved))
    os.unlink(aside)


def _release(claim: Path, claim_id: str) -> None:
    holder = read_claim(claim.parent)
    if holder is not None and holder.get("claim") == claim_id:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(claim)


def _claim_record(sweep_id: str) -> dict[str, Any]:
    pid = os.getpid()
    return {
        "claim": uuid.uuid4().hex,
        "sweep": sweep_id,
        "host": socket.gethostname(),
        "pid": pid,
        "process_start": _process_start(pid),
        "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _write_private(folder: Path, record: dict[str, Any]) -> Path:
    """The complete claim in a file of its own beside the claim, ready to be linked."""
    descriptor, path = tempfile.mkstemp(dir=folder, prefix=f".{CLAIM_NAME}.", suffix=".tmp")
    with os.fdopen(descriptor, "w") as handle:
        json.dump(record, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    return Path(path)


def _is_stale(holder: dict[str, Any], sweep_id: str) -> bool:
    if holder.get("sweep") == sweep_id:
        return True
    if holder.get("host") != socket.gethostname():
        return False
    return not _process_alive(int(holder["pid"]), holder.get("process_start"))


def _process_alive(pid: int, process_start: str | None) -> bool:
    """Whether the process that made a claim still runs (a reused pid does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    stat = _read_stat(pid)
    if stat is None:  # no /proc (not Linux): the pid is all there is to go by
        return True
    state, start = stat
    return state != "Z" and (process_start is None or start == process_start)


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), None where unknown."""
    stat = _read_stat(pid)
    return None if stat is None else stat[1]


def _read_stat(pid: int) -> tuple[str, str] | None:
    """``(state, start time)`` from ``/proc/<pid>/stat`` (fields 3 and 22), None without it."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[-1].split()
    except OSError:
        return None
    return fields[0], fields[19]


def _describe_holder(claim: Path, holder: dict[str, Any]) -> str:
    return (
        f"{claim.parent} is being run by pid {holder.get('pid')} on {holder.get('host')} "
        f"(sweep {holder.get('sweep')}, since {holder.get('since')}); that sweep finishes it. "
        f"If no process runs it any more, delete {claim} and run the sweep again"
    )
