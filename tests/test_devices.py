"""Every built-in learner on every available device: the eager engine (the only one off the
CPU) takes the same steps there as the fused CPU engine, to float64 rounding.

Parametrised over ``cpu`` and, where present, ``cuda``: on a CPU-only machine the ``cuda``
cases are skipped; on a GPU machine they check the GPU path.
"""

import pytest
import torch

import agentstate
from agentstate.td import TDConfig, TDPredictor

STREAMS, INPUTS = 4, 5
OPTIONS = {
    "columnar": {"n_features": 4},
    "ccn": {"n_features": 4, "columns_per_stage": 2, "steps_per_stage": 15},
    "tbptt": {"n_features": 4, "truncation": 3},
    "elstm": {"n_features": 4},
    "uoro": {"n_features": 4},
    "snap1": {"n_features": 4, "connection_density": 0.5},
    "rtrl": {"n_features": 3},
}
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
def test_the_engine_on_a_device_takes_the_cpu_steps(name, device):
    expected, _ = predictions(name, "cpu", "auto")
    actual, predictor = predictions(name, device, "auto")
    if device != "cpu":
        assert predictor.backend == "eager"  # the fused kernel is CPU-only and says so
    assert predictor.learner.carry[0].device.type == device
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-12)
