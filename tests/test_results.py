"""Aggregation: seeds pooled per grid point, numbers checked against a hand computation."""

import csv
import dataclasses
import json
import math
import textwrap

import numpy as np
import pytest

from agentstate.checkpoint import save_checkpoint
from agentstate.cli import main
from agentstate.experiment import CHECKPOINT_NAME, RunConfig, run_identity
from agentstate.results import aggregate
from agentstate.sweep import DONE_NAME


def write_run(folder, *, step_size, seed, independent, rows, msre_zero=1.0):
    """A finished run as written before per-stream predict-zero columns: config.json and
    metrics.csv with ``rows`` = [(step, [msre_b ...])] and one ``msre_zero`` for all."""
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
        lines.append(f"{step},{mean},0,{msre_zero}," + ",".join(str(value) for value in values))
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
    (tmp_path / "unfinished" / "config.json").write_text("{}")  # not a run's config: left out
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
    # Best step size among A and B (lower final ratio: msre_zero is 1, so the final MSRE);
    # C has no other step size to beat.
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


def sweep_config(*, step_size, seed, independent, streams=2):
    return RunConfig(
        env="trace-patterning",
        steps=200,
        streams=streams,
        independent=independent,
        seed=seed,
        step_size=step_size,
        msre_window=100,
        log_every=100,
    )


def write_config(folder, config):
    """config.json as run_experiment writes it (the run table and some of the rest)."""
    folder.mkdir(parents=True)
    document = {"run": dataclasses.asdict(config), "env_id": config.env_id, "gamma": 0.9}
    (folder / "config.json").write_text(json.dumps(document, indent=2))


def write_sweep_run(folder, config, rows):
    """A finished sweep run, as run_experiment and execute_run leave it: config.json,
    metrics.csv (the columns of MetricLog.write_csv) with ``rows`` =
    [(step, [msre_b ...], [msre_zero_b ...])], and done.json."""
    write_config(folder, config)
    streams = config.streams
    with (folder / "metrics.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["step", "msre", "msre_se", "msre_zero", "msre_ratio", "msre_ratio_se"]
            + [f"msre_{b}" for b in range(streams)]
            + [f"msre_zero_{b}" for b in range(streams)]
        )
        for step, learner, zero in rows:
            learner, zero = np.array(learner), np.array(zero)
            ratio = learner / zero
            writer.writerow(
                [
                    step,
                    learner.mean(),
                    learner.std(ddof=1) / math.sqrt(streams),
                    zero.mean(),
                    ratio.mean(),
                    ratio.std(ddof=1) / math.sqrt(streams),
                    *learner,
                    *zero,
                ]
            )
    marker = {
        **run_identity(config),
        "final_msre": rows[-1][1],
        "final_msre_zero": rows[-1][2],
        "steps_per_second": 1000.0,
        "first_step": 0,
    }
    (folder / DONE_NAME).write_text(json.dumps(marker, indent=2))


def start_run(folder, config, checkpoint_step):
    """An unfinished run: config.json, and a checkpoint at ``checkpoint_step`` (None: none yet)."""
    write_config(folder, config)
    if checkpoint_step is not None:
        save_checkpoint(folder / CHECKPOINT_NAME, run_identity(config), checkpoint_step, {})


def test_final_ratio_divides_each_seed_by_its_own_predict_zero(tmp_path):
    # Independent: two runs of two streams -> 4 seeds, final ratios 0.5, 0.5, 0.75, 0.25.
    write_sweep_run(tmp_path / "i0", sweep_config(step_size=0.1, seed=0, independent=True),
                    [(100, [2.0, 2.0], [1.0, 2.0]), (200, [0.5, 1.0], [1.0, 2.0])])  # fmt: skip
    write_sweep_run(tmp_path / "i1", sweep_config(step_size=0.1, seed=1, independent=True),
                    [(100, [2.0, 2.0], [4.0, 1.0]), (200, [3.0, 0.25], [4.0, 1.0])])  # fmt: skip
    # Shared network: each run is one seed, msre / msre_zero: 2 / 4 = 0.5 and 1 / 4 = 0.25.
    write_sweep_run(tmp_path / "s0", sweep_config(step_size=0.1, seed=0, independent=False),
                    [(100, [2.0, 2.0], [4.0, 4.0]), (200, [1.0, 3.0], [2.0, 6.0])])  # fmt: skip
    write_sweep_run(tmp_path / "s1", sweep_config(step_size=0.1, seed=1, independent=False),
                    [(100, [2.0, 2.0], [4.0, 4.0]), (200, [1.0, 1.0], [4.0, 4.0])])  # fmt: skip
    shared, independent = aggregate(tmp_path)
    assert independent.ratio_curves[-1].tolist() == [0.5, 0.5, 0.75, 0.25]
    # Mean 0.5 (the ratio of the means, 4.75 / 8, would be 0.59); squared deviations
    # 0 + 0 + 0.0625 + 0.0625 -> se sqrt(0.125 / 3) / 2.
    assert independent.final_ratio == pytest.approx(0.5)
    assert independent.final_ratio_se == pytest.approx(math.sqrt(0.125 / 3) / 2)
    assert independent.ratio_curves[0].tolist() == [2.0, 1.0, 0.5, 2.0]
    assert shared.seeds == 2
    assert shared.final_ratio == pytest.approx(0.375)
    assert shared.final_ratio_se == pytest.approx(0.125)  # sd sqrt(0.03125) over sqrt(2)
    assert [shared.progress, independent.progress] == ["done", "done"]


def test_metrics_without_per_stream_zero_columns_divide_by_msre_zero(tmp_path):
    write_run(tmp_path / "a0", step_size=0.1, seed=0, independent=True, msre_zero=4.0,
              rows=[(100, [4.0, 2.0]), (200, [2.0, 1.0])])  # fmt: skip
    write_run(tmp_path / "c0", step_size=0.1, seed=0, independent=False, msre_zero=4.0,
              rows=[(100, [4.0, 2.0]), (200, [2.0, 1.0])])  # fmt: skip
    shared, independent = aggregate(tmp_path)
    assert independent.ratio_curves.tolist() == [[1.0, 0.5], [0.5, 0.25]]
    assert independent.final_ratio == pytest.approx(0.375)
    assert shared.ratio_curves.tolist() == [[0.75], [0.375]]


def test_best_step_size_is_the_lowest_final_ratio_not_auc_or_final_msre(tmp_path):
    # The second stream is ten times as loud as the first (predict-zero MSRE 1 and 10).
    # Step size 0.1 halves both streams' error; 0.01 is good on the loud one only.
    zero = [1.0, 10.0]
    write_sweep_run(tmp_path / "p", sweep_config(step_size=0.1, seed=0, independent=True),
                    [(100, [1.0, 9.0], zero), (200, [0.5, 5.0], zero)])  # fmt: skip
    write_sweep_run(tmp_path / "q", sweep_config(step_size=0.01, seed=0, independent=True),
                    [(100, [0.9, 1.0], zero), (200, [0.9, 2.0], zero)])  # fmt: skip
    low_step, high_step = aggregate(tmp_path)
    # AUC MSRE (1.2 < 3.875) and final MSRE (1.45 < 2.75) would both pick 0.01 ...
    assert low_step.auc_msre == pytest.approx(1.2)
    assert high_step.auc_msre == pytest.approx(3.875)
    assert (low_step.final_msre, high_step.final_msre) == (pytest.approx(1.45), 2.75)
    # ... the paired ratio picks 0.1: ratios 0.5, 0.5 against 0.9, 0.2.
    assert (high_step.final_ratio, low_step.final_ratio) == (0.5, pytest.approx(0.55))
    assert (high_step.best, low_step.best) == (True, False)
    assert main(["results", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [(row["step_size"], row["final_ratio"], row["best"]) for row in rows] == [
        ("0.01", "0.55", "False"),
        ("0.1", "0.5", "True"),
    ]
    assert float(rows[0]["final_ratio_se"]) == pytest.approx(0.35)


def test_unfinished_runs_are_listed_with_their_progress(tmp_path, capsys):
    zero = [1.0, 2.0]
    write_sweep_run(tmp_path / "done", sweep_config(step_size=0.1, seed=0, independent=True),
                    [(100, [1.0, 1.0], zero), (200, [0.5, 1.0], zero)])  # fmt: skip
    start_run(tmp_path / "running", sweep_config(step_size=0.01, seed=0, independent=True), 120)
    # Shared network, two seeds: one finished, one at its first checkpoint; a third point
    # has not written a checkpoint yet.
    write_sweep_run(tmp_path / "shared0", sweep_config(step_size=0.1, seed=0, independent=False),
                    [(100, [1.0, 1.0], zero), (200, [1.0, 1.0], zero)])  # fmt: skip
    start_run(tmp_path / "shared1", sweep_config(step_size=0.1, seed=1, independent=False), 40)
    start_run(tmp_path / "fresh", sweep_config(step_size=0.01, seed=0, independent=False), None)
    fresh, shared, running, done = aggregate(tmp_path)
    assert running.settings == {"learner": "columnar", "independent": True, "step_size": 0.01}
    assert running.seeds == 0 and running.steps.shape == (0,)
    assert running.progress == "step 120 of 200"
    figures = ("final_ratio", "final_ratio_se", "final_msre", "final_msre_se", "auc_msre")
    assert all(math.isnan(getattr(running, name)) for name in figures)
    assert not running.best and done.best and done.progress == "done"
    assert shared.seeds == 1 and shared.final_ratio == pytest.approx(1 / 1.5)
    assert shared.progress == "1 of 2 runs done, step 40 of 200"
    assert fresh.progress == "step 0 of 200" and not fresh.best and shared.best

    assert main(["results", str(tmp_path)]) == 0
    rows = {row["runs"]: row for row in csv.DictReader((tmp_path / "results.csv").open())}
    assert rows["running"]["progress"] == "step 120 of 200"
    assert (rows["running"]["seeds"], rows["running"]["final_ratio"]) == ("0", "nan")
    assert rows["shared0;shared1"]["progress"] == "1 of 2 runs done, step 40 of 200"
    assert rows["done"]["final_ratio"] == "0.5"
    output = capsys.readouterr().out
    assert "step 120 of 200" in output and "3 grid point(s) have unfinished runs" in output
    assert (tmp_path / "learning_curves.png").read_bytes()[1:4] == b"PNG"


def test_a_sweep_with_no_finished_run_is_listed_and_plotted(tmp_path):
    start_run(tmp_path / "a", sweep_config(step_size=0.1, seed=0, independent=True), 100)
    start_run(tmp_path / "b", sweep_config(step_size=0.01, seed=0, independent=True), 60)
    assert [point.progress for point in aggregate(tmp_path)] == [
        "step 60 of 200",
        "step 100 of 200",
    ]
    assert main(["results", str(tmp_path)]) == 0
    assert (tmp_path / "learning_curves.png").read_bytes()[1:4] == b"PNG"


def test_a_folder_without_runs_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no run"):
        aggregate(tmp_path)


def test_legend_labels_show_only_settings_that_apply_and_wrap():
    """A grid mixing learners: a setting no point of a learner sets does not apply to it and
    is left out; one that another point of the learner sets reads ``default`` where None.
    Keyword tables' names are dropped, and long labels wrap, so that the legend (under the
    axes) stays readable."""
    from agentstate.results import PointResult, _legend_labels

    def point(learner, best=False, **settings):
        return PointResult(
            settings={"learner": learner, **settings},
            run_dirs=[],
            steps=np.arange(3),
            curves=np.zeros((3, 30)),
            ratio_curves=np.zeros((3, 30)),
            final_ratio=0.5, final_ratio_se=0.0, final_msre=0.01, final_msre_se=0.0,
            auc_msre=0.01, auc_msre_se=0.0, steps_per_run=10, best=best,
        )  # fmt: skip

    kwargs = {"learner_kwargs.n_features": 7, "learner_kwargs.truncation": None}
    columnar = point("columnar", best=True, step_size=0.001, head_step_size=None, **kwargs)
    tbptt = point("tbptt", step_size=1e-4, head_step_size=1e-4, **kwargs)
    tbptt_default_head = point("tbptt", step_size=1e-4, head_step_size=None, **kwargs)
    labels = _legend_labels([columnar, tbptt, tbptt_default_head], width=60)
    assert labels[id(columnar)] == textwrap.fill(
        "★ learner=columnar, step_size=0.001, n_features=7 (30 seeds), best step size",
        width=60, subsequent_indent="    ",
    )  # fmt: skip
    assert "\n" in labels[id(columnar)]
    assert labels[id(tbptt_default_head)].replace("\n    ", " ") == (
        "learner=tbptt, step_size=0.0001, head_step_size=default, n_features=7 (30 seeds)"
    )
    assert all(len(line) <= 60 for label in labels.values() for line in label.splitlines())


def test_a_spike_far_above_predict_zero_does_not_flatten_the_other_curves():
    from agentstate.results import RATIO_AXIS_TOP, PointResult, results_figure

    def point(step_size, ratios):
        ratios = np.asarray(ratios, dtype=float)[:, None].repeat(3, axis=1)
        return PointResult(
            settings={"learner": "columnar", "step_size": step_size},
            run_dirs=[], steps=np.arange(len(ratios)), curves=ratios, ratio_curves=ratios,
            final_ratio=float(ratios[-1, 0]), final_ratio_se=0.0, final_msre=0.0,
            final_msre_se=0.0, auc_msre=0.0, auc_msre_se=0.0, steps_per_run=10,
        )  # fmt: skip

    calm = point(0.001, [1.0, 0.6, 0.3])
    figure = results_figure([calm, point(0.01, [1.0, 22.0, 0.9])], "spike")
    (axes,) = figure.axes
    assert axes.get_ylim() == (0.0, RATIO_AXIS_TOP)
    assert any("axis cut at 2" in text.get_text() for text in axes.texts)
    assert axes.get_legend() is None and len(figure.legends) == 1  # under the axes
    (axes,) = results_figure([calm], "calm").axes
    assert axes.get_ylim()[1] < RATIO_AXIS_TOP and not axes.texts
