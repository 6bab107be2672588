"""The actor's random draws, made in blocks so that one step costs no call into torch's RNG.

Both the eager and the compiled actor-critic step read the same draws (a uniform per stream
for discrete actions, inverted through the policy's CDF; a standard normal per action
dimension for boxes), so the two backends act identically and a saved agent resumes with the
very draws it would have made.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
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
        self._rows = 0
        self._address = 0
        self._row_bytes = int(np.prod(self.shape)) * self.block.element_size()

    def next(self) -> Tensor:
        """This step's draws (a contiguous view, valid until the block is refilled)."""
        self._advance()
        return self.block[self.position - 1]

    def next_address(self) -> int:
        """The address of this step's draws (what ``next()`` would return), for a kernel."""
        self._advance()
        return self._address + (self.position - 1) * self._row_bytes

    def _advance(self) -> None:
        if self.position == self._rows:
            draw = torch.randn if self.normal else torch.rand
            self.block = draw(
                (BLOCK_STEPS, *self.shape), generator=self.generator, dtype=self.dtype
            )
            self._adopt(0)
        self.position += 1

    def _adopt(self, position: int) -> None:
        self.position = position
        self._rows = len(self.block)
        self._address = self.block.data_ptr()

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
        self.block = state["block"].to(self.dtype).contiguous().clone()
        self._adopt(int(state["position"]))
