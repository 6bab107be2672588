"""A third-party learner ships its own compiled TD step through the same contract as the
built-ins (``examples/third_party_learner``), and gets the fast path without touching core."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agentstate import fused
from agentstate.plugins.columnar import COLUMNS_KERNEL
from agentstate.td import TDConfig, TDPredictor

EXAMPLE_PLUGIN = Path(__file__).parents[1] / "examples" / "third_party_learner"
STREAMS, INPUTS, FEATURES = 3, 4, 5


@pytest.fixture(scope="module")
def leaky_echo(tmp_path_factory):
    """The example plugin, pip-installed into a throwaway target (its kernel source too)."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
         "--no-build-isolation", "--target", str(target), str(EXAMPLE_PLUGIN)],
        check=True,
    )  # fmt: skip
    sys.path.insert(0, str(target))
    try:
        from agentstate_example_learner import plugin

        yield plugin
    finally:
        sys.path.remove(str(target))
        sys.modules.pop("agentstate_example_learner.plugin", None)
        sys.modules.pop("agentstate_example_learner", None)


def predictor(plugin, backend, independent, **config):
    learner = plugin.LeakyEcho(
        INPUTS,
        plugin.LeakyEchoConfig(n_features=FEATURES),
        streams=STREAMS,
        independent_params=independent,
        dtype=torch.float64,
        seed=0,
    )
    settings = {"step_size": 0.01, "head_step_size": 0.05, **config}
    return TDPredictor(learner, 2, TDConfig(backend=backend, **settings))


@pytest.mark.expensive
@pytest.mark.skipif(fused.load_kernel(COLUMNS_KERNEL) is None, reason="no C++ compiler")
@pytest.mark.parametrize("optimizer", ["rmsprop_td", "adam", "sgd"])
@pytest.mark.parametrize("independent", [False, True])
def test_the_plugins_compiled_step_takes_the_eager_steps(leaky_echo, independent, optimizer):
    kernel = leaky_echo.LEAKY_ECHO_KERNEL
    assert Path(kernel.sources[0]).is_file()  # shipped inside the installed package
    assert not Path(kernel.sources[0]).is_relative_to(EXAMPLE_PLUGIN)
    fast = predictor(leaky_echo, "fused", independent, optimizer=optimizer)
    eager = predictor(leaky_echo, "eager", independent, optimizer=optimizer)
    assert (fast.backend, eager.backend) == ("fused", "eager")
    generator = torch.Generator().manual_seed(0)
    for t in range(80):
        x = torch.randn(STREAMS, INPUTS, generator=generator, dtype=torch.float64)
        c = torch.rand(STREAMS, 2, generator=generator, dtype=torch.float64)
        start = torch.arange(STREAMS) == t % STREAMS if t % 23 == 22 else None
        got = fast.step(x, c, episode_start=start)
        expected = eager.step(x, c, episode_start=start)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(
        fast.learner.params["weight"], eager.learner.params["weight"], rtol=1e-12, atol=1e-14
    )
    assert not torch.equal(
        fast.learner.params["weight"],
        predictor(leaky_echo, "eager", independent).learner.params["weight"],
    )  # it learned


@pytest.mark.expensive
@pytest.mark.skipif(fused.load_kernel(COLUMNS_KERNEL) is None, reason="no C++ compiler")
def test_the_plugins_kernel_also_runs_the_actor_critic(leaky_echo, monkeypatch):
    """The same kernel body, opted in with one macro, gives the actor-critic its compiled
    step with a leaky_echo core, acting and learning as the eager step does."""
    import gymnasium as gym
    from stable_baselines3.common.env_util import make_vec_env

    from agentstate.rl import RTRLActorCritic, actor_critic

    def make_leaky_echo(name, input_size, *, streams, dtype, seed, **options):
        config = leaky_echo.LeakyEchoConfig(**options)
        return leaky_echo.LeakyEcho(input_size, config, streams=streams, dtype=dtype, seed=seed)

    monkeypatch.setattr(actor_critic, "make_learner", make_leaky_echo)
    states = {}
    for backend in ("eager", "fused"):
        env = make_vec_env(lambda: gym.make("CartPole-v1"), n_envs=2, seed=0)
        model = RTRLActorCritic(env, learner="leaky_echo", learner_kwargs={"n_features": 4},
                                seed=0, backend=backend)  # fmt: skip
        assert model.compiled == (backend == "fused")
        states[backend] = model.learn(120).policy.state_dict()
    for key in ("critic_weight", "actor_weight"):
        fast, reference = states["fused"][key], states["eager"][key]
        torch.testing.assert_close(fast, reference, rtol=1e-9, atol=1e-12)
    weights = [states[b]["learner"]["params"]["weight"] for b in ("fused", "eager")]
    torch.testing.assert_close(*weights, rtol=1e-9, atol=1e-12)
