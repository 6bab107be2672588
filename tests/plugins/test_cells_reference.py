"""The cells themselves against an outside reference: ``torch.nn.LSTMCell`` with copied weights.

Both cells order the gates ``i, f, g, o`` as ``LSTMCell`` stacks its weight rows, and keep one
bias per gate where ``LSTMCell`` has two (``bias_ih + bias_hh``): the bias goes into
``bias_ih`` and ``bias_hh`` is zero.
"""

import exactness
import pytest
import torch
from exactness import INPUTS, STREAMS

UNITS = 4
STEPS = 12
DENSE_LSTM_LEARNERS = ("rtrl", "tbptt", "uoro", "snap1")
"""Every learner built on ``agentstate.plugins.dense_lstm``: one cell, four rules."""


def lstm_cell(input_weight, recurrent_weight, bias):
    """A float64 ``LSTMCell`` with these ``[4 * units, ...]`` weights (gate-major rows)."""
    units = recurrent_weight.shape[1]
    cell = torch.nn.LSTMCell(input_weight.shape[1], units, dtype=torch.float64)
    with torch.no_grad():
        cell.weight_ih.copy_(input_weight)
        cell.weight_hh.copy_(recurrent_weight)
        cell.bias_ih.copy_(bias)
        cell.bias_hh.zero_()
    return cell


def dense_reference(weight):
    """One ``LSTMCell`` per copy of ``weight: [P, 4, n, d + n + 1]`` (input, recurrent, bias)."""
    n_units = weight.shape[2]
    flat = weight.reshape(weight.shape[0], 4 * n_units, -1)
    return [
        lstm_cell(copy[:, :INPUTS], copy[:, INPUTS : INPUTS + n_units], copy[:, -1])
        for copy in flat
    ]


def random_inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(STEPS, STREAMS, INPUTS, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("independent", [False, True])
@pytest.mark.parametrize("name", DENSE_LSTM_LEARNERS)
def test_dense_lstm_cell_is_torch_lstm_cell(name, independent):
    learner = exactness.make_float64_learner(name, independent, n_features=UNITS, init_scale=0.8)
    weight = learner.params["weight"]
    assert weight.shape == (STREAMS if independent else 1, 4, UNITS, INPUTS + UNITS + 1)
    cells = dense_reference(weight)
    h = c = torch.zeros(STREAMS, UNITS, dtype=torch.float64)
    carry = learner.initial_carry()
    for x in random_inputs():
        with torch.no_grad():
            if independent:
                states = [
                    cell(x[b : b + 1], (h[b : b + 1], c[b : b + 1])) for b, cell in enumerate(cells)
                ]
                h, c = (torch.cat(parts) for parts in zip(*states, strict=True))
            else:
                h, c = cells[0](x, (h, c))
        carry, h_functional = learner.functional_step(learner.params, carry, x)
        h_step = learner.step(x)
        torch.testing.assert_close(h_step, h, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(h_functional, h, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(carry[1], c, rtol=1e-12, atol=1e-14)
    assert h.abs().max() > 0.1  # out of the linear regime near zero


@pytest.mark.parametrize("independent", [False, True])
def test_columnar_column_is_a_one_unit_torch_lstm_cell_of_input_and_own_state(independent):
    learner = exactness.make_float64_learner(
        "columnar", independent, n_features=UNITS, init_scale=0.8
    )
    weight = learner.params["weight"]  # [P, columns, 4, d + 2]: input, own state, bias
    assert weight.shape == (STREAMS if independent else 1, UNITS, 4, INPUTS + 2)
    per_stream = weight.expand(STREAMS, -1, -1, -1)
    cells = [
        [
            lstm_cell(column[:, :INPUTS], column[:, INPUTS : INPUTS + 1], column[:, INPUTS + 1])
            for column in stream_weight
        ]
        for stream_weight in per_stream
    ]
    h = c = torch.zeros(STREAMS, UNITS, dtype=torch.float64)
    carry = learner.initial_carry()
    for x in random_inputs():
        with torch.no_grad():
            states = [
                [
                    cell(x[b : b + 1], (h[b : b + 1, j : j + 1], c[b : b + 1, j : j + 1]))
                    for j, cell in enumerate(stream_cells)
                ]
                for b, stream_cells in enumerate(cells)
            ]
        h = torch.cat([torch.cat([h_j for h_j, _ in row], dim=1) for row in states])
        c = torch.cat([torch.cat([c_j for _, c_j in row], dim=1) for row in states])
        carry, h_functional = learner.functional_step(learner.params, carry, x)
        h_step = learner.step(x)
        torch.testing.assert_close(h_step, h, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(h_functional, h, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(carry[1], c, rtol=1e-12, atol=1e-14)
    assert h.abs().max() > 0.1
