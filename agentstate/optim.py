"""Optimisers for TD updates; each follows ``torch.optim``'s convention (``p.grad`` = -update)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

OPTIMIZERS = ("sgd", "rmsprop_td", "adam")


class TDRMSProp(torch.optim.Optimizer):
    """The authors' RMSProp-style normaliser, without momentum (background §2).

    With ``g = -p.grad`` (the TD update direction ``delta * trace``)::

        v <- beta v + (1 - beta) g^2          (v starts at 1, not 0)
        p <- p + lr g / (sqrt(v) + eps)
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        beta: float = 0.9999,
        eps: float = 1e-8,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"step size must be >= 0, got {lr!r}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must lie in [0, 1), got {beta!r}")
        super().__init__(params, {"lr": lr, "beta": beta, "eps": eps})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        """Apply one update to every parameter with a gradient."""
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                second_moment = self.second_moment(param)
                second_moment.mul_(group["beta"]).addcmul_(
                    param.grad, param.grad, value=1.0 - group["beta"]
                )
                param.addcdiv_(
                    param.grad, second_moment.sqrt().add_(group["eps"]), value=-group["lr"]
                )

    def second_moment(self, param: Tensor) -> Tensor:
        """The running ``v`` of ``param`` (created at 1 on first use)."""
        state = self.state[param]
        if "second_moment" not in state:
            state["second_moment"] = torch.ones_like(param)
        return state["second_moment"]


def optimizer_state(
    optimizer: torch.optim.Optimizer, param: Tensor
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The state tensors one step of ``optimizer`` reads and writes for ``param``.

    Created as the optimiser's own first step would create them, so a fused kernel can update
    them in place and the optimiser (and its ``state_dict``) carries on from there.

    Returns:
        ``(second_moment, None, None)`` for ``TDRMSProp``; ``(exp_avg, exp_avg_sq, step)`` for
        ``torch.optim.Adam``; ``(None, None, None)`` for ``torch.optim.SGD`` without momentum.
    """
    if isinstance(optimizer, TDRMSProp):
        return optimizer.second_moment(param), None, None
    if isinstance(optimizer, torch.optim.Adam):
        state = optimizer.state[param]
        if not state:  # as torch.optim.Adam._init_group, without capturable/fused/amsgrad
            scalar_dtype = (
                torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
            )
            state["step"] = torch.tensor(0.0, dtype=scalar_dtype)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state["exp_avg"], state["exp_avg_sq"], state["step"]
    return None, None, None


def restart_entries(optimizer: torch.optim.Optimizer, param: Tensor, index: slice) -> None:
    """Give ``param[..., index]`` the optimiser state of entries that never had a gradient.

    A constructive learner's heads of features that are not built yet get no gradient, yet
    ``rmsprop_td``'s second moment decays on them (to ~0 over a long stage); restarting them
    when their feature is built keeps their first update at the step size (the authors keep
    it at 1 until then).
    """
    state = optimizer.state.get(param)
    if not state:
        return
    if isinstance(optimizer, TDRMSProp):
        state["second_moment"][..., index] = 1.0
    elif isinstance(optimizer, torch.optim.Adam):
        state["exp_avg"][..., index] = 0.0
        state["exp_avg_sq"][..., index] = 0.0


def make_optimizer(name: str, param_groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """Build ``sgd``, ``rmsprop_td`` or ``adam`` over ``param_groups`` (each with its ``lr``)."""
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=param_groups[0]["lr"])
    if name == "rmsprop_td":
        return TDRMSProp(param_groups, lr=param_groups[0]["lr"])
    if name == "adam":
        return torch.optim.Adam(param_groups, lr=param_groups[0]["lr"])
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
