"""The actor's random draws, made in blocks so that one step costs no call into torch's RNG.

Both the eager and the compiled actor-critic step read the same draws (a uniform per stream
for discrete actions, inverted through the policy's CDF; a standard normal per action
dimension for boxes), so the two backends act identically and a saved agent resumes with the
very draws it would have made.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

BLOCK_STEPS = 1024
"""Steps of draws made at once."""


class NoiseBlocks:
    """Per-step noise ``[B]`` (uniform in [0, 1)) or ``[B, A]`` (standard normal).

    Example:
        >>> noise = NoiseBlocks(streams=2, size=None, dtype=torch.float64, seed=0)
        >>> draw = noise.next()
        >>> draw.shape, bool(((0 <= draw) & (draw < 1)).all())
        (torch.Size([2]), True)
    """

    def __init__(self, streams: int, size: int | None, dtype: torch.dtype, seed: int) -> None:
        self.shape = (streams,) if size is None else (streams, size)
        self.normal = size is not None
        self.dtype = dtype
        self.generator = torch.Generator().manual_seed(seed)
        self.block = torch.empty(0, *self.shape, dtype=dtype)
        self.position = 0

    def next(self) -> Tensor:
        """This step's draws (a contiguous view, valid until the block is refilled)."""
        if self.position == len(self.block):
            draw = torch.randn if self.normal else torch.rand
            self.block = draw((BLOCK_STEPS, *self.shape), generator=self.generator, dtype=self.dtype)
            self.position = 0
        row = self.block[self.position]
        self.position += 1
        return row

    def state_dict(self) -> dict[str, Any]:
        """The generator, the current block and the position in it."""
        return {
            "generator": self.generator.get_state(),
            "block": self.block.clone(),
            "position": self.position,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``."""
        if tuple(state["block"].shape[1:]) != self.shape:
            raise ValueError(
                f"noise of shape {tuple(state['block'].shape[1:])} cannot load into {self.shape}"
            )
        self.generator.set_state(state["generator"])
        self.block = state["block"].clone()
        self.position = int(state["position"])
