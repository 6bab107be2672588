"""Durable files: atomic writes and self-checking run checkpoints.

A checkpoint file is three parts, the first two each one line::

    agentstate-checkpoint                          the magic line
    {"format": 1, "identity": {...}, "step": N,    the JSON header
     "payload_bytes": n, "payload_sha256": "..."}
    <n bytes>                                      torch.save of the state

Everything is checked before anything is unpickled: the magic line, the format version, the
payload's length (a truncated file) and its SHA-256 (a damaged one), then the identity (the
run the checkpoint belongs to). The payload is read with ``torch.load(weights_only=True)``,
so a checkpoint holds tensors and plain Python values only and loading one runs no code;
numpy arrays are stored as tensors and come back as tensors (consumers take array-likes).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_FORMAT = 1
"""Version of the file layout and of the state it holds; other versions are refused."""
MAGIC = b"agentstate-checkpoint\n"


class CheckpointError(ValueError):
    """A checkpoint that is corrupt, of another format, or of another run."""


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``path`` by ``data`` so that a crash leaves either the old or the new file.

    The bytes go to a temporary file in the same folder, which is flushed and fsynced, then
    renamed over ``path`` (``os.replace`` is atomic within a file system); the folder is
    fsynced so that the rename itself survives a power loss. A kill during the write can
    leave a ``.<name>.*.tmp`` file behind, which nothing reads (``remove_checkpoint``
    deletes those of a checkpoint).

    Args:
        path: the file to write; its folder must exist.
        data: the complete new content.
    """
    target = Path(path)
    descriptor, temporary = tempfile.mkstemp(
        dir=target.parent, prefix=_temporary_prefix(target), suffix=".tmp"
    )
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    folder = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def remove_checkpoint(path: str | os.PathLike[str]) -> None:
    """Delete a checkpoint and any temporary file a killed write of it left behind."""
    target = Path(path)
    target.unlink(missing_ok=True)
    for leftover in target.parent.glob(f"{_temporary_prefix(target)}*.tmp"):
        leftover.unlink(missing_ok=True)


def _temporary_prefix(target: Path) -> str:
    return f".{target.name}."


def save_checkpoint(
    path: str | os.PathLike[str], identity: Mapping[str, Any], step: int, state: Any
) -> None:
    """Write ``state`` atomically as a checkpoint of the run described by ``identity``.

    Args:
        path: the checkpoint file (replaced atomically).
        identity: JSON-serialisable description of the run; ``load_checkpoint`` refuses the
            file unless it is given the same identity.
        step: the step the state was taken at (readable without loading, see ``saved_step``).
        state: nested dicts / lists of tensors, numpy arrays and plain Python values.
    """
    buffer = io.BytesIO()
    torch.save(_tensors_for_arrays(state), buffer)
    payload = buffer.getvalue()
    header = {
        "format": CHECKPOINT_FORMAT,
        "identity": identity,
        "step": int(step),
        "payload_bytes": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
    }
    atomic_write_bytes(path, MAGIC + json.dumps(header).encode() + b"\n" + payload)


def saved_step(path: str | os.PathLike[str]) -> int | None:
    """The step a checkpoint was taken at, from its header; None if there is no file.

    Raises:
        CheckpointError: if the file is not a readable agentstate checkpoint header.
    """
    checkpoint = Path(path)
    if not checkpoint.exists():
        return None
    with checkpoint.open("rb") as handle:
        head = handle.read(len(MAGIC))
        header_line = handle.readline()
    return int(_parse_header(checkpoint, head + header_line)[0]["step"])


def load_checkpoint(
    path: str | os.PathLike[str], identity: Mapping[str, Any]
) -> tuple[int, dict[str, Any]]:
    """Read a checkpoint after checking its integrity and that it belongs to ``identity``.

    Args:
        path: the checkpoint file.
        identity: the current run's identity, as given to ``save_checkpoint``.

    Returns:
        ``(step, state)``.

    Raises:
        CheckpointError: if the file is truncated, damaged, of another format version, or
            was written by a run with another identity (the message names what differs).
    """
    checkpoint = Path(path)
    content = checkpoint.read_bytes()
    header, payload_start = _parse_header(checkpoint, content)
    payload = content[payload_start:]
    if len(payload) != header["payload_bytes"]:
        raise CheckpointError(
            f"checkpoint {checkpoint} is truncated or damaged: it holds {len(payload)} payload "
            f"bytes, its header says {header['payload_bytes']}"
        )
    if hashlib.sha256(payload).hexdigest() != header["payload_sha256"]:
        raise CheckpointError(
            f"checkpoint {checkpoint} is damaged: its payload does not match its SHA-256"
        )
    differences = describe_differences(header["identity"], json.loads(json.dumps(identity)))
    if differences:
        raise CheckpointError(
            f"checkpoint {checkpoint} belongs to another run ({'; '.join(differences)}); "
            "resume with the settings it was written with, or use another output folder"
        )
    state = torch.load(io.BytesIO(payload), weights_only=True)
    return int(header["step"]), state


def describe_differences(
    saved: Mapping[str, Any], current: Mapping[str, Any], prefix: str = ""
) -> list[str]:
    """Name each leaf where two nested mappings differ, e.g. ``learner is 'a' there, 'b' here``.

    Args:
        saved: the mapping found in a file ("there").
        current: the mapping of the current run ("here").
        prefix: dotted path of the two mappings inside a larger one.

    Returns:
        One line per differing key, in sorted key order; empty when they are equal.
    """
    lines = []
    for key in sorted(set(saved) | set(current)):
        name = f"{prefix}{key}"
        there, here = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(there, Mapping) and isinstance(here, Mapping):
            lines += describe_differences(there, here, f"{name}.")
        elif there != here:
            lines.append(f"{name} is {there!r} there, {here!r} here")
    return lines


def _parse_header(path: Path, content: bytes) -> tuple[dict[str, Any], int]:
    """The header of a checkpoint file's ``content`` and where its payload starts."""
    if not content.startswith(MAGIC):
        raise CheckpointError(f"{path} is not an agentstate checkpoint (no magic line)")
    end = content.find(b"\n", len(MAGIC))
    try:
        if end < 0:
            raise ValueError("no end of line")
        header = json.loads(content[len(MAGIC) : end])
    except ValueError as error:
        raise CheckpointError(
            f"checkpoint {path} is truncated or damaged: unreadable header ({error})"
        ) from None
    if not isinstance(header, dict) or header.get("format") != CHECKPOINT_FORMAT:
        found = header.get("format") if isinstance(header, dict) else None
        raise CheckpointError(
            f"checkpoint {path} has format version {found!r}; this agentstate reads "
            f"version {CHECKPOINT_FORMAT} only"
        )
    return header, end + 1


def _tensors_for_arrays(tree: Any) -> Any:
    """Copy of ``tree`` with numpy arrays as tensors and numpy scalars as Python numbers."""
    if isinstance(tree, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(tree).copy())
    if isinstance(tree, np.generic):
        return tree.item()
    if isinstance(tree, Mapping):
        return {key: _tensors_for_arrays(value) for key, value in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(_tensors_for_arrays(value) for value in tree)
    return tree
