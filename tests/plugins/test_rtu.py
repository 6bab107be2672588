"""Recurrent trace units: exact RTRL against autograd BPTT, the cell against complex arithmetic."""

import exactness
import gymnasium as gym
import numpy as np
import pytest
import torch
from exactness import INPUTS, STREAMS

import agentstate
from agentstate.plugins.rtu import Eigenvalues
from agentstate.registry import get_registry
from agentstate.td import TDConfig, TDPredictor

UNITS = 4
PARAM_SHAPES = {
    "nu_log": (UNITS,),
    "theta_log": (UNITS,),
    "input_weight": (2, UNITS, INPUTS),
}


def make(independent: bool, **kwargs):
    return exactness.make_float64_learner("rtu", independent, n_features=2 * UNITS, **kwargs)


@pytest.mark.parametrize("independent", [False, True])
@pytest.mark.parametrize("with_resets", [False, True])
def test_grad_equals_bptt_through_the_whole_sequence(independent, with_resets):
    exactness.assert_grad_equals_bptt(make(independent), PARAM_SHAPES, with_resets=with_resets)


@pytest.mark.parametrize("activation", ["tanh", "linear"])
def test_grad_equals_bptt_for_every_activation(activation):
    learner = make(True, activation=activation)
    exactness.assert_grad_equals_bptt(learner, PARAM_SHAPES, with_resets=True)


def test_grad_equals_bptt_with_eigenvalues_near_the_unit_circle():
    # 1 - r in [1e-6, 1e-5] (nu_log ~ -12): slow units whose sensitivities live long.
    learner = make(False, r_min=0.99999, r_max=0.999999)
    exactness.assert_grad_equals_bptt(learner, PARAM_SHAPES, with_resets=True, steps=40)


def test_grad_right_after_a_reset_is_zero_for_the_reset_streams():
    learner = make(False, activation="linear")
    for x in torch.randn(2, STREAMS, INPUTS, dtype=torch.float64):
        learner.step(x)
    learner.reset(torch.tensor([False, True, False]))
    grads = learner.grad(torch.ones(STREAMS, 2 * UNITS, dtype=torch.float64))
    for key, grad in grads.items():
        assert torch.all(grad[1] == 0), key
        assert grad[0].abs().sum() > 0, key
    (c,) = learner.carry
    assert torch.all(c[1] == 0) and torch.all(c[0] != 0)


def complex_reference(params, inputs, resets, activation):
    """The RTU in torch complex arithmetic: ``c_t = lambda c_t-1 + gamma (W_1 + i W_2) x_t``.

    ``lambda = r e^(i theta)`` is built with ``torch.polar`` and ``gamma`` from ``|lambda|``,
    independently of the plugin's real 2x2 rotation-scaling.
    """
    r = torch.exp(-torch.exp(params["nu_log"]))
    eigenvalue = torch.polar(r, torch.exp(params["theta_log"]))  # [P, N]
    gamma = torch.sqrt(1 - eigenvalue.abs() ** 2)
    weight = torch.complex(params["input_weight"][:, 0], params["input_weight"][:, 1])
    c = torch.zeros(inputs.shape[1], weight.shape[1], dtype=torch.complex128)
    states = []
    for t, x in enumerate(inputs):
        if t in resets:
            c = c.masked_fill(resets[t].unsqueeze(1), 0)
        drive = (weight @ x.to(torch.complex128).unsqueeze(-1)).squeeze(-1)  # [B, N]
        c = eigenvalue * c + gamma * drive
        states.append(activation(torch.cat([c.real, c.imag], dim=1)))
    return torch.stack(states)


@pytest.mark.parametrize("independent", [False, True])
@pytest.mark.parametrize(
    ("name", "activation"), [("relu", torch.relu), ("tanh", torch.tanh), ("linear", lambda c: c)]
)
def test_states_equal_the_complex_recurrence(independent, name, activation):
    learner = make(independent, activation=name)
    inputs = torch.randn(25, STREAMS, INPUTS, dtype=torch.float64)
    expected = complex_reference(learner.params, inputs, exactness.RESETS, activation)
    for t, x in enumerate(inputs):
        if t in exactness.RESETS:
            learner.reset(exactness.RESETS[t])
        torch.testing.assert_close(learner.step(x), expected[t], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eigenvalues_stay_inside_the_unit_circle_for_any_parameters(dtype):
    # float32 rounds r = exp(-exp(nu_log)) to 1 below nu_log ~ -16.6 (the module docstring).
    low = -15.0 if dtype == torch.float32 else -30.0
    nu_log, theta_log = torch.meshgrid(
        torch.linspace(low, 30.0, 301, dtype=dtype),
        torch.linspace(-30.0, 30.0, 301, dtype=dtype),
        indexing="ij",
    )
    eigenvalues = Eigenvalues(nu_log.reshape(1, -1), theta_log.reshape(1, -1))
    blocks = torch.stack(
        [
            torch.stack([eigenvalues.g, -eigenvalues.phi], dim=-1),
            torch.stack([eigenvalues.phi, eigenvalues.g], dim=-1),
        ],
        dim=-2,
    )  # the 2x2 rotation-scaling of every unit
    moduli = torch.linalg.eigvals(blocks.double()).abs()
    assert float(moduli.max()) < 1
    assert bool((eigenvalues.gamma > 0).all())
    torch.testing.assert_close(moduli, eigenvalues.r.double().unsqueeze(-1).expand_as(moduli))


def test_initialisation_follows_the_paper():
    learner = agentstate.make_learner("rtu", 9, n_features=2 * 4000, seed=3, dtype=torch.float64)
    eigenvalues = Eigenvalues(learner.params["nu_log"], learner.params["theta_log"])
    # |lambda|^2 uniform on [0, 1] and theta uniform on [0, 6.28]: means 1/2 and 3.14.
    assert float(eigenvalues.r.max()) < 1 and float(eigenvalues.r.min()) > 0
    assert abs(float((eigenvalues.r**2).mean()) - 0.5) < 0.02
    assert abs(float(eigenvalues.theta.mean()) - 3.14) < 0.1
    assert float(eigenvalues.theta.max()) <= 6.28
    # LeCun normal truncated at two standard deviations: variance 1 / D.
    weight = learner.params["input_weight"]
    assert abs(float(weight.var()) - 1 / 9) < 0.005
    assert float(weight.abs().max()) <= 2 / 3 / 0.87962566103423978


def test_functional_step_computes_the_same_state_as_step():
    exactness.assert_functional_step_computes_the_same_state_as_step(make(independent=True))


def test_shared_params_have_one_copy_independent_params_one_per_stream():
    exactness.assert_parameters_shared_or_one_per_stream(
        make(False), make(True), PARAM_SHAPES, "input_weight"
    )


def test_seed_makes_initialisation_reproducible():
    exactness.assert_seed_reproduces_the_initialisation(make(True), make(True))


def test_state_dict_round_trip_continues_identically():
    exactness.assert_state_dict_round_trip_continues_identically(make(False), make(False))


def test_state_dict_of_another_shape_is_refused():
    saved = make(False).state_dict()
    other = agentstate.make_learner(
        "rtu", INPUTS, streams=STREAMS, dtype=torch.float64, n_features=2 * UNITS + 2
    )
    with pytest.raises(ValueError, match="n_features"):
        other.load_state_dict(saved)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"n_features": 0}, "n_features"),
        ({"n_features": 7}, "n_features"),
        ({"n_features": 4.0}, "n_features"),
        ({"activation": "sigmoid"}, "activation"),
        ({"r_min": 0.5, "r_max": 0.5}, "r_min"),
        ({"r_max": 1.5}, "r_max"),
        ({"max_phase": 0.0}, "max_phase"),
    ],
)
def test_bad_kwargs_raise_naming_the_kwarg(kwargs, named):
    with pytest.raises(ValueError, match=named):
        agentstate.make_learner("rtu", INPUTS, **kwargs)


def test_float32_runs_and_stays_float32():
    learner = agentstate.make_learner("rtu", INPUTS, streams=2, seed=0)
    h = learner.step(torch.randn(2, INPUTS))
    assert h.dtype == torch.float32 and h.shape == (2, 16)
    grads = learner.grad(torch.ones(2, 16))
    assert all(grad.dtype == torch.float32 for grad in grads.values())


def test_registers_through_its_entry_point():
    assert "rtu" in agentstate.available_learners()
    registered = get_registry().learners()["rtu"]
    assert registered.distribution == "agentstate"
    assert registered.spec.exact and registered.spec.learner_class.exact


def test_wrapper_appends_its_state_and_learns():
    env = agentstate.AgentStateWrapper(
        gym.make("CartPole-v1"), learner="rtu", n_features=2 * UNITS, observe_past=0, seed=0
    )
    assert env.observation_space.shape == (4 + 2 * UNITS,)  # [o_t, h_t]
    # ReLU of an unbounded linear recurrence: no bound but finiteness.
    assert np.all(np.isinf(env.observation_space.high[4:]))
    learner = env.core.learner
    before = {key: value.clone() for key, value in learner.params.items()}
    observation, _ = env.reset(seed=0)
    for _ in range(60):
        observation, _, terminated, truncated, _ = env.step(env.action_space.sample())
        assert observation in env.observation_space
        assert np.all(observation[4:] >= 0)
        if terminated or truncated:
            observation, _ = env.reset()
    assert all(not torch.equal(learner.params[key], before[key]) for key in before)


@pytest.mark.expensive
def test_td_learns_trace_conditioning_below_predicting_zero():
    """As tests/test_learning.py, short trace gap; measured ~0.024 trained, ~0.076 frozen
    features, ~0.159 predicting zero (10k steps, the last 3k scored)."""

    def final_msre(train_learner: bool) -> tuple[float, float]:
        steps, streams, scored = 10_000, 4, 3_000
        env = gym.make_vec(
            "agentstate/TraceConditioning-v0",
            num_envs=streams,
            isi_min=8,
            isi_max=12,
            iti_min=20,
            iti_max=30,
        )
        observation, _ = env.reset(seed=1)
        learner = agentstate.make_learner(
            "rtu",
            observation.shape[1],
            streams=streams,
            independent_params=True,
            seed=1,
            n_features=8,
        )
        config = TDConfig(
            gamma=env.unwrapped.gamma,
            step_size=0.003,
            head_step_size=0.003,
            optimizer="adam",
            train_learner=train_learner,
            backend="eager",
        )
        engine = TDPredictor(learner, 1, config)
        observations, cumulants, targets = env.unwrapped.rollout(steps)
        observations = torch.as_tensor(observations)
        cumulants = torch.as_tensor(cumulants).unsqueeze(-1)
        squared_errors = np.zeros((scored, streams))
        for t in range(steps):
            prediction = engine.step(observations[t], cumulants[t])
            if t >= steps - scored:
                squared_errors[t - steps + scored] = (
                    prediction[:, 0].double().numpy() - targets[t]
                ) ** 2
        return float(squared_errors.mean()), float((targets[-scored:] ** 2).mean())

    msre, msre_zero = final_msre(train_learner=True)
    frozen_msre, _ = final_msre(train_learner=False)
    assert msre < 0.3 * msre_zero
    assert msre < 0.6 * frozen_msre  # the RTRL gradient, not the head alone, does the work
