"""Gradient diagnostics: exact rules score cosine 1, approximate ones measurably less."""

import csv

import pytest
import torch

from agentstate.cli import main
from agentstate.gradcheck import gradient_check

STEPS, STREAMS, INPUTS, UNITS = 30, 3, 4, 5


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops: a second intra-op thread only adds contention on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def check(name, steps=STEPS, **kwargs):
    return gradient_check(
        name,
        steps,
        input_size=INPUTS,
        streams=STREAMS,
        learner_kwargs={"n_features": UNITS, **kwargs},
        seed=3,
    )


@pytest.mark.parametrize("independent", [False, True], ids=["shared", "independent"])
@pytest.mark.parametrize("name", ["columnar", "rtrl", "elstm"])
def test_exact_learners_score_cosine_one(name, independent):
    table = gradient_check(
        name,
        STEPS,
        input_size=INPUTS,
        streams=STREAMS,
        learner_kwargs={"n_features": UNITS},
        seed=3,
        independent_params=independent,
    )
    assert list(table.steps) == list(range(1, STEPS + 1))
    assert abs(table.cosine_min - 1).max() <= 1e-9
    assert table.relative_error.max() <= 1e-9


def test_ccn_is_exact_across_stage_changes_against_the_network_as_it_ran():
    table = gradient_check(
        "ccn",
        36,
        input_size=INPUTS,
        streams=STREAMS,
        learner_kwargs={
            "n_features": 6,
            "columns_per_stage": 2,
            "steps_per_stage": 12,
            "init_scale": 0.8,
            "normalization_rate": 0.5,
        },
        seed=1,
    )
    assert sorted(set(table.oracle_start)) == [0, 12, 24]  # the oracle restarted per stage
    assert abs(table.cosine_min - 1).max() <= 1e-9
    assert table.relative_error.max() <= 1e-9


def test_snap1_degrades_with_connection_density():
    exact = check("snap1", connection_density=0.0)
    dense = check("snap1", connection_density=1.0, init_scale=0.8)
    assert abs(exact.cosine - 1).max() <= 1e-9
    assert dense.cosine[5:].mean() < 0.999  # measured ~0.97
    assert dense.cosine[5:].mean() < exact.cosine[5:].mean() - 1e-3


def test_tbptt_short_window_is_biased_and_a_full_window_is_exact():
    full = check("tbptt", truncation=STEPS, init_scale=0.8)
    short = check("tbptt", truncation=1, init_scale=0.8)
    assert abs(full.cosine_min - 1).max() <= 1e-9
    assert short.cosine[0] == pytest.approx(1.0, abs=1e-12)  # one step: nothing truncated yet
    assert short.cosine[5:].max() < 0.98  # measured ~0.85
    assert short.cosine_of_mean[5:].max() < 0.98  # averaging streams does not remove bias


def test_uoro_stream_mean_is_far_closer_than_one_draw():
    table = gradient_check(
        "uoro",
        12,
        input_size=INPUTS,
        streams=256,
        learner_kwargs={"n_features": UNITS},
        seed=0,
        identical_streams=True,
        check_every=4,
    )
    assert table.cosine.max() < 0.6  # one draw is noisy
    assert table.cosine_of_mean.min() > 0.8  # 256 independent draws average towards the truth


def test_inputs_of_the_wrong_shape_are_refused():
    wrong_size = torch.zeros(STEPS, STREAMS, INPUTS + 1, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"\[30, 3, 4\]"):
        gradient_check("columnar", STEPS, input_size=INPUTS, streams=STREAMS, inputs=wrong_size)


def test_cli_writes_table_csv_and_plot(tmp_path, capsys):
    out = tmp_path / "gradcheck"
    code = main(
        [
            "gradcheck",
            "--learner",
            "snap1",
            "--learner-kwarg",
            "n_features=4",
            "--learner-kwarg",
            "connection_density=0.5",
            "--steps",
            "20",
            "--streams",
            "2",
            "--check-every",
            "5",
            "--input",
            "trace-patterning",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "snap1 (n_features=4, connection_density=0.5)" in printed and "cosine" in printed
    rows = list(csv.DictReader((out / "gradcheck.csv").open()))
    assert [int(row["step"]) for row in rows] == [5, 10, 15, 20]
    assert all(-1 <= float(row["cosine"]) <= 1 + 1e-12 for row in rows)
    assert (out / "gradcheck.png").read_bytes()[1:4] == b"PNG"


def test_cli_needs_a_learner_without_sweep(capsys):
    assert main(["gradcheck", "--steps", "5"]) == 2
    assert "--learner is required" in capsys.readouterr().err
