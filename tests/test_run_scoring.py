"""Scoring in a run: the logged MSRE of a step does not depend on how often the log samples.

The runner folds the squared errors of a whole log interval into the sliding means at once;
that must give, bit for bit, what folding them in step by step (a log point every step) gives.
"""

import csv

import numpy as np

from agentstate.experiment import RunConfig, run_experiment


def run(out, log_every):
    config = RunConfig(
        env="trace-conditioning",
        steps=2800,
        streams=3,
        independent=True,
        log_every=log_every,
        msre_window=300,
        learner_kwargs={"n_features": 2},
    )
    result = run_experiment(config, out, progress=False)
    with (out / "metrics.csv").open(newline="") as handle:
        rows = {int(row["step"]): row for row in csv.DictReader(handle)}
    return result, rows


def test_logged_msre_is_the_same_bit_for_bit_whatever_the_log_interval(tmp_path):
    every_step, dense = run(tmp_path / "every-step", log_every=1)
    # 700 steps: pieces that straddle the source's chunk ends and the window's recomputes.
    sparse_result, sparse = run(tmp_path / "sparse", log_every=700)
    assert sorted(sparse) == [700, 1400, 2100, 2800]
    for step, row in sparse.items():
        assert row == dense[step]  # every column, as written
    for name, values in every_step.final.items():
        np.testing.assert_array_equal(sparse_result.final[name], values)  # every bit
