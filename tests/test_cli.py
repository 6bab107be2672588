"""The ``agentstate`` command end to end (small budgets)."""

import csv
import json
import subprocess
import sys

import pytest

from agentstate.cli import main


def test_run_writes_metrics_config_and_plot(tmp_path):
    out = tmp_path / "run"
    code = main(
        [
            "run",
            "trace-patterning",
            "--steps",
            "3000",
            "--streams",
            "3",
            "--independent",
            "--log-every",
            "500",
            "--msre-window",
            "1000",
            "--out",
            str(out),
            "--no-progress",
            "--learner-kwarg",
            "n_features=5",
        ]
    )
    assert code == 0
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(row["step"]) for row in rows] == list(range(500, 3001, 500))
    assert {"msre", "msre_se", "msre_zero", "msre_0", "msre_2"} <= set(rows[0])
    assert all(float(row["msre"]) >= 0 for row in rows)
    config = json.loads((out / "config.json").read_text())
    assert config["run"]["streams"] == 3 and config["learner_config"]["n_features"] == 5
    assert config["gamma"] == 0.9
    assert (out / "learning_curve.png").read_bytes()[1:4] == b"PNG"


def test_run_on_any_gymnasium_env_scores_episodes(tmp_path):
    out = tmp_path / "cartpole"
    assert (
        main(
            [
                "run",
                "CartPole-v1",
                "--steps",
                "600",
                "--streams",
                "2",
                "--log-every",
                "200",
                "--msre-window",
                "500",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) == 3 and float(rows[-1]["msre_zero"]) > 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "trace-patterning", "--learner", "nope"], "unknown learner 'nope'; known"),
        (["run", "Nope-v0"], "unknown environment 'Nope-v0'"),
        (["run", "trace-patterning", "--learner-kwarg", "n_colums=3"], "n_colums"),
        (["run", "trace-patterning", "--steps", "0"], "steps must be a positive integer"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message(tmp_path, capsys, argv, message):
    assert main([*argv, "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.expensive
def test_learners_lists_name_source_and_exactness():
    listing = subprocess.run(
        [sys.executable, "-m", "agentstate.cli", "learners"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    row = next(line for line in listing.splitlines() if line.startswith("columnar"))
    assert row.split()[:3] == ["columnar", "agentstate", "yes"]


def test_run_accepts_gymnasiums_module_colon_id_form(tmp_path):
    out = tmp_path / "run"
    env_id = "gymnasium.envs.classic_control:CartPole-v1"
    argv = ["run", env_id, "--steps", "300", "--streams", "2", "--msre-window", "100"]
    assert main([*argv, "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "config.json").read_text())["env_id"] == env_id


def test_run_names_a_module_that_cannot_be_imported(tmp_path, capsys):
    argv = ["run", "no_such_module:Thing-v0", "--steps", "10", "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    assert "cannot import 'no_such_module'" in capsys.readouterr().err
