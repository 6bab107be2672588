"""Learning: columnar must beat predict-zero and a frozen learner on trace conditioning."""

import gymnasium as gym
import numpy as np
import pytest
import torch

import agentstate
from agentstate.experiment import RunConfig, run_experiment
from agentstate.td import TDConfig, TDPredictor

# A shorter trace gap than the JMLR preset so that learning shows within a CI budget; the
# learner still has to bridge 8-12 empty steps between the CS and the US.
SHORT_TRACE = dict(isi_min=8, isi_max=12, iti_min=20, iti_max=30)
STEPS, STREAMS, SCORED = 20_000, 4, 5_000


def final_msre(train_learner: bool) -> tuple[float, float]:
    env = gym.make_vec("agentstate/TraceConditioning-v0", num_envs=STREAMS, **SHORT_TRACE)
    observation, _ = env.reset(seed=1)
    learner = agentstate.make_learner(
        "columnar",
        observation.shape[1],
        streams=STREAMS,
        independent_params=True,
        seed=1,
        n_features=4,
    )
    config = TDConfig(
        gamma=env.unwrapped.gamma,
        step_size=0.003,
        head_step_size=0.003,
        optimizer="adam",
        train_learner=train_learner,
    )
    engine = TDPredictor(learner, 1, config)
    observations, cumulants, targets = env.unwrapped.rollout(STEPS)
    observations = torch.as_tensor(observations)
    cumulants = torch.as_tensor(cumulants).unsqueeze(-1)
    squared_errors = np.zeros((SCORED, STREAMS))
    for t in range(STEPS):
        prediction = engine.step(observations[t], cumulants[t])
        if t >= STEPS - SCORED:
            squared_errors[t - STEPS + SCORED] = (
                prediction[:, 0].double().numpy() - targets[t]
            ) ** 2
    return float(squared_errors.mean()), float((targets[-SCORED:] ** 2).mean())


@pytest.mark.expensive
def test_columnar_learns_trace_conditioning_far_below_predicting_zero():
    msre, msre_zero = final_msre(train_learner=True)
    frozen_msre, _ = final_msre(train_learner=False)
    # Measured: ~0.008 learned, ~0.078 frozen features, ~0.159 predict zero.
    assert msre < 0.25 * msre_zero
    assert msre < 0.4 * frozen_msre  # the RTRL gradient, not the head alone, does the work


@pytest.mark.expensive
def test_default_protocol_learns_trace_patterning_below_predicting_zero(tmp_path):
    """``agentstate run trace-patterning --learner columnar --streams 8 --independent
    --steps 1000000``, with no optimiser or step-size flag, ends at or below 0.8x predict-zero
    (each stream's MSRE over the last 100k steps over its own predict-zero MSRE, averaged).

    Measured: ~0.66. Features that do not learn stay near 0.93 (the curve's plateau before
    the columns learn, ~300k steps in).
    """
    result = run_experiment(
        RunConfig(
            env="trace-patterning",
            learner="columnar",
            streams=8,
            independent=True,
            steps=1_000_000,
        ),
        tmp_path,
        progress=False,
    )
    assert result.final_ratio <= 0.8
