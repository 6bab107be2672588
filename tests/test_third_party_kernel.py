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
    assert not torch.equal(fast.learner.params["weight"], predictor(
        leaky_echo, "eager", independent).learner.params["weight"])  # it learned
