"""Every built-in learner's eager engine (the only one off the CPU), on every available
device, takes the same steps as the fused CPU engine, to float64 rounding.

Parametrised over ``cpu`` and, where present, ``cuda``: on a CPU-only machine the ``cuda``
cases are skipped; on a GPU machine they check the GPU path.
"""

import pytest
import torch
from test_fast_paths import LEARNERS

import agentstate
from agentstate.td import TDConfig, TDPredictor

STREAMS, INPUTS = 4, 5
OPTIONS = {**LEARNERS, "rtrl": {"n_features": 3}}
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    ),
]


def predictions(name, device, backend, steps=40):
    """Predictions ``[steps, B, 1]`` (float64, on the CPU) of a seeded predictor."""
    learner = agentstate.make_learner(
        name, INPUTS, streams=STREAMS, dtype=torch.float64, device=device, seed=5, **OPTIONS[name]
    )
    predictor = TDPredictor(learner, 1, TDConfig(backend=backend, step_size=0.01))
    generator = torch.Generator().manual_seed(2)
    out = []
    for t in range(steps):
        x = (torch.rand(STREAMS, INPUTS, generator=generator) < 0.3).double().to(device)
        c = torch.rand(STREAMS, 1, generator=generator, dtype=torch.float64).to(device)
        start = (torch.arange(STREAMS) == t % STREAMS).to(device) if t % 9 == 8 else None
        out.append(predictor.step(x, c, episode_start=start).cpu())
    return torch.stack(out), predictor


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_the_eager_engine_on_a_device_takes_the_fused_cpu_steps(name, device):
    expected, reference = predictions(name, "cpu", "auto")
    if reference.backend != "fused":
        pytest.skip(f"{name} has no fused CPU engine to compare with here")
    actual, predictor = predictions(name, device, "eager")
    assert predictor.learner.carry[0].device.type == device
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES[1:])
def test_off_the_cpu_the_engine_is_eager(device):
    learner = agentstate.make_learner("columnar", INPUTS, streams=STREAMS, device=device)
    assert TDPredictor(learner, 1, TDConfig(backend="auto")).backend == "eager"
