"""The state-learner protocol: a recurrent cell plus an online credit-assignment rule.

Every tensor carries a leading *stream* dimension ``B``: the envs of a vector env, or
independent runs. Parameters are shaped ``[1, ...]`` (shared by all streams) or ``[B, ...]``
(one independent network per stream). Both modes are the same code through broadcasting.

A learner answers two questions each step:

* ``step(x)`` advances the recurrent state and returns the agent state ``h: [B, n_features]``;
* ``grad(v)`` returns, for every stream ``b``, its estimate of ``d(v_b . h_b,t) / d theta``
  at the current step, without an autograd graph that grows with time.

``functional_step`` is the same cell as a pure function of ``(params, carry, x)`` that autograd
can differentiate; the test suite uses it as the oracle for ``grad``.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

Carry = tuple[Tensor, ...]
"""The recurrent state of a cell: a tuple of tensors, each with leading stream dimension."""

STATE_DICT_FORMAT = 1


class StateLearner(abc.ABC):
    """Base class of every state learner.

    Subclasses implement the cell (``initial_carry``, ``functional_step``) and the rule
    (``_advance``, ``_grad``, ``_reset_credit``); this class validates input, owns the
    stream and parameter bookkeeping, and serialises state.

    Attributes:
        name: registered learner name.
        exact: whether ``grad`` is the exact gradient (matches BPTT over the whole history).
        state_bound: a bound on ``|h|`` entries, or None.
        input_size: size ``d`` of each stream's input vector.
        streams: number of streams ``B``.
        independent_params: parameters shaped ``[B, ...]`` (True) or ``[1, ...]`` (False).
        n_features: size ``n`` of the agent state ``h``.
        params: the parameters the rule currently trains, leaf tensors ``[1 or B, ...]``.
        carry: the recurrent state, a tuple of ``[B, ...]`` tensors.
    """

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = False
    state_bound: ClassVar[float | None] = None
    """Every entry of the agent state lies in ``[-state_bound, state_bound]``; None: no
    bound but finiteness (a wrapper declares the observation space from it)."""

    def __init__(
        self,
        input_size: int,
        config: Any,
        *,
        streams: int = 1,
        independent_params: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        seed: int | None = None,
    ) -> None:
        if not isinstance(input_size, int) or isinstance(input_size, bool) or input_size < 1:
            raise ValueError(f"{self.name}: input_size must be a positive int, got {input_size!r}")
        if not isinstance(streams, int) or isinstance(streams, bool) or streams < 1:
            raise ValueError(f"{self.name}: streams must be a positive int, got {streams!r}")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(
                f"{self.name}: dtype must be torch.float32 or torch.float64, got {dtype}"
            )
        self.input_size = input_size
        self.config = config
        self.streams = streams
        self.independent_params = bool(independent_params)
        self.dtype = dtype
        self.device = torch.device(device)
        self.seed = seed
        self.generator = torch.Generator(device="cpu")
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(int(seed))
        self.params: dict[str, Tensor] = {}
        self.carry: Carry = ()

    # ------------------------------------------------------------------ shapes
    @property
    def param_streams(self) -> int:
        """Leading size of every parameter: ``streams`` if independent, else 1."""
        return self.streams if self.independent_params else 1

    @property
    @abc.abstractmethod
    def n_features(self) -> int:
        """Size of the agent state ``h``."""

    @property
    def n_built_features(self) -> int:
        """Entries of ``h`` that exist yet: the first ``n_built_features`` (the rest are 0).

        All of them, except for a constructive learner whose later columns are not built yet.
        """
        return self.n_features

    @property
    def normalizes_inputs(self) -> bool:
        """Whether ``step`` normalises its raw input itself.

        A TD engine then hands it the observation as it is instead of normalising it upstream.
        """
        return False

    # ------------------------------------------------------------------ the cell
    @abc.abstractmethod
    def initial_carry(self) -> Carry:
        """The recurrent state at the start of a stream: a tuple of ``[B, ...]`` zeros."""

    @abc.abstractmethod
    def functional_step(
        self, params: Mapping[str, Tensor], carry: Carry, x: Tensor
    ) -> tuple[Carry, Tensor]:
        """Pure cell step, differentiable by autograd.

        Args:
            params: tensors with the keys and shapes of ``self.params`` (a leading ``1`` or
                ``B``; any leading size that broadcasts against the streams works).
            carry: the recurrent state from the previous step.
            x: input ``[B, input_size]``.

        Returns:
            ``(next_carry, h)`` with ``h: [B, n_features]``; ``h`` equals what ``step`` returns.
        """

    # ------------------------------------------------------------------ the rule
    @abc.abstractmethod
    def _advance(self, x: Tensor) -> Tensor:
        """Advance carry and credit-assignment memory by one step; return ``h``."""

    @abc.abstractmethod
    def _grad(self, v: Tensor) -> dict[str, Tensor]:
        """Per-stream gradient estimate of ``v . h_t``; ``v`` is validated."""

    @abc.abstractmethod
    def _reset_credit(self, mask: Tensor) -> None:
        """Zero the credit-assignment memory of the streams in ``mask: [B] bool``."""

    def _credit_state(self) -> dict[str, Tensor]:
        """Tensors of the credit-assignment memory, for ``state_dict`` (by reference)."""
        return {}

    # ------------------------------------------------------------------ public API
    def step(self, x: Tensor) -> Tensor:
        """Advance every stream by one input.

        Args:
            x: ``[streams, input_size]``, the learner's dtype and device, all finite.

        Returns:
            The agent state ``h: [streams, n_features]`` (a fresh tensor the caller may keep).
        """
        self._check_input(x, "x", (self.streams, self.input_size))
        if not bool(torch.isfinite(x).all()):
            bad = (~torch.isfinite(x)).nonzero()[0].tolist()
            raise ValueError(
                f"{self.name}: x holds a non-finite value (first at stream {bad[0]}, "
                f"component {bad[1]}); clean or clip the observation before the learner"
            )
        self.begin_step()
        return self._advance(x)

    def begin_step(self) -> None:  # noqa: B027 - a hook: most learners need nothing here
        """Prepare the step about to be taken (nothing by default).

        Called once before every step, by ``step`` and, before a compiled step, by the TD
        engine (whose kernel then advances the learner in place): the one place for what a
        step starts with, e.g. a constructive learner's stage schedule or the step's random
        draws. Not called for a step refused for non-finite input.
        """

    def grad(self, v: Tensor) -> dict[str, Tensor]:
        """Gradient of ``v_b . h_b,t`` with respect to each parameter, per stream ``b``.

        Args:
            v: ``[streams, n_features]`` weights on the current agent state.

        Returns:
            Same keys as ``params``; each value ``[streams, *param.shape[1:]]``.
        """
        self._check_input(v, "v", (self.streams, self.n_features))
        return self._grad(v)

    def reset(self, mask: Tensor | None = None, *, in_place: bool = False) -> None:
        """Zero the recurrent state and credit-assignment memory of the masked streams.

        Args:
            mask: ``[streams]`` bool; ``None`` resets every stream.
            in_place: zero the carry tensors themselves rather than replacing them. Only for
                an owner of the carry that advances it in place anyway (the fused TD step):
                a tensor handed out by ``step`` earlier would change with it.
        """
        if mask is None:
            mask = torch.ones(self.streams, dtype=torch.bool, device=self.device)
        elif (
            not isinstance(mask, Tensor)
            or mask.dtype != torch.bool
            or mask.shape != (self.streams,)
        ):
            raise ValueError(
                f"{self.name}: reset mask must be a bool tensor of shape [{self.streams}], "
                f"got {_describe(mask)}"
            )
        mask = mask.to(self.device)
        if in_place:
            zero_streams_(self.carry, mask)
        else:
            self.carry = tuple(
                part.masked_fill(mask.view(-1, *([1] * (part.dim() - 1))), 0.0)
                for part in self.carry
            )
        self._reset_credit(mask)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: params, carry, credit memory, config."""
        return {
            "format": STATE_DICT_FORMAT,
            "learner": self.name,
            "config": dataclasses.asdict(self.config),
            "input_size": self.input_size,
            "streams": self.streams,
            "independent_params": self.independent_params,
            "dtype": str(self.dtype),
            "params": {k: v.detach().clone() for k, v in self.params.items()},
            "carry": [part.clone() for part in self.carry],
            "credit": {k: v.clone() for k, v in self._credit_state().items()},
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from ``state_dict``; a mismatched learner or shape is refused whole."""
        expected = {
            "format": STATE_DICT_FORMAT,
            "learner": self.name,
            "config": dataclasses.asdict(self.config),
            "input_size": self.input_size,
            "streams": self.streams,
            "independent_params": self.independent_params,
            "dtype": str(self.dtype),
        }
        for key, value in expected.items():
            if state.get(key) != value:
                raise ValueError(
                    f"{self.name}: cannot load state: {key} is {state.get(key)!r} in the saved "
                    f"state but {value!r} in this learner; build the learner with the saved "
                    "settings"
                )
        self._copy_group("params", self.params, state["params"])
        self._copy_group("credit", self._credit_state(), state["credit"])
        carry = dict(enumerate(self.carry))
        self._copy_group("carry", carry, dict(enumerate(state["carry"])))
        self.generator.set_state(state["generator"])

    def _copy_group(
        self, group: str, target: Mapping[Any, Tensor], source: Mapping[Any, Tensor]
    ) -> None:
        if set(target) != set(source):
            raise ValueError(
                f"{self.name}: cannot load state: {group} keys {sorted(map(str, source))} "
                f"differ from {sorted(map(str, target))}"
            )
        for key, tensor in target.items():
            if tuple(source[key].shape) != tuple(tensor.shape):
                raise ValueError(
                    f"{self.name}: cannot load state: {group}[{key!r}] has shape "
                    f"{tuple(source[key].shape)}, expected {tuple(tensor.shape)}"
                )
        with torch.no_grad():
            for key, tensor in target.items():
                tensor.copy_(source[key])

    def _check_input(self, tensor: Any, label: str, shape: tuple[int, ...]) -> None:
        if not isinstance(tensor, Tensor):
            raise TypeError(
                f"{self.name}: {label} must be a torch.Tensor of shape {list(shape)}, "
                f"got {type(tensor).__name__}"
            )
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"{self.name}: {label} must have shape {list(shape)} "
                f"([streams, size]), got {list(tensor.shape)}"
            )
        if tensor.dtype != self.dtype:
            raise TypeError(
                f"{self.name}: {label} has dtype {tensor.dtype} but the learner uses "
                f"{self.dtype}; convert with .to({self.dtype}) or build the learner with "
                f"dtype={tensor.dtype}"
            )
        if tensor.device != self.device:
            raise ValueError(
                f"{self.name}: {label} is on {tensor.device} but the learner is on "
                f"{self.device}; move it with .to('{self.device}')"
            )

    def __repr__(self) -> str:
        mode = "independent" if self.independent_params else "shared"
        return (
            f"{type(self).__name__}(name={self.name!r}, input_size={self.input_size}, "
            f"n_features={self.n_features}, streams={self.streams}, params={mode}, "
            f"dtype={self.dtype})"
        )


def zero_streams_(tensors: Iterable[Tensor], mask: Tensor, dim: int = 0) -> None:
    """Zero, in place, the entries of the streams in ``mask: [B] bool`` along ``dim``.

    Finds the streams once and fills by index, where boolean indexing (``tensor[mask] = 0``)
    would search the mask again for every tensor.
    """
    streams = mask.nonzero().squeeze(1)
    for tensor in tensors:
        tensor.index_fill_(dim, streams, 0)


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    return type(value).__name__
