"""The RTU's compiled TD step (``plugins/kernels/rtu.cpp``) against the eager TD engine.

As ``tests/test_fast_paths.py`` checks the built-in kernels: both backends run the same
stream of observations, cumulants, discounts and episode starts, in float64, and the
predictions at every step and every tensor of the final ``state_dict`` agree to 1e-12
relative; in float32 the predictions agree to 1e-6 relative.

Independent parameters trained by SGD or RMSProp turn a stream chaotic within a hundred
steps: its ``theta_log`` trace grows past 100, and two *eager* runs whose weights differ in
the last bit part by 1e-11 (any two summation orders would, whatever the kernel). There,
the fused step starts every step from the eager engine's state (``resync``): each single
step agrees to 1e-12, the growth of rounding over many steps is left out.
"""

import pytest
import torch

import agentstate
from agentstate import fused
from agentstate.plugins.rtu import RTU_KERNEL
from agentstate.td import TDConfig, TDPredictor

STREAMS, INPUTS, FEATURES = 3, 5, 8

pytestmark = pytest.mark.skipif(
    fused.load_kernel(RTU_KERNEL) is None,
    reason="no C++ compiler: the fused kernel cannot be built",
)


def make_predictor(backend, dtype, independent=False, activation="relu", n_cumulants=1, **config):
    learner = agentstate.make_learner(
        "rtu",
        INPUTS,
        streams=STREAMS,
        independent_params=independent,
        dtype=dtype,
        seed=3,
        n_features=FEATURES,
        activation=activation,
    )
    settings = {"step_size": 0.001, "head_step_size": 0.05, **config}
    return TDPredictor(learner, n_cumulants, TDConfig(backend=backend, **settings))


def stream_of_steps(steps, n_cumulants=1, seed=0, head_gammas=None):
    """Sparse binary observations, cumulants, per-stream discounts with episode ends (float64).

    With ``head_gammas`` the discount is ``[B, K]``: continuation times each head's discount.
    """
    generator = torch.Generator().manual_seed(seed)
    for t in range(steps):
        observation = (torch.rand(STREAMS, INPUTS, generator=generator) < 0.3).double()
        cumulant = torch.rand(STREAMS, n_cumulants, generator=generator, dtype=torch.float64)
        discount = torch.full((STREAMS,), 0.9, dtype=torch.float64)
        start = None
        if t % 37 == 36:
            discount[t % STREAMS] = 0.0
        if t % 37 == 0 and t > 0:
            start = torch.arange(STREAMS) == (t - 1) % STREAMS
        if head_gammas is not None:
            continuation = discount / 0.9
            discount = continuation[:, None] * torch.tensor(head_gammas, dtype=torch.float64)
        yield observation, cumulant, discount, start


def assert_relatively_close(actual, expected, tolerance, label):
    assert actual.shape == expected.shape, label
    scale = max(expected.abs().max().item(), 1e-30)
    error = (actual - expected).abs().max().item()
    assert error <= tolerance * scale, f"{label}: error {error:.3g} vs scale {scale:.3g}"


def float_tensors(state, label="state"):
    """``{label: tensor}`` of every non-empty floating-point tensor in a nested ``state_dict``."""
    found = {}
    if isinstance(state, torch.Tensor):
        if state.dtype.is_floating_point and state.numel():
            found[label] = state.double()
    elif isinstance(state, dict):
        for key, value in state.items():
            if key not in ("config", "generator"):
                found.update(float_tensors(value, f"{label}.{key}"))
    elif isinstance(state, list | tuple):
        for index, value in enumerate(state):
            found.update(float_tensors(value, f"{label}[{index}]"))
    return found


def run_both(steps, **options):
    """Eager and fused in float64 side by side: every prediction, then the final state.

    Independent parameters trained by SGD or RMSProp resync: before each step the fused
    engine loads the eager one's state (see the module docstring).
    """
    head_gammas = options.pop("head_gammas", None)
    optimizer = options.get("optimizer", TDConfig().optimizer)
    resync = options.get("independent", False) and optimizer != "adam"
    predictors = {
        backend: make_predictor(backend, torch.float64, **options) for backend in ("eager", "fused")
    }
    eager, fast = predictors["eager"], predictors["fused"]
    assert eager.backend == "eager" and fast.backend == "fused"
    n_cumulants = options.get("n_cumulants", 1)
    for t, (x, c, discount, start) in enumerate(
        stream_of_steps(steps, n_cumulants, 0, head_gammas)
    ):
        if resync:
            fast.load_state_dict(eager.state_dict())
        expected = eager.step(x, c, discount=discount, episode_start=start)
        got = fast.step(x, c, discount=discount, episode_start=start)
        assert_relatively_close(got, expected, 1e-12, f"prediction at step {t}")
    expected_state = float_tensors(eager.state_dict())
    actual_state = float_tensors(fast.state_dict())
    assert actual_state.keys() == expected_state.keys()
    assert any("sensitivity" in label for label in expected_state)
    for label, tensor in expected_state.items():
        assert_relatively_close(actual_state[label], tensor, 1e-12, label)
    return predictors


@pytest.mark.parametrize("optimizer", ["sgd", "rmsprop_td", "adam"])
@pytest.mark.parametrize("independent", [False, True])
@pytest.mark.parametrize("activation", ["relu", "tanh", "linear"])
def test_fused_step_matches_eager(activation, independent, optimizer):
    predictors = run_both(120, activation=activation, independent=independent, optimizer=optimizer)
    for key, param in predictors["fused"].learner.params.items():
        initial = make_predictor("eager", torch.float64, independent).learner.params[key]
        assert not torch.equal(param, initial), f"{key} was not trained"


@pytest.mark.parametrize(
    "options",
    [
        {"n_cumulants": 2, "include_observation": True, "independent": True},
        {"include_bias": False, "normalize_inputs": False, "normalize_features": False},
        {"train_learner": False},
        {"lambda_": 0.0, "normalization_decay": 0.9},
        {"n_cumulants": 3, "head_gammas": (0.9, 0.0, 0.5)},  # a discount per head
    ],
)
def test_fused_step_matches_eager_in_every_setting(options):
    run_both(80, **options)


@pytest.mark.parametrize("optimizer", ["rmsprop_td", "adam"])
def test_float32_predictions_agree_to_a_millionth(optimizer):
    eager = make_predictor("eager", torch.float32, optimizer=optimizer)
    fast = make_predictor("fused", torch.float32, optimizer=optimizer)
    for t, (x, c, discount, start) in enumerate(stream_of_steps(300)):
        x, c, discount = x.float(), c.float(), discount.float()
        expected = eager.step(x, c, discount=discount, episode_start=start)
        got = fast.step(x, c, discount=discount, episode_start=start)
        assert_relatively_close(got.double(), expected.double(), 1e-6, f"prediction at step {t}")


def test_the_agent_state_is_the_same_from_either_backend_and_reading_it_changes_nothing():
    predictors = run_both(40)
    eager, fast = predictors["eager"], predictors["fused"]
    before = float_tensors(fast.learner.state_dict())
    state = fast.agent_state
    torch.testing.assert_close(state, eager.agent_state, rtol=1e-12, atol=0)
    assert state.shape == (STREAMS, FEATURES)
    after = float_tensors(fast.learner.state_dict())
    for key, tensor in before.items():
        assert torch.equal(after[key], tensor), key
