"""Online normalisation of inputs and features, as in the authors' C++ (background §2)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class OnlineNormalizer:
    """Running mean and variance by exponential moving averages.

    ``normalize(x) = (x - mean) / sqrt(variance)`` uses the statistics *before* ``update(x)``
    folds ``x`` in. Updates, with decay ``r`` and floor ``variance_floor``::

        mean     <- r mean + (1 - r) x
        variance <- max(r variance + (1 - r) (x - mean)^2, variance_floor)

    Statistics are shaped ``[P, size]``: ``P = 1`` shares them across streams (each update
    averages over streams), ``P = B`` keeps one set per stream. ``decay = 1`` freezes them at
    mean 0, variance 1 (no normalisation).
    """

    def __init__(
        self,
        size: int,
        *,
        param_streams: int,
        decay: float,
        variance_floor: float,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"normalization decay must lie in (0, 1], got {decay!r}")
        if not variance_floor > 0.0:
            raise ValueError(f"variance_floor must be > 0, got {variance_floor!r}")
        self.decay = decay
        self.variance_floor = variance_floor
        self.mean = torch.zeros(param_streams, size, dtype=dtype, device=device)
        self.variance = torch.ones(param_streams, size, dtype=dtype, device=device)

    @property
    def std(self) -> Tensor:
        """``sqrt(variance)``, ``[P, size]``."""
        return self.variance.sqrt()

    def normalize(self, x: Tensor) -> Tensor:
        """``(x - mean) / std`` for ``x: [B, size]``."""
        return (x - self.mean) / self.std

    def update(self, x: Tensor) -> None:
        """Fold ``x: [B, size]`` into the statistics."""
        if self.decay == 1.0:
            return
        rate = 1.0 - self.decay
        shared = self.mean.shape[0] == 1
        sample = x.mean(0, keepdim=True) if shared else x
        self.mean.mul_(self.decay).add_(sample, alpha=rate)
        deviation = (x - self.mean).square()
        if shared:
            deviation = deviation.mean(0, keepdim=True)
        self.variance.mul_(self.decay).add_(deviation, alpha=rate)
        self.variance.clamp_(min=self.variance_floor)

    def state_dict(self) -> dict[str, Any]:
        """Statistics, for checkpoints."""
        return {"mean": self.mean.clone(), "variance": self.variance.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore statistics saved by ``state_dict``."""
        for name in ("mean", "variance"):
            target = getattr(self, name)
            if tuple(state[name].shape) != tuple(target.shape):
                raise ValueError(
                    f"normalizer {name} has shape {tuple(state[name].shape)} in the saved "
                    f"state, expected {tuple(target.shape)}"
                )
            target.copy_(state[name])
