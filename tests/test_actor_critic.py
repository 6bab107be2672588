"""The streaming actor-critic (``agentstate.rl``): exact core gradients, SB3's conventions,
clear errors, and learning a task that needs memory."""

import copy
import json
import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from oracle import bptt_gradient, relative_error
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy

import agentstate
from agentstate.rl import RTRLActorCritic
from agentstate.wrappers.errors import LearnerDivergedError, NonFiniteInputError


class CueRecall(gym.Env):
    """Observe a cue (one of two), then ``delay`` blanks, then "go": the action taken at go
    earns +1 if it names the cue and -1 otherwise. A memoryless policy averages 0."""

    def __init__(self, delay: int = 3) -> None:
        self.delay = delay
        self.observation_space = spaces.Box(0.0, 1.0, (3,), np.float32)
        self.action_space = spaces.Discrete(2)

    def _observation(self, cue=None, go=False):
        observation = np.zeros(3, dtype=np.float32)
        if cue is not None:
            observation[cue] = 1.0
        observation[2] = float(go)
        return observation

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.cue, self.t = int(self.np_random.integers(2)), 0
        return self._observation(cue=self.cue), {}

    def step(self, action):
        self.t += 1
        if self.t <= self.delay + 1:
            return self._observation(go=self.t == self.delay + 1), 0.0, False, False, {}
        return self._observation(), (1.0 if int(action) == self.cue else -1.0), True, False, {}


EXACT_LEARNERS = {
    "columnar": {"n_features": 3},
    "elstm": {"n_features": 3},
    "rtrl": {"n_features": 3},
    # Without its own input statistics, which move every step (tests/plugins/test_ccn.py
    # replays them; here the oracle uses fixed ones).
    "ccn": {"n_features": 4, "columns_per_stage": 4, "normalize_inputs": False},
    "rtu": {"n_features": 4},
}


def frozen_model(learner, env, backend="eager", **config):
    """A model whose parameters stay put (step sizes 0) with random heads, lambda = 0: its
    core trace after a step is that step's core gradient."""
    options = {"critic_step_size": 0.0, "actor_step_size": 0.0, "learner_step_size": 0.0}
    options.update(lambda_=0.0, entropy_coefficient=0.0, **config)
    model = RTRLActorCritic(env, learner=learner, learner_kwargs=EXACT_LEARNERS[learner],
                            config=options, seed=0, backend=backend)  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    policy = model.policy
    for head in (policy.critic_weight, policy.actor_weight):
        head.copy_(torch.randn(head.shape, generator=generator, dtype=head.dtype))
    return model


@pytest.mark.parametrize("learner", sorted(EXACT_LEARNERS))
def test_core_gradient_is_bptt_of_value_plus_log_policy(learner):
    """At each step the core's gradient is d(v_t + log pi(a_t | s_t))/d theta through the
    whole episode so far, as autograd BPTT through ``functional_step`` computes it."""
    if learner not in agentstate.available_learners():
        pytest.skip(f"{learner} is not installed")
    env = make_vec_env(lambda: CueRecall(delay=4), n_envs=2, seed=3)
    model = frozen_model(learner, env)
    policy = model.policy
    assert policy.core.exact
    inputs, states, actions, resets = [], [], [], {}
    core_step, sample = policy.core.step, policy.sample

    def recording_step(x):
        inputs.append(x.clone())
        states.append(core_step(x))
        return states[-1]

    def recording_sample(scores, noise):
        actions.append(sample(scores, noise))
        return actions[-1]

    core_reset = policy.core.reset

    def recording_reset(mask=None, **options):
        if mask is not None:  # None: the start of learning, before any input
            resets[len(inputs)] = mask.clone()
        core_reset(mask, **options)

    policy.core.step, policy.sample, policy.core.reset = (
        recording_step, recording_sample, recording_reset
    )  # fmt: skip
    model.learn(0)  # the first step: s_0, a_0 and the traces at s_0
    params = {key: value.clone() for key, value in policy.core.params.items()}
    for t in range(12):
        if t:
            model._step()  # the transition to s_t, then a_t and the traces at s_t
        h = states[t].detach().clone().requires_grad_(True)
        features = policy.head_features(h, inputs[t])
        log_policy = policy.action_scores(features).log_softmax(1)[torch.arange(2), actions[t]]
        objective = policy.value(features) + log_policy
        (v,) = torch.autograd.grad(objective.sum(), h)
        truth = bptt_gradient(policy.core, params, torch.stack(inputs[: t + 1]), v,
                              {k: m for k, m in resets.items() if k <= t})  # fmt: skip
        for key, trace in policy.core_trace.items():  # an episode's first trace starts afresh
            assert relative_error(trace, truth[key]) <= 1e-9, (t, key)
    assert resets  # episodes ended and began within the checked steps


COMPILED_CORES = {
    "columnar": {"n_features": 3},
    "elstm": {"n_features": 3},
    "rtu": {"n_features": 4},
    # Two stages within the run: the compiled step rebinds to the new stage's weights.
    "ccn": {"n_features": 4, "columns_per_stage": 2, "steps_per_stage": 40},
}


def _max_relative_difference(first, second):
    if isinstance(first, dict):
        return max((_max_relative_difference(first[k], second[k]) for k in first), default=0.0)
    if isinstance(first, torch.Tensor) and first.dtype.is_floating_point and first.numel():
        scale = float(first.abs().max()) or 1.0
        return float((first - second).abs().max()) / scale
    if isinstance(first, torch.Tensor):
        return 0.0 if torch.equal(first, second) else float("inf")
    return 0.0


def narrow_box_pendulum() -> gym.Env:
    """Pendulum whose actions live in [-0.25, 0.75]: the initial policy's draws mostly clip."""
    return gym.wrappers.RescaleAction(gym.make("Pendulum-v1"), -0.25, 0.75)


@pytest.mark.parametrize("learner", sorted(COMPILED_CORES))
@pytest.mark.parametrize("env_id", ["cue-recall", "Pendulum-v1", "narrow-box"])
def test_the_compiled_step_acts_and_learns_as_the_eager_one(learner, env_id):
    """Same actions, parameters, traces, statistics and draws after 160 env steps of 2 envs,
    discrete and box actions (a narrow box clips most actions), with every update and
    stabiliser on. (Learning at these step sizes is chaotic: a last-bit difference in a sum
    grows ~10x per 25 steps, ~30x per 20 on the narrow box, so a longer run would compare the
    dynamics, not the step.)"""
    make = {
        "cue-recall": lambda: CueRecall(delay=3),
        "Pendulum-v1": lambda: gym.make("Pendulum-v1"),
        "narrow-box": narrow_box_pendulum,
    }[env_id]
    models = {}
    for backend in ("eager", "fused"):
        env = make_vec_env(make, n_envs=2, seed=3)
        models[backend] = RTRLActorCritic(env, learner=learner, backend=backend, seed=0,
                                          learner_kwargs=COMPILED_CORES[learner])  # fmt: skip
        models[backend].learn(60 if env_id == "narrow-box" else 160)
    assert models["fused"].compiled and not models["eager"].compiled
    eager, compiled = (models[b].policy.state_dict() for b in ("eager", "fused"))
    assert _max_relative_difference(eager, compiled) <= 1e-9
    actions = [models[b]._pending_actions for b in ("eager", "fused")]
    assert np.allclose(*actions, rtol=1e-9, atol=0) and actions[0].dtype == actions[1].dtype


def test_with_no_core_named_it_takes_the_harness_best_and_overrides_its_options():
    env = make_vec_env(lambda: CueRecall(), n_envs=1, seed=0)
    model = RTRLActorCritic(env, seed=0)
    assert model.learner == "rtu"
    assert model.learner_kwargs == {"n_features": 32, "activation": "tanh"}
    assert model.policy.core.state_bound == 1.0
    smaller = RTRLActorCritic(env, learner_kwargs={"n_features": 8}, seed=0)
    assert smaller.learner_kwargs == {"n_features": 8, "activation": "tanh"}
    assert RTRLActorCritic(env, learner="columnar", seed=0).learner_kwargs == {}


def test_python_config_and_command_line_resolve_the_core_by_the_same_rule(tmp_path):
    """No core named: the tuned RTU, options overridable; a core named (even "rtu"): its
    plugin's defaults and the options given, never the tuned core's options."""
    from agentstate.cli import main
    from agentstate.rl.training import TrainConfig

    env = make_vec_env(lambda: CueRecall(), n_envs=1, seed=0)
    cases = [
        ((None, {}), ("rtu", {"n_features": 32, "activation": "tanh"})),
        ((None, {"n_features": 8}), ("rtu", {"n_features": 8, "activation": "tanh"})),
        (("rtu", {}), ("rtu", {})),
        (("columnar", {"n_features": 4}), ("columnar", {"n_features": 4})),
    ]
    for (learner, kwargs), resolved in cases:
        model = RTRLActorCritic(env, learner=learner, learner_kwargs=kwargs, seed=0)
        assert (model.learner, model.learner_kwargs) == resolved
        config = TrainConfig(env="CartPole-v1", learner=learner, learner_kwargs=kwargs)
        assert (config.learner, config.learner_kwargs) == resolved
        argv = ["train", "CartPole-v1", "--steps", "20", "--log-every", "10", "--no-progress"]
        argv += [] if learner is None else ["--learner", learner]
        argv += [
            arg for key, value in kwargs.items() for arg in ("--learner-kwarg", f"{key}={value}")
        ]
        out = tmp_path / f"{learner}-{len(kwargs)}"
        assert main([*argv, "--out", str(out)]) == 0
        written = json.loads((out / "config.json").read_text())["train"]
        assert (written["learner"], written["learner_kwargs"]) == resolved


def test_backend_fused_names_why_it_cannot_run():
    env = make_vec_env(lambda: CueRecall(), n_envs=2, seed=0)
    assert not RTRLActorCritic(env, learner="tbptt", seed=0).compiled  # auto: eager
    with pytest.raises(ValueError, match="no actor-critic entry points"):
        RTRLActorCritic(env, learner="tbptt", seed=0, backend="fused")


@pytest.mark.expensive
def test_learns_to_recall_a_cue_that_a_memoryless_policy_cannot():
    env = make_vec_env(lambda: CueRecall(delay=3), n_envs=8, seed=0)
    model = RTRLActorCritic(env, learner="columnar", learner_kwargs={"n_features": 8}, seed=0)
    model.learn(40_000)
    mean_return, _ = evaluate_policy(model, env, n_eval_episodes=100, deterministic=True)
    assert mean_return >= 0.8  # memoryless: 0 on average


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_save_and_load_give_the_same_actions_and_states(tmp_path, env_id):
    env = make_vec_env(env_id, n_envs=2, seed=0)
    model = RTRLActorCritic(env, learner="columnar", learner_kwargs={"n_features": 4}, seed=0)
    model.learn(300)
    model.save(tmp_path / "agent")
    loaded = RTRLActorCritic.load(tmp_path / "agent", env=env)
    assert torch.equal(loaded.policy.core.params["weight"], model.policy.core.params["weight"])
    observation = env.reset()
    state_a = state_b = None
    starts = np.ones(2, dtype=bool)
    for _ in range(20):
        action_a, state_a = model.predict(observation, state_a, starts, deterministic=True)
        action_b, state_b = loaded.predict(observation, state_b, starts, deterministic=True)
        np.testing.assert_array_equal(action_a, action_b)
        for part_a, part_b in zip(state_a, state_b, strict=True):
            np.testing.assert_array_equal(part_a, part_b)
        observation, _, dones, _ = env.step(action_a)
        starts = dones
    if env_id == "Pendulum-v1":
        assert np.all(np.abs(action_a) <= 2.0)  # clipped to the box


def test_evaluate_policy_and_callbacks_work(tmp_path):
    from stable_baselines3.common.callbacks import BaseCallback, CheckpointCallback

    env = make_vec_env("CartPole-v1", n_envs=2, seed=0)
    model = RTRLActorCritic(env, learner="columnar", learner_kwargs={"n_features": 4}, seed=0)
    calls = []

    class Counting(BaseCallback):
        def _on_step(self):
            calls.append(self.num_timesteps)
            return True

    saving = CheckpointCallback(save_freq=25, save_path=str(tmp_path), name_prefix="agent")
    model.learn(100, callback=[Counting(), saving], progress_bar=False)
    assert calls == list(range(2, 101, 2))
    assert sorted(path.name for path in tmp_path.glob("agent_*.zip")) == [
        "agent_100_steps.zip", "agent_50_steps.zip"
    ]  # fmt: skip
    RTRLActorCritic.load(tmp_path / "agent_100_steps.zip", env=env)
    mean_return, std_return = evaluate_policy(model, env, n_eval_episodes=4)
    assert mean_return >= 8.0 and np.isfinite(std_return)


def test_logger_records_the_learners_metrics(tmp_path):
    from stable_baselines3.common.logger import configure

    env = make_vec_env("CartPole-v1", n_envs=2, seed=0)
    model = RTRLActorCritic(env, learner="columnar", learner_kwargs={"n_features": 4}, seed=0)
    model.set_logger(configure(str(tmp_path), ["csv"]))
    model.learn(600, log_interval=200)
    header = (tmp_path / "progress.csv").read_text().splitlines()[0].split(",")
    assert {"train/td_error_squared", "time/fps", "rollout/ep_rew_mean"} <= set(header)


def test_non_finite_observations_are_refused_with_the_stream_named():
    class Broken(CueRecall):
        def step(self, action):
            observation, *rest = super().step(action)
            observation[1] = np.nan
            return (observation, *rest)

    env = make_vec_env(lambda: Broken(), n_envs=2, seed=0)
    model = RTRLActorCritic(env, learner="columnar", learner_kwargs={"n_features": 4}, seed=0)
    with pytest.raises(NonFiniteInputError, match="stream 0"):
        model.learn(10)


@pytest.mark.parametrize("backend", ["eager", "fused"])
def test_a_step_refused_for_its_input_starts_nothing(backend):
    """Not even the learner's begin_step: a CCN core's stage clock stays where it was."""

    class BrokenReward(CueRecall):
        def step(self, action):
            observation, reward, *rest = super().step(action)
            return (observation, float("nan"), *rest)

    env = make_vec_env(lambda: BrokenReward(), n_envs=2, seed=0)
    model = RTRLActorCritic(env, learner="ccn", backend=backend, seed=0,
                            learner_kwargs={"n_features": 4, "columns_per_stage": 2})  # fmt: skip
    with pytest.raises(NonFiniteInputError, match="reward of stream 0"):
        model.learn(10)
    assert model.policy.core.steps_in_stage == 1  # the first step only, before any reward


def test_a_diverging_update_stops_with_a_clear_error_and_writes_nothing():
    env = make_vec_env(lambda: CueRecall(), n_envs=2, seed=0)
    model = RTRLActorCritic(env, learner="columnar", learner_kwargs={"n_features": 4}, seed=0)
    model.learn(20)
    before = copy.deepcopy(model.policy.state_dict())
    model.policy.critic_weight[0, 0] = float("inf")
    before["critic_weight"] = model.policy.critic_weight.clone()
    with pytest.raises(LearnerDivergedError, match="no parameter was changed"):
        model.learn(10, reset_num_timesteps=False)
    after = model.policy.state_dict()
    assert torch.equal(after["learner"]["params"]["weight"], before["learner"]["params"]["weight"])
    assert torch.equal(after["actor_weight"], before["actor_weight"])
    assert torch.isfinite(model.policy.core.params["weight"]).all()


@pytest.mark.parametrize("backend", ["eager", "fused"])
def test_a_policy_that_is_not_finite_stops_before_the_env_sees_its_action(backend):
    """Box actions: an unbounded state or head would otherwise hand the env a NaN action,
    whose NaN observation would then be blamed on the environment."""
    env = make_vec_env("Pendulum-v1", n_envs=2, seed=0)
    model = RTRLActorCritic(env, learner="columnar", learner_kwargs={"n_features": 4}, seed=0,
                            backend=backend)  # fmt: skip
    model.learn(20)
    model.policy.log_std.fill_(float("nan"))  # (an infinite one would be clamped back)
    with pytest.raises(LearnerDivergedError, match="action scores or actions are not finite"):
        model.learn(10, reset_num_timesteps=False)
    assert np.isfinite(model._pending_actions).all()  # the last action sent was finite


@pytest.mark.parametrize("env_id", ["CartPole-v1", "popgym:popgym-RepeatPreviousEasy-v0"])
def test_train_command_writes_curves_and_a_loadable_model(tmp_path, env_id):
    import csv

    from agentstate.cli import main

    if env_id.startswith("popgym:"):
        pytest.importorskip("popgym")
    out = tmp_path / "run"
    argv = ["train", env_id, "--steps", "800", "--envs", "2", "--log-every", "200"]
    argv += ["--learner-kwarg", "n_features=4", "--agent", "learner_step_size=0.5"]
    assert main([*argv, "--out", str(out), "--no-progress"]) == 0
    rows = list(csv.DictReader((out / "learning_curve.csv").open()))
    assert [int(row["step"]) for row in rows] == [200, 400, 600, 800]
    episodes = list(csv.DictReader((out / "episodes.csv").open()))
    assert episodes and {"step", "stream", "episode_return", "episode_length"} <= set(episodes[0])
    assert (out / "learning_curve.png").read_bytes()[1:4] == b"PNG"
    model = RTRLActorCritic.load(out / "model.zip")
    assert model.config.learner_step_size == 0.5


def test_train_command_refuses_an_unknown_agent_setting(tmp_path, capsys):
    from agentstate.cli import main

    argv = ["train", "CartPole-v1", "--agent", "learning_rate=0.1", "--out", str(tmp_path)]
    assert main(argv) == 2
    assert "unknown actor-critic setting(s) learning_rate" in capsys.readouterr().err


def test_the_core_sees_box_actions_as_executed_clipped_and_scaled_to_unit_range():
    """The previous action enters the core as the env executes it: clipped to the box, then
    mapped to [-1, 1]. Fed back unclipped, a large action drives the core, whose state drives
    a larger action, until the action overflows (seen on position-only Pendulum)."""
    env = make_vec_env(narrow_box_pendulum, n_envs=2, seed=0)
    model = RTRLActorCritic(env, learner="columnar", learner_kwargs={"n_features": 4}, seed=0)
    policy = model.policy
    executed = torch.tensor([[-5.0], [0.25], [0.75], [1e300]], dtype=torch.float64)
    assert policy.action_input(executed).flatten().tolist() == [-1.0, 0.0, 1.0, 1.0]
    model.learn(200)
    assert policy.action_state.abs().max() <= 1.0
    observation = env.reset()
    _, state = model.predict(observation, None, np.ones(2, dtype=bool))
    policy.actor_weight.fill_(1e200)  # scores far outside the box, still finite
    _, state = model.predict(observation, state, np.zeros(2, dtype=bool))
    assert np.abs(state[-1]).max() <= 1.0


def test_unbounded_box_actions_reach_the_core_unchanged():
    from agentstate.rl.action_bounds import ActionBounds

    box = spaces.Box(np.array([-np.inf, 0.0, -2.0]), np.array([np.inf, np.inf, 2.0]))
    bounds = ActionBounds.of(box, 3)
    action = torch.tensor([[7.0, -3.0, 4.0]], dtype=torch.float32)
    encoded = bounds.encode(action)
    assert encoded.dtype == torch.float32
    assert encoded.tolist() == [[7.0, 0.0, 1.0]]  # only the bounded sides clip or scale


def test_predict_refuses_to_hand_the_env_an_action_that_is_not_finite():
    env = make_vec_env("Pendulum-v1", n_envs=2, seed=0)
    model = RTRLActorCritic(env, learner="columnar", learner_kwargs={"n_features": 4}, seed=0)
    model.policy.actor_weight.fill_(float("nan"))
    with pytest.raises(LearnerDivergedError, match="predict: the policy's actions are not finite"):
        model.predict(env.reset(), deterministic=True)


@pytest.mark.parametrize("backend", ["eager", "fused"])
def test_the_log_std_stays_within_its_bounds_relative_to_the_box(backend):
    """The entropy bonus raises a Box policy's log-std by a fixed amount each step; left
    unbounded it reached 354 in 97k steps on position-only Pendulum, then exp overflowed."""
    env = make_vec_env(narrow_box_pendulum, n_envs=2, seed=0)  # half-width 0.5
    config = {"entropy_coefficient": 1.0, "max_log_std": 0.5, "min_log_std": -1.0}
    model = RTRLActorCritic(env, learner="columnar", learner_kwargs={"n_features": 4}, seed=0,
                            config=config, backend=backend)  # fmt: skip
    model.learn(300)
    ceiling = math.log(0.5) + 0.5
    assert model.policy.log_std.item() == pytest.approx(ceiling, abs=1e-12)
    model.policy.log_std.fill_(-30.0)
    model.learn(20, reset_num_timesteps=False)
    assert model.policy.log_std.item() >= math.log(0.5) - 1.0 - 1e-12


def test_log_std_bounds_must_be_ordered():
    from agentstate.rl.actor_critic import ActorCriticConfig

    with pytest.raises(ValueError, match="min_log_std must be below max_log_std"):
        ActorCriticConfig(min_log_std=1.0, max_log_std=1.0)
