"""Stabilisers of streaming reinforcement learning (Elsayed, Vasan & Mahmood 2024).

"Streaming deep RL finally works" learns from one transition at a time, with no replay and no
batch, by three devices this module implements for B streams at once:

* :func:`obgd_update`, the overshooting-bounded step: with eligibility trace ``z``, TD error
  ``delta`` and step size ``alpha``, ``M = alpha kappa max(|delta|, 1) ||z||_1`` and the step
  taken is ``alpha / max(M, 1)``, so that one update never moves the prediction by more than
  ``delta`` itself (Algorithm 3 of the paper; ``kappa`` 2 for the critic, 3 for the actor);
* :class:`RunningMeanStd`, observation normalisation by the running (unweighted) mean and
  variance of everything seen so far;
* :class:`RewardScaler`, rewards divided by the running standard deviation of the discounted
  sum of rewards.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor


class RunningMeanStd:
    """Running mean and variance of ``[B, size]`` batches (Chan et al.'s parallel update).

    ``normalize(x) = (x - mean) / sqrt(variance + eps)``; ``update`` folds a batch in.

    Example:
        >>> statistics = RunningMeanStd(2)
        >>> statistics.update(torch.tensor([[1.0, 0.0], [3.0, 0.0]], dtype=torch.float64))
        >>> statistics.mean.tolist(), statistics.variance.tolist()
        ([2.0, 0.0], [1.0, 0.0])
    """

    def __init__(self, size: int, eps: float = 1e-8) -> None:
        self.sample_count = torch.zeros((), dtype=torch.float64)
        """How many rows were folded in (a float64 scalar tensor, updated in place)."""
        self.mean = torch.zeros(size, dtype=torch.float64)
        self.sum_of_squares = torch.zeros(size, dtype=torch.float64)
        """Sum of squared deviations from the mean (Welford's ``M2``)."""
        self.eps = eps

    @property
    def count(self) -> int:
        """How many rows were folded in."""
        return int(self.sample_count)

    @property
    def variance(self) -> Tensor:
        """Population variance of everything seen (0 before any data)."""
        return self.sum_of_squares / max(float(self.sample_count), 1.0)

    def update(self, batch: Tensor) -> None:
        """Fold ``batch: [n, size]`` in (every tensor is updated in place)."""
        batch = batch.to(self.mean.dtype)
        n = float(batch.shape[0])
        count = float(self.sample_count)
        batch_mean = batch.mean(0)
        batch_squares = ((batch - batch_mean) ** 2).sum(0)
        total = count + n
        delta = batch_mean - self.mean
        self.mean += delta * (n / total)
        self.sum_of_squares += batch_squares + delta**2 * (count * n / total)
        self.sample_count.fill_(total)

    def normalize(self, x: Tensor) -> Tensor:
        """``(x - mean) / sqrt(variance + eps)`` in ``x``'s dtype."""
        scale = torch.sqrt(self.variance + self.eps)
        return ((x - self.mean) / scale).to(x.dtype)

    def state_dict(self) -> dict[str, Any]:
        """Statistics, for checkpoints."""
        return {"count": self.count, "mean": self.mean.clone(), "m2": self.sum_of_squares.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``."""
        if tuple(state["mean"].shape) != tuple(self.mean.shape):
            raise ValueError(
                f"running statistics of size {tuple(state['mean'].shape)} cannot load into "
                f"size {tuple(self.mean.shape)}"
            )
        self.sample_count.fill_(float(state["count"]))
        self.mean.copy_(state["mean"])
        self.sum_of_squares.copy_(state["m2"])


class RewardScaler:
    """Rewards divided by the running std of each stream's discounted reward sum.

    Per stream ``u <- gamma (1 - done) u + r`` (``done`` of the previous transition), and the
    running variance of ``u`` over every stream and step so far scales the reward.
    """

    def __init__(self, streams: int, gamma: float, eps: float = 1e-8) -> None:
        self.gamma = gamma
        self.discounted_sum = torch.zeros(streams, dtype=torch.float64)
        self.statistics = RunningMeanStd(1, eps)

    def scale(self, reward: Tensor, done: Tensor) -> Tensor:
        """``reward: [B]`` of the transitions that just happened, scaled.

        ``done: [B]`` bool marks the transitions that ended their episode.
        """
        self.discounted_sum.mul_(self.gamma).add_(reward.double())
        self.statistics.update(self.discounted_sum[:, None])
        scaled = reward.double() / torch.sqrt(self.statistics.variance[0] + self.statistics.eps)
        self.discounted_sum.masked_fill_(done, 0.0)
        return scaled.to(reward.dtype)

    def state_dict(self) -> dict[str, Any]:
        """Running sums and statistics, for checkpoints."""
        return {"sum": self.discounted_sum.clone(), "statistics": self.statistics.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``."""
        self.discounted_sum.copy_(state["sum"])
        self.statistics.load_state_dict(state["statistics"])


def obgd_update(
    params: Mapping[str, Tensor],
    traces: Mapping[str, Tensor],
    td_error: Tensor,
    step_size: float,
    kappa: float,
) -> Tensor:
    """Overshooting-bounded step ``theta += alpha_b delta_b z_b``, averaged over streams.

    Args:
        params: name -> parameter ``[P, ...]`` (``P`` = 1: shared by the streams; or B).
        traces: name -> eligibility trace ``[B, ...]`` of the same parameter.
        td_error: ``delta: [B]``.
        step_size: ``alpha``.
        kappa: the bound's safety factor (the paper: 2 for a critic, 3 for an actor).

    Returns:
        The step size each stream took, ``alpha / max(M_b, 1)``: ``[B]``.
    """
    trace_norm = sum(trace.flatten(1).abs().sum(1) for trace in traces.values())
    assert isinstance(trace_norm, Tensor)
    bound = step_size * kappa * td_error.abs().clamp(min=1.0) * trace_norm
    taken = step_size / bound.clamp(min=1.0)  # [B]
    scale = taken * td_error
    with torch.no_grad():
        for name, param in params.items():
            trace = traces[name]
            update = scale.view(-1, *([1] * (trace.dim() - 1))) * trace
            param += update.mean(0, keepdim=True) if param.shape[0] == 1 else update
    return taken
