"""Aggregation: seeds pooled per grid point, numbers checked against a hand computation."""

import csv
import json
import math

import pytest

from agentstate.cli import main
from agentstate.results import aggregate


def write_run(folder, *, step_size, seed, independent, rows):
    """A finished run: config.json and metrics.csv with ``rows`` = [(step, [msre_b ...])]."""
    folder.mkdir(parents=True)
    run = {
        "env": "trace-patterning",
        "learner": "columnar",
        "steps": 200,
        "streams": len(rows[0][1]),
        "independent": independent,
        "seed": seed,
        "step_size": step_size,
        "learner_kwargs": {"n_features": 2},
    }
    (folder / "config.json").write_text(json.dumps({"run": run}))
    streams = len(rows[0][1])
    lines = ["step,msre,msre_se,msre_zero," + ",".join(f"msre_{b}" for b in range(streams))]
    for step, values in rows:
        mean = sum(values) / len(values)
        lines.append(f"{step},{mean},0,1," + ",".join(str(value) for value in values))
    (folder / "metrics.csv").write_text("\n".join(lines) + "\n")


@pytest.fixture
def runs(tmp_path):
    # Grid point A (step size 0.1): two independent runs of two streams -> 4 seeds.
    write_run(tmp_path / "a0", step_size=0.1, seed=0, independent=True,
              rows=[(100, [4.0, 2.0]), (200, [2.0, 1.0])])  # fmt: skip
    write_run(tmp_path / "a1", step_size=0.1, seed=1, independent=True,
              rows=[(100, [6.0, 3.0]), (200, [3.0, 2.0])])  # fmt: skip
    # Grid point B (step size 0.01): one independent run of two streams -> 2 seeds.
    write_run(tmp_path / "b0", step_size=0.01, seed=0, independent=True,
              rows=[(100, [1.0, 3.0]), (200, [1.0, 1.0])])  # fmt: skip
    # Grid point C (shared network): one run -> 1 seed, its msre column (2, then 1).
    write_run(tmp_path / "c0", step_size=0.1, seed=0, independent=False,
              rows=[(100, [1.0, 3.0]), (200, [1.0, 1.0])])  # fmt: skip
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.json").write_text("{}")  # no metrics.csv: left out
    return tmp_path


def test_aggregation_matches_a_hand_computation(runs):
    point_c, point_b, point_a = aggregate(runs)  # sorted: shared first, then by step size
    assert point_a.settings == {"learner": "columnar", "independent": True, "step_size": 0.1}
    assert point_a.curves.shape == (2, 4)
    # Final MSRE of A's seeds: 2, 1, 3, 2 -> mean 2, sample sd sqrt(2/3), se sqrt(2/3)/2.
    assert point_a.final_msre == pytest.approx(2.0)
    assert point_a.final_msre_se == pytest.approx(math.sqrt(2 / 3) / 2)
    # AUC MSRE (mean of each seed's curve): 3, 1.5, 4.5, 2.5 -> mean 2.875,
    # squared deviations 0.015625 + 1.890625 + 2.640625 + 0.140625 = 4.6875, se sqrt(4.6875/3)/2.
    assert point_a.auc_msre == pytest.approx(2.875)
    assert point_a.auc_msre_se == pytest.approx(math.sqrt(4.6875 / 3) / 2)
    # B's seeds: finals 1, 1 (se 0); AUCs 1, 2 -> mean 1.5, se sqrt(0.5)/sqrt(2) = 0.5.
    assert (point_b.final_msre, point_b.final_msre_se) == (1.0, 0.0)
    assert (point_b.auc_msre, point_b.auc_msre_se) == (1.5, 0.5)
    # C: one seed, the shared run's msre column: final 1, AUC 1.5, no standard error.
    assert point_c.curves.shape == (2, 1)
    assert (point_c.final_msre, point_c.auc_msre) == (1.0, 1.5)
    assert math.isnan(point_c.final_msre_se)
    # Best step size among A and B (lower AUC MSRE); C has no other step size to beat.
    assert [point.best for point in (point_a, point_b, point_c)] == [False, True, False]


def test_results_command_writes_csv_and_plot(runs, capsys):
    assert main(["results", str(runs)]) == 0
    rows = list(csv.DictReader((runs / "results.csv").open()))
    assert [(row["step_size"], row["seeds"], row["best"]) for row in rows] == [
        ("0.1", "1", "False"),
        ("0.01", "2", "True"),
        ("0.1", "4", "False"),
    ]
    assert float(rows[2]["auc_msre"]) == pytest.approx(2.875)
    assert rows[2]["runs"] == "a0;a1"
    assert (runs / "learning_curves.png").read_bytes()[1:4] == b"PNG"
    table = capsys.readouterr().out
    assert "2.875 ± 0.62" in table and "best" in table


def test_different_log_steps_in_one_grid_point_are_refused(tmp_path):
    write_run(tmp_path / "a0", step_size=0.1, seed=0, independent=True,
              rows=[(100, [1.0, 1.0])])  # fmt: skip
    write_run(tmp_path / "a1", step_size=0.1, seed=1, independent=True,
              rows=[(150, [1.0, 1.0])])  # fmt: skip
    with pytest.raises(ValueError, match="one grid point but logged different steps"):
        aggregate(tmp_path)
