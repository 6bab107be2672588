"""How a box action enters the recurrent core: clipped as the env clips it, then scaled."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor


@dataclass(frozen=True)
class ActionBounds:
    """Per action dimension (``[A]`` float64 each): the clip range and the affine map after it.

    ``encode(a) = clip(a, low, high) * scale + offset``. Where both bounds are finite the map
    sends ``[low, high]`` to ``[-1, 1]``; along an unbounded side the action passes through.
    """

    low: Tensor
    high: Tensor
    scale: Tensor
    offset: Tensor

    @classmethod
    def of(cls, action_space: spaces.Space, n_actions: int) -> ActionBounds:
        """The bounds of a Box space (a Discrete space gets the identity, never used)."""
        if isinstance(action_space, spaces.Box):
            low = torch.as_tensor(np.asarray(action_space.low, dtype=np.float64).reshape(-1))
            high = torch.as_tensor(np.asarray(action_space.high, dtype=np.float64).reshape(-1))
        else:
            low = torch.full((n_actions,), -torch.inf, dtype=torch.float64)
            high = torch.full((n_actions,), torch.inf, dtype=torch.float64)
        bounded = torch.isfinite(low) & torch.isfinite(high) & (high > low)
        half_width = torch.where(bounded, (high - low) / 2, torch.ones_like(low))
        middle = torch.where(bounded, (high + low) / 2, torch.zeros_like(low))
        return cls(low=low, high=high, scale=1 / half_width, offset=-middle / half_width)

    @property
    def log_half_width(self) -> Tensor:
        """``[A]``: log of each dimension's half-width (0 along an unbounded one)."""
        return -torch.log(self.scale)

    def encode(self, action: Tensor) -> Tensor:
        """``[B, A]`` actions as the core sees them, in ``action``'s dtype."""
        dtype = action.dtype
        clipped = torch.clamp(action, self.low.to(dtype), self.high.to(dtype))
        return clipped * self.scale.to(dtype) + self.offset.to(dtype)
