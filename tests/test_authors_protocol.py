"""The JMLR 2023 protocol: CCN heads and normalisation as the authors' code runs them, and the
settings that reach the engine from the command line and from a sweep spec."""

import json

import pytest
import torch

import agentstate
from agentstate.cli import main
from agentstate.plugins.columnar import COLUMNS_KERNEL
from agentstate.sweep import run_sweep
from agentstate.td import TDConfig, TDPredictor

STREAMS, INPUTS = 3, 4
COLUMNS, PER_STAGE, STAGE_STEPS = 6, 2, 40


def backends():
    from agentstate import fused

    return ["eager"] + (["fused"] if fused.load_kernel(COLUMNS_KERNEL) is not None else [])


def make_ccn(**kwargs):
    options = dict(
        n_features=COLUMNS,
        columns_per_stage=PER_STAGE,
        steps_per_stage=STAGE_STEPS,
        init_scale=0.5,
        normalization_rate=0.9,
    )
    options.update(kwargs)
    return agentstate.make_learner(
        "ccn", INPUTS, streams=STREAMS, dtype=torch.float64, seed=0, **options
    )


def inputs_and_cumulants(steps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = 2.0 + 3.0 * torch.randn(steps, STREAMS, INPUTS, generator=generator, dtype=torch.float64)
    cumulants = torch.rand(steps, STREAMS, 1, generator=generator, dtype=torch.float64)
    return x, cumulants


@pytest.mark.parametrize("backend", backends())
def test_ccn_heads_step_at_step_size_over_the_columns_built(backend):
    """The authors divide the heads' step size by the columns built: alpha/2, alpha/4, alpha/6."""
    engine = TDPredictor(make_ccn(), 1, TDConfig(step_size=0.01, backend=backend))
    x, c = inputs_and_cumulants(3 * STAGE_STEPS)
    seen = []
    for t in range(3 * STAGE_STEPS):
        engine.step(x[t], c[t])
        seen.append(engine.optimizer.param_groups[0]["lr"])
    assert seen[0] == pytest.approx(0.01 / 2)
    assert seen[STAGE_STEPS + 1] == pytest.approx(0.01 / 4)
    assert seen[-1] == pytest.approx(0.01 / 6)


def test_default_head_step_counts_the_observation_when_the_heads_see_it():
    learner = agentstate.make_learner("columnar", INPUTS, streams=STREAMS, n_features=7)
    assert TDPredictor(learner, 1, TDConfig(step_size=0.007)).head_step_size == pytest.approx(0.001)
    seeing = TDPredictor(learner, 1, TDConfig(step_size=0.011, include_observation=True))
    assert seeing.head_step_size == pytest.approx(0.001)


@pytest.mark.parametrize("backend", backends())
def test_heads_and_statistics_of_columns_start_afresh_when_their_stage_begins(backend):
    """Before its stage a column outputs 0: no gradient reaches its head, yet rmsprop_td's
    second moment and the feature variance decay on it. Both restart at 1 when it is built
    (the authors' never move before then), so its first update is at most the step size."""
    config = TDConfig(step_size=0.01, normalization_decay=0.9, backend=backend)
    engine = TDPredictor(make_ccn(), 1, config)
    x, c = inputs_and_cumulants(STAGE_STEPS + 1)
    for t in range(STAGE_STEPS):
        engine.step(x[t], c[t])
    second_moment = engine.optimizer.state[engine.head_weight]["second_moment"]
    unbuilt = slice(PER_STAGE, COLUMNS)
    assert torch.all(second_moment[..., unbuilt] < 0.9999**STAGE_STEPS * 1.0001)  # decayed
    assert torch.all(engine.feature_normalizer.variance[:, unbuilt] < 0.5)  # decayed
    built_before = second_moment[..., :PER_STAGE].clone()

    weight_before = engine.head_weight.clone()
    engine.step(x[STAGE_STEPS], c[STAGE_STEPS])  # the first step of stage 1
    new = slice(PER_STAGE, 2 * PER_STAGE)
    second_moment = engine.optimizer.state[engine.head_weight]["second_moment"]
    assert torch.all(engine.feature_normalizer.variance[:, new] > 0.9)
    assert torch.all(second_moment[..., new] > 0.9998)  # restarted at 1, one step of decay
    assert torch.all(second_moment[..., 2 * PER_STAGE : COLUMNS] < 0.9999**STAGE_STEPS * 1.0001)
    assert not torch.equal(second_moment[..., :PER_STAGE], torch.ones_like(built_before))
    step_taken = (engine.head_weight - weight_before)[..., new].abs()
    assert torch.all(step_taken <= engine.head_step_size * 1.0001)


def test_a_frozen_stage_keeps_its_input_statistics_and_the_next_starts_from_them():
    learner = make_ccn()
    x, _ = inputs_and_cumulants(3 * STAGE_STEPS)
    for t in range(STAGE_STEPS):
        learner.step(x[t])
    live_mean, live_variance = learner.input_mean[0].clone(), learner.input_variance[0].clone()
    assert not torch.equal(live_mean, torch.zeros_like(live_mean))  # they moved
    learner.step(x[STAGE_STEPS])  # stage 1 starts from stage 0's live statistics
    assert learner.active_stage == 1
    assert torch.equal(learner.input_mean[0], live_mean)
    assert torch.equal(learner.input_variance[0], live_variance)
    assert not torch.equal(learner.input_mean[1], live_mean)  # and moves on by itself
    for t in range(STAGE_STEPS + 1, 3 * STAGE_STEPS):
        learner.step(x[t])
    assert torch.equal(learner.input_mean[0], live_mean)
    assert torch.equal(learner.input_variance[0], live_variance)
    frozen_stage_1 = learner.input_mean[1].clone()
    learner.step(x[0])
    assert torch.equal(learner.input_mean[1], frozen_stage_1)
    assert not torch.equal(learner.input_mean[2], frozen_stage_1)


def test_a_frozen_stage_reads_the_input_with_its_own_statistics():
    """Stage 0's columns normalise x with stage 0's frozen statistics, not the live ones."""
    learner = make_ccn()
    x, _ = inputs_and_cumulants(STAGE_STEPS + 5)
    for t in range(STAGE_STEPS + 5):
        learner.step(x[t])
    carry = tuple(part.clone() for part in learner.carry)
    _, h = learner.functional_step(learner.params, carry, x[0])
    learner.input_mean[0] += 1.0  # a different normalisation of stage 0 changes its columns
    _, h_moved = learner.functional_step(learner.params, carry, x[0])
    assert not torch.allclose(h[:, :PER_STAGE], h_moved[:, :PER_STAGE])


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("independent", [False, True])
def test_one_stage_ccn_normalising_its_own_input_is_columnar_under_the_engine(backend, independent):
    """Normalising in the learner (raw input handed over) equals normalising upstream."""
    options = dict(streams=STREAMS, independent_params=independent, dtype=torch.float64, seed=2)
    columnar = agentstate.make_learner("columnar", INPUTS, n_features=3, init_scale=0.5, **options)
    ccn = agentstate.make_learner(
        "ccn",
        INPUTS,
        n_features=3,
        columns_per_stage=3,
        init_scale=0.5,
        normalization_rate=0.9,
        variance_floor=0.05,
        **options,
    )
    assert ccn.normalizes_inputs and not columnar.normalizes_inputs
    config = TDConfig(step_size=0.01, normalization_decay=0.9, variance_floor=0.05, backend=backend)
    engines = [TDPredictor(learner, 1, config) for learner in (columnar, ccn)]
    x, c = inputs_and_cumulants(60)
    for t in range(60):
        predictions = [engine.step(x[t], c[t]) for engine in engines]
        torch.testing.assert_close(predictions[1], predictions[0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ccn.params["weight"], columnar.params["weight"])


def config_of(out):
    return json.loads((out / "config.json").read_text())


def test_normalisation_and_head_options_reach_the_engine_and_the_learner(tmp_path):
    out = tmp_path / "run"
    argv = ["run", "trace-patterning", "--learner", "ccn", "--steps", "50", "--streams", "2"]
    argv += ["--learner-kwarg", "n_features=4", "--learner-kwarg", "columns_per_stage=2"]
    argv += ["--normalization-rate", "0.999", "--variance-floor", "0.1", "--no-head-bias"]
    argv += ["--no-normalize-features", "--head-lr", "0.002", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    config = config_of(out)
    assert config["td"]["normalization_decay"] == 0.999
    assert config["td"]["variance_floor"] == 0.1
    assert config["td"]["include_bias"] is False
    assert config["td"]["normalize_features"] is False
    assert config["td"]["normalize_inputs"] is True
    assert config["td"]["head_step_size"] == 0.002
    assert config["learner_config"]["normalization_rate"] == 0.999
    assert config["learner_config"]["variance_floor"] == 0.1
    assert config["learner_config"]["normalize_features"] is False


def test_run_defaults_are_the_authors_protocol(tmp_path):
    out = tmp_path / "run"
    argv = ["run", "trace-patterning", "--steps", "20", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    td = config_of(out)["td"]
    assert (td["optimizer"], td["step_size"], td["lambda_"]) == ("rmsprop_td", 0.001, 0.99)
    assert config_of(out)["run"]["msre_window"] == 100_000


def test_a_learner_kwarg_overrides_the_runs_normalisation_for_the_learner(tmp_path):
    out = tmp_path / "run"
    argv = ["run", "trace-patterning", "--learner", "ccn", "--steps", "20", "--streams", "2"]
    argv += ["--learner-kwarg", "n_features=4", "--learner-kwarg", "normalization_rate=0.9"]
    argv += ["--out", str(out), "--no-progress"]
    assert main(argv) == 0
    assert config_of(out)["learner_config"]["normalization_rate"] == 0.9
    assert config_of(out)["td"]["normalization_decay"] == 0.99999


@pytest.mark.expensive
def test_normalisation_settings_reach_the_engine_from_a_sweep_spec(tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text(
        "[sweep]\nseeds = 2\n\n"
        '[run]\nenv = "trace-patterning"\nsteps = 30\nlearner = "ccn"\n'
        "learner_kwargs = { n_features = 4, columns_per_stage = 2 }\n\n"
        "[grid]\nnormalization_rate = [1.0]\nvariance_floor = [0.1]\ninclude_bias = [false]\n"
    )
    run_sweep(spec, tmp_path / "out", workers=1, progress=False)
    (folder,) = [path for path in (tmp_path / "out").iterdir() if path.is_dir()]
    config = config_of(folder)
    assert config["td"]["normalization_decay"] == 1.0
    assert config["td"]["include_bias"] is False
    assert config["learner_config"]["normalization_rate"] == 1.0
    assert config["learner_config"]["variance_floor"] == 0.1
