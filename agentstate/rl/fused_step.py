"""The actor-critic's learning step in one compiled call per env step.

``RTRLActorCritic._eager_step`` is a few hundred small torch ops per step; at the sizes an
agent state works at, their fixed costs are the whole bill. A learner whose kernel opts in
(``AGENTSTATE_ACTOR_CRITIC_ENTRIES`` in its C++ source; see ``agentstate/kernels/
actor_critic.h``) runs the same step, element by element in the same order, as one call: the
learner's own kernel body advances its state and sensitivities and does its trace and
parameter sweep, and the shared actor-critic engine does the rest (normalisation, reward
scaling, the heads, sampling, ObGD). Built-in and third-party learners get it the same way.

The kernel works in place on the very tensors the eager step uses (the policy's heads,
traces, statistics and carried transition; the learner's ``fused_layout()``), so
``state_dict``, ``save``/``load`` and switching backends see exactly what it did.
"""

from __future__ import annotations

import ctypes
import operator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from agentstate import fused
from agentstate.rl.noise import NoiseBlocks
from agentstate.wrappers.errors import LearnerDivergedError

if TYPE_CHECKING:
    from agentstate.rl.actor_critic import RTRLPolicy

BACKENDS = ("auto", "eager", "fused")

_STATUS_INPUT, _STATUS_STATE, _STATUS_UPDATE, _STATUS_POLICY = 1, 2, 3, 4


def policy_not_finite(step: int) -> str:
    """The error of a policy whose scores or actions are not finite."""
    return (
        f"the policy's action scores or actions are not finite at step {step}: the agent state "
        "or the heads grew without bound (lower the step sizes, or use a core whose state is "
        "bounded, e.g. rtu with activation='tanh')"
    )


def unsupported_reason(policy: RTRLPolicy) -> str | None:
    """Why the compiled step cannot run this agent (None: it can)."""
    core = policy.core
    reason = fused.learner_unsupported_reason(core)
    if reason is not None:
        return reason
    if core.dtype != policy.value_dtype:
        return f"a {core.dtype} core under {policy.value_dtype} heads"
    if core.independent_params:
        return "a core with independent parameters per stream (the agent shares one)"
    return None


def fused_step(policy: RTRLPolicy, backend: str) -> FusedActorCriticStep | None:
    """The compiled step for ``policy`` under ``backend`` (None: run the eager step).

    Raises:
        ValueError: ``backend="fused"`` and the compiled step cannot run this agent.
    """
    if backend == "eager":
        return None
    reason = unsupported_reason(policy)
    library = None
    if reason is None:
        kernel = policy.core.fused_layout().kernel  # type: ignore[attr-defined]
        library = fused.load_kernel(kernel)
        if library is None:
            reason = f"kernel {kernel.entry} could not be built"
        elif not fused.has_actor_critic(library, kernel):
            reason = f"kernel {kernel.entry} defines no actor-critic entry points"
    if reason is not None or library is None:
        if backend == "fused":
            raise ValueError(f"backend='fused' cannot run this actor-critic: {reason}")
        return None
    return FusedActorCriticStep(policy, library)


class FusedActorCriticStep:
    """Runs ``RTRLActorCritic``'s learning steps through the core's compiled kernel.

    Per call: point the arguments at the step's inputs and run the kernel. The kernel's view
    of the tensors (their addresses) is rebuilt whenever one of them is replaced: a new
    stage of a constructive core (its layout's tensors), or the policy's traces or carried
    transition (``RTRLPolicy.generation``).
    """

    def __init__(self, policy: RTRLPolicy, library: ctypes.CDLL) -> None:
        self.policy = policy
        self.library = library
        name = "float32" if policy.value_dtype == torch.float32 else "float64"
        self.kernel: fused.Kernel = policy.core.fused_layout().kernel  # type: ignore[attr-defined]
        self._entry = library[f"{self.kernel.entry}_actor_critic_{name}"]
        self._finite = library["agentstate_actor_critic_inputs_finite"]
        self._args = fused.ACArgs(streams=policy.streams, observation_size=policy.observation_size)
        self._args_reference = ctypes.byref(self._args)
        self._bound: tuple[Any, ...] = ()
        self._generation = -1
        self._keep_alive: list[Any] = []
        self._arguments: tuple[Any, ...] = ()
        action_dtype = torch.int64 if policy.discrete else policy.value_dtype
        shape = (policy.streams,) if policy.discrete else (policy.streams, policy.n_actions)
        self.action = torch.zeros(shape, dtype=action_dtype)

    def step(
        self,
        observation: np.ndarray,
        reward: np.ndarray,
        done: np.ndarray,
        bootstrap: Tensor,
        noise: NoiseBlocks,
    ) -> int:
        """One learning step of every stream (``RTRLActorCritic._agent_step``).

        Args:
            observation: ``[B, observation_size]`` float64, encoded, C-contiguous.
            reward: ``[B]`` float64 (ignored on the first step).
            done: ``[B]`` bool.
            bootstrap: ``[B]`` in the policy's dtype: ``v`` of truncated episodes' last
                observations.
            noise: the policy's draws; this step takes its next row.

        Returns:
            The kernel's status: 0; 1 if the observation or the reward is not finite (then
            nothing, the learner's ``begin_step`` included, has run); or the code
            :meth:`raise_for` explains. The actions are in :attr:`action` (``[B]`` int64 or
            ``[B, A]``, rewritten by the next step).
        """
        args = self._args
        args.observation = observation.ctypes.data
        args.reward = reward.ctypes.data
        if not self._finite(self._args_reference):
            return _STATUS_INPUT
        policy = self.policy
        policy.core.begin_step()
        layout = policy.core.fused_layout()  # type: ignore[attr-defined]
        tensors = layout.tensors()
        if (
            policy.generation != self._generation
            or len(tensors) != len(self._bound)
            or not all(map(operator.is_, tensors, self._bound))
        ):
            policy.match_core_traces()
            self._bind(layout)
            self._bound = tensors
            self._generation = policy.generation
        args.done = done.ctypes.data
        args.bootstrap = bootstrap.data_ptr()
        args.noise = noise.next_address()
        return int(self._entry(*self._arguments))

    def raise_for(self, status: int, step: int) -> None:
        """Raise the error the kernel's ``status`` stands for (its inputs were finite)."""
        if status == _STATUS_STATE:
            raise LearnerDivergedError(f"the recurrent core's state is not finite at step {step}")
        if status == _STATUS_UPDATE:
            raise LearnerDivergedError(
                f"the TD error or an eligibility trace is not finite at step {step}; no "
                "parameter was changed (lower the step sizes)"
            )
        if status == _STATUS_POLICY:
            raise LearnerDivergedError(policy_not_finite(step))
        raise RuntimeError(f"compiled actor-critic step {self.kernel.entry} failed ({status})")

    def _bind(self, layout: Any) -> None:
        policy = self.policy
        config = policy.config
        dtype = policy.value_dtype
        args = self._args
        core = policy.core
        parameters = list(layout.parameters())
        key_of = {id(param): key for key, param in core.params.items()}
        keys = [key_of[id(param)] for param in parameters]
        traces = [policy.core_trace[key] for key in keys]
        sizes = torch.tensor([trace[0].numel() for trace in traces], dtype=torch.int64)
        trains = bool(core.params)
        settings: dict[str, Any] = {
            "streams": policy.streams,
            "param_streams": 1,
            "observation_size": policy.observation_size,
            "n_actions": policy.n_actions,
            "discrete": int(policy.discrete),
            "n_features": core.n_features,
            "n_head_features": policy.n_head_features,
            "include_observation": int(config.include_observation),
            "include_prev_action": int(config.include_prev_action),
            "normalize_observations": int(config.normalize_observations),
            "scale_rewards": int(config.scale_rewards),
            "train_learner": int(trains),
            "n_core_parameters": len(traces),
            "threads": 1,
            "parallel_grain": fused.PARALLEL_GRAIN,
            "gamma": config.gamma,
            "lambda_": config.lambda_,
            "critic_step_size": config.critic_step_size,
            "actor_step_size": config.actor_step_size,
            "learner_step_size": config.learner_step_size,
            "critic_kappa": config.critic_kappa,
            "actor_kappa": config.actor_kappa,
            "learner_kappa": config.learner_kappa,
            "entropy_coefficient": config.entropy_coefficient,
            "observation_eps": policy.observation_statistics.eps,
            "reward_eps": policy.reward_scaler.statistics.eps,
        }
        for name, value in settings.items():
            setattr(args, name, value)
        statistics = policy.observation_statistics
        reward_statistics = policy.reward_scaler.statistics
        float64 = {
            "observation_count": statistics.sample_count,
            "observation_mean": statistics.mean,
            "observation_m2": statistics.sum_of_squares,
            "reward_sum": policy.reward_scaler.discounted_sum,
            "reward_count": reward_statistics.sample_count,
            "reward_mean": reward_statistics.mean,
            "reward_m2": reward_statistics.sum_of_squares,
            "statistics": policy.log_sums,
            "action_low": policy.action_bounds.low,
            "action_high": policy.action_bounds.high,
            "action_scale": policy.action_bounds.scale,
            "action_offset": policy.action_bounds.offset,
            "log_std_low": policy.log_std_low,
            "log_std_high": policy.log_std_high,
        }
        for name, tensor in float64.items():
            setattr(args, name, fused.pointer(tensor, torch.float64))
        typed = {
            "action_input": policy.action_state,
            "previous_value": policy.previous_value,
            "previous_features": policy.previous_features,
            "previous_entropy_score": policy.previous_entropy_score,
            "critic_weight": policy.critic_weight,
            "critic_trace": policy.critic_trace["weight"],
            "actor_weight": policy.actor_weight,
            "actor_trace": policy.actor_trace["weight"],
            "log_std": policy.log_std,
            "log_std_trace": policy.actor_trace.get("log_std"),
        }
        for name, tensor in typed.items():
            setattr(args, name, fused.pointer(tensor, dtype))
        args.started = fused.pointer(policy.started, torch.bool)
        args.action = fused.pointer(self.action)
        trace_array = (ctypes.c_void_p * max(len(traces), 1))(
            *(fused.pointer(trace, dtype) for trace in traces)
        )
        args.core_traces = ctypes.cast(trace_array, ctypes.c_void_p)
        args.core_trace_sizes = fused.pointer(sizes, torch.int64)
        learner_arguments, arrays = layout.arguments(dtype)
        self._keep_alive = [trace_array, sizes, learner_arguments, *arrays]
        self._arguments = (self._args_reference, ctypes.byref(learner_arguments))
