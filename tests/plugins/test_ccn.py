"""The CCN learner: stages, freezing, and exact RTRL of the active stage against autograd BPTT.

What "exact" means here (the choice documented in ``plugins/ccn.py``): columns of a stage that
has not started output 0 and keep a zero carry; the frozen stages' states and the feature
statistics do not depend on the active weights. So the oracle is BPTT through the network *as
it ran*: at step ``t`` the feature statistics of step ``t``, and the columns of every stage not
yet built at step ``t`` forced to 0 (``AsItRan``).
"""

import copy
from dataclasses import dataclass, field

import pytest
import torch
from oracle import bptt_gradient, relative_error

import agentstate
from agentstate.plugins.ccn import CCN_PRESETS

STREAMS, INPUTS = 3, 5
COLUMNS, PER_STAGE, STAGE_STEPS = 6, 2, 10  # three stages of two columns, ten steps each


def make(independent: bool = False, **kwargs):
    options = {
        "n_features": COLUMNS,
        "columns_per_stage": PER_STAGE,
        "steps_per_stage": STAGE_STEPS,
        "init_scale": 0.8,
        "normalization_rate": 0.5,  # statistics that move a lot, so replaying them matters
    }
    options.update(kwargs)
    return agentstate.make_learner(
        "ccn",
        INPUTS,
        streams=STREAMS,
        independent_params=independent,
        dtype=torch.float64,
        seed=1,
        **options,
    )


@dataclass
class History:
    """What the learner used at each step ``t`` (recorded just before the step)."""

    carry: list = field(default_factory=list)
    input_mean: list = field(default_factory=list)
    input_variance: list = field(default_factory=list)
    feature_mean: list = field(default_factory=list)
    feature_variance: list = field(default_factory=list)
    stage: list = field(default_factory=list)

    def step(self, learner, x):
        if learner.steps_in_stage >= learner.config.steps_per_stage:
            learner.advance_stage()  # as step would: record the new stage's statistics
        self.carry.append(tuple(part.clone() for part in learner.carry))
        self.input_mean.append([mean.clone() for mean in learner.input_mean])
        self.input_variance.append([var.clone() for var in learner.input_variance])
        self.feature_mean.append([mean.clone() for mean in learner.feature_mean])
        self.feature_variance.append([var.clone() for var in learner.feature_variance])
        h = learner.step(x)
        self.stage.append(learner.active_stage)
        return h


class AsItRan:
    """The learner's cell as it ran at each recorded step, for ``bptt_gradient``.

    ``bptt_gradient`` only calls ``initial_carry`` and ``functional_step``. The replay starts
    from the carry recorded before ``first_step``, uses step ``t``'s feature statistics, and
    zeroes the columns of the stages not built at step ``t``. The frozen stages' weights are
    the learner's current ones: right when they did not change since (no training), and
    irrelevant to the active weights' gradient from the active stage's start on.
    """

    def __init__(self, learner, history: History, first_step: int = 0):
        self.learner = copy.deepcopy(learner)
        self.history = history
        self.first_step = first_step
        self.t = first_step

    def initial_carry(self):
        self.t = self.first_step
        return tuple(part.clone() for part in self.history.carry[self.first_step])

    def functional_step(self, params, carry, x):
        self.learner.input_mean = self.history.input_mean[self.t]
        self.learner.input_variance = self.history.input_variance[self.t]
        self.learner.feature_mean = self.history.feature_mean[self.t]
        self.learner.feature_variance = self.history.feature_variance[self.t]
        (h, c), _ = self.learner.functional_step(params, carry, x)
        not_built = torch.arange(COLUMNS) >= (self.history.stage[self.t] + 1) * PER_STAGE
        h, c = h.masked_fill(not_built, 0.0), c.masked_fill(not_built, 0.0)
        self.t += 1
        return (h, c), h


def mean_over_shared_streams(learner, grad):
    return grad if learner.independent_params else grad.mean(dim=0, keepdim=True)


@pytest.mark.parametrize("independent", [False, True])
@pytest.mark.parametrize("with_resets", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_grad_equals_bptt_through_the_whole_sequence_in_every_stage(
    independent, with_resets, normalize
):
    learner = make(independent, normalize_features=normalize)
    generator = torch.Generator().manual_seed(7)
    n_steps = 3 * STAGE_STEPS
    inputs = torch.randn(n_steps, STREAMS, INPUTS, generator=generator, dtype=torch.float64)
    resets = (
        {6: torch.tensor([True, False, False]), 23: torch.tensor([False, True, True])}
        if with_resets
        else {}
    )
    history = History()
    for t in range(n_steps):
        if t in resets:
            learner.reset(resets[t])
        history.step(learner, inputs[t])
        if t in (3, 9, 10, 16, 20, 21, 25, 29):
            stage = learner.active_stage
            assert stage == t // STAGE_STEPS
            v = torch.randn(STREAMS, COLUMNS, generator=generator, dtype=torch.float64)
            params = {k: p.clone() for k, p in learner.params.items()}
            truth = bptt_gradient(AsItRan(learner, history), params, inputs[: t + 1], v, resets)
            estimate = learner.grad(v)
            assert estimate.keys() == truth.keys() == {"weight"}
            expected_shape = (STREAMS, PER_STAGE, 4, INPUTS + stage * PER_STAGE + 2)
            assert estimate["weight"].shape == expected_shape
            assert truth["weight"].abs().max() > 1e-3  # a non-trivial gradient
            if stage > 0:  # the weights on the earlier columns' states matter too
                on_earlier_columns = truth["weight"][..., INPUTS : INPUTS + stage * PER_STAGE]
                assert on_earlier_columns.abs().max() > 1e-3
            assert relative_error(estimate["weight"], truth["weight"]) <= 1e-9


@pytest.mark.parametrize("independent", [False, True])
def test_grad_is_exact_within_a_stage_after_the_earlier_stages_were_trained(independent):
    learner = make(independent)
    generator = torch.Generator().manual_seed(3)
    n_steps = 3 * STAGE_STEPS
    inputs = torch.randn(n_steps, STREAMS, INPUTS, generator=generator, dtype=torch.float64)
    start = 2 * STAGE_STEPS
    resets = {start + 4: torch.tensor([False, True, False])}
    history = History()
    for t in range(n_steps):
        if t in resets:
            learner.reset(resets[t])
        history.step(learner, inputs[t])
        v = torch.randn(STREAMS, COLUMNS, generator=generator, dtype=torch.float64)
        if t < start:  # TD-like updates train stages 0 and 1 before they freeze
            with torch.no_grad():
                learner.params["weight"] += 0.1 * mean_over_shared_streams(
                    learner, learner.grad(v)["weight"]
                )
        elif t in (start, start + 3, start + 6, n_steps - 1):
            params = {k: p.clone() for k, p in learner.params.items()}
            truth = bptt_gradient(
                AsItRan(learner, history, first_step=start),
                params,
                inputs[start : t + 1],
                v,
                {step - start: mask for step, mask in resets.items()},
            )
            assert truth["weight"].abs().max() > 1e-3
            assert relative_error(learner.grad(v)["weight"], truth["weight"]) <= 1e-9


def test_stages_advance_every_steps_per_stage_and_frozen_weights_never_change():
    learner = make()
    generator = torch.Generator().manual_seed(5)
    inputs = torch.randn(45, STREAMS, INPUTS, generator=generator, dtype=torch.float64)
    frozen = {}
    frozen_mean = {}
    for t, x in enumerate(inputs):
        weight_before = learner.params["weight"]
        h = learner.step(x)
        stage = min(t // STAGE_STEPS, 2)
        assert learner.active_stage == stage
        assert h.shape == (STREAMS, COLUMNS)
        built = (stage + 1) * PER_STAGE
        assert torch.all(h[:, built:] == 0) and torch.all(h[:, :built] != 0)
        if t in (STAGE_STEPS, 2 * STAGE_STEPS):
            assert learner.params["weight"] is not weight_before  # new tensors, new stage
            assert learner.params["weight"].shape[-1] == INPUTS + stage * PER_STAGE + 2
            assert torch.equal(learner.stage_weights[stage - 1], weight_before)
            frozen[stage - 1] = learner.stage_weights[stage - 1].clone()
            frozen_mean[stage - 1] = learner.feature_mean[stage - 1].clone()
            last_stage_initial_weight = learner.params["weight"].clone()
            with torch.no_grad():
                weight_before += 1.0  # a consumer still holding the old tensor cannot reach it
        else:
            assert learner.params["weight"] is weight_before
        v = torch.randn(STREAMS, COLUMNS, generator=generator, dtype=torch.float64)
        with torch.no_grad():
            learner.params["weight"] += 0.1 * learner.grad(v)["weight"].mean(0, keepdim=True)
    assert learner.steps_in_stage == 45 - 2 * STAGE_STEPS  # the last stage stays active
    assert not learner.advance_stage() and learner.active_stage == 2
    for stage, weight in frozen.items():
        assert torch.equal(learner.stage_weights[stage], weight)
        assert torch.equal(learner.feature_mean[stage], frozen_mean[stage])
    assert not torch.equal(learner.params["weight"], last_stage_initial_weight)  # it learned
    assert not torch.equal(learner.feature_mean[2], torch.zeros_like(learner.feature_mean[2]))


def test_advance_stage_starts_the_next_stage_at_once():
    learner = make(steps_per_stage=1000)
    for x in torch.randn(3, STREAMS, INPUTS, dtype=torch.float64):
        learner.step(x)
    old_weight = learner.params["weight"]
    assert learner.advance_stage()
    assert learner.active_stage == 1 and learner.steps_in_stage == 0
    assert learner.params["weight"] is not old_weight
    assert learner.params["weight"].shape == (1, PER_STAGE, 4, INPUTS + PER_STAGE + 2)
    grad = learner.grad(torch.ones(STREAMS, COLUMNS, dtype=torch.float64))["weight"]
    assert torch.all(grad == 0)  # the new columns have not run yet
    h, c = learner.carry
    assert torch.all(h[:, PER_STAGE:] == 0) and torch.all(c[:, PER_STAGE:] == 0)
    assert learner.advance_stage() and not learner.advance_stage()
    assert learner.active_stage == learner.n_stages - 1 == 2


def test_functional_step_computes_the_same_state_as_step_in_every_stage():
    learner = make(independent=True, steps_per_stage=1000)
    inputs = torch.randn(12, STREAMS, INPUTS, dtype=torch.float64)
    carry = learner.initial_carry()
    for t, x in enumerate(inputs):
        if t in (4, 8):
            learner.advance_stage()
        carry, h_functional = learner.functional_step(learner.params, carry, x)
        h = learner.step(x)
        torch.testing.assert_close(h, h_functional, rtol=0, atol=0)


def test_one_stage_ccn_is_the_columnar_network():
    columnar = agentstate.make_learner(
        "columnar",
        INPUTS,
        streams=STREAMS,
        dtype=torch.float64,
        seed=2,
        n_features=7,
        init_scale=0.8,
    )
    ccn = agentstate.make_learner(
        "ccn",
        INPUTS,
        streams=STREAMS,
        dtype=torch.float64,
        seed=2,
        init_scale=0.8,
        normalize_inputs=False,  # the columnar learner reads its input as given
        **CCN_PRESETS["columnar-7"],
    )
    assert torch.equal(columnar.params["weight"], ccn.params["weight"])
    for x in torch.randn(10, STREAMS, INPUTS, dtype=torch.float64):
        torch.testing.assert_close(ccn.step(x), columnar.step(x), rtol=1e-13, atol=1e-15)
    v = torch.randn(STREAMS, 7, dtype=torch.float64)
    torch.testing.assert_close(
        ccn.grad(v)["weight"], columnar.grad(v)["weight"], rtol=1e-12, atol=1e-15
    )


@pytest.mark.parametrize(
    ("preset", "n_stages"), [("columnar-7", 1), ("ccn-20-4", 5), ("constructive-10", 10)]
)
def test_presets_build(preset, n_stages):
    learner = agentstate.make_learner("ccn", 12, streams=2, seed=0, **CCN_PRESETS[preset])
    assert learner.n_stages == n_stages
    h = learner.step(torch.randn(2, 12))
    assert h.shape == (2, CCN_PRESETS[preset]["n_features"])


def test_state_dict_round_trip_continues_identically_across_stages():
    learner = make()
    inputs = torch.randn(30, STREAMS, INPUTS, dtype=torch.float64)
    for x in inputs[:15]:
        learner.step(x)
    clone = make()
    clone.load_state_dict(learner.state_dict())
    assert clone.active_stage == 1 and clone.steps_in_stage == 5
    v = torch.randn(STREAMS, COLUMNS, dtype=torch.float64)
    torch.testing.assert_close(clone.grad(v)["weight"], learner.grad(v)["weight"], rtol=0, atol=0)
    for x in inputs[15:]:
        torch.testing.assert_close(clone.step(x), learner.step(x), rtol=0, atol=0)
    assert clone.active_stage == learner.active_stage == 2
    torch.testing.assert_close(clone.grad(v)["weight"], learner.grad(v)["weight"], rtol=0, atol=0)
    for mine, theirs in zip(clone.stage_weights, learner.stage_weights, strict=True):
        assert torch.equal(mine, theirs)


def test_state_dict_of_another_shape_is_refused_and_leaves_the_learner_intact():
    saved = make().state_dict()
    other = make(n_features=8)
    weight = other.params["weight"]
    with pytest.raises(ValueError, match="n_features"):
        other.load_state_dict(saved)
    assert other.params["weight"] is weight and other.active_stage == 0


def test_reset_zeroes_every_column_and_the_sensitivities_of_the_masked_streams():
    learner = make()
    for x in torch.randn(12, STREAMS, INPUTS, dtype=torch.float64):
        learner.step(x)
    learner.reset(torch.tensor([False, True, False]))
    h, c = learner.carry
    assert torch.all(h[1] == 0) and torch.all(c[1] == 0)
    assert torch.all(h[0, : 2 * PER_STAGE] != 0)
    grad = learner.grad(torch.ones(STREAMS, COLUMNS, dtype=torch.float64))["weight"]
    assert torch.all(grad[1] == 0) and grad[0].abs().sum() > 0


def test_statistics_stay_put_without_feature_normalisation():
    learner = make(normalize_features=False)
    for x in torch.randn(25, STREAMS, INPUTS, dtype=torch.float64):
        learner.step(x)
    assert all(torch.all(mean == 0) for mean in learner.feature_mean)
    assert all(torch.all(variance == 1) for variance in learner.feature_variance)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"n_features": 6, "columns_per_stage": 4}, "columns_per_stage"),
        ({"n_features": 6, "columns_per_stage": 8}, "columns_per_stage"),
        ({"columns_per_stage": 0}, "columns_per_stage"),
        ({"n_features": 0}, "n_features"),
        ({"steps_per_stage": 0}, "steps_per_stage"),
        ({"steps_per_stage": 2.5}, "steps_per_stage"),
        ({"init_scale": -0.1}, "init_scale"),
        ({"normalization_rate": 1.5}, "normalization_rate"),
        ({"variance_floor": 0.0}, "variance_floor"),
    ],
)
def test_bad_kwargs_raise_naming_the_kwarg(kwargs, named):
    with pytest.raises(ValueError, match=named):
        agentstate.make_learner("ccn", INPUTS, **kwargs)


def test_float32_runs_and_stays_float32():
    learner = agentstate.make_learner(
        "ccn", INPUTS, streams=2, seed=0, n_features=4, columns_per_stage=2, steps_per_stage=3
    )
    for x in torch.randn(5, 2, INPUTS):
        h = learner.step(x)
    assert h.dtype == torch.float32 and learner.active_stage == 1
    assert learner.grad(torch.ones(2, 4))["weight"].dtype == torch.float32
    assert all(mean.dtype == torch.float32 for mean in learner.feature_mean)
