"""benchmarks/memory: tasks, spec expansion, one run's protocol, the sweep end to end, results."""

import csv
import dataclasses
import doctest
import json
import queue
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("popgym")
pytest.importorskip("stable_baselines3")

HARNESS = Path(__file__).parents[1] / "benchmarks" / "memory"
sys.path.insert(0, str(HARNESS))  # the harness modules import each other by name

import memory_harness as harness  # noqa: E402
import memory_results as results  # noqa: E402
import memory_tasks as tasks  # noqa: E402
import state_saturation  # noqa: E402
import suite_table  # noqa: E402
from gymnasium import spaces  # noqa: E402
from popgym.envs import ALL_EASY  # noqa: E402
from stable_baselines3 import PPO  # noqa: E402

from agentstate.run_claim import RunClaimedElsewhere, claim_run  # noqa: E402

# Rollouts of 32 x 8 = 256 steps, so that a tiny budget still trains.
TINY_SPEC = """
[sweep]
seeds = 1

[run]
steps = 512
eval_every = 256
curve_episodes = 8
eval_episodes = 8

[methods.ppo]
base = "ppo"
algorithm_kwargs = { n_steps = 32, batch_size = 64, n_epochs = 1 }

[methods.ppo_agentstate]
base = "ppo_agentstate"
algorithm_kwargs = { n_steps = 32, batch_size = 64, n_epochs = 1 }

[grid]
task = ["RepeatPreviousEasy", "CueMemory"]
method = ["ppo", "ppo_agentstate"]
"""
TINY_POINTS = [
    (task, method)
    for task in ("RepeatPreviousEasy", "CueMemory")
    for method in ("ppo", "ppo_agentstate")
]
TINY_RUNS = [f"task={task},method={method},seed=0" for task, method in TINY_POINTS]


def write_spec(tmp_path, text):
    path = tmp_path / "spec.toml"
    path.write_text(text)
    return path


def tiny_run(tmp_path, method="ppo_agentstate", task="CueMemory", **settings):
    spec = harness.load_spec(write_spec(tmp_path, TINY_SPEC))
    (run,) = [
        run for run in harness.expand_spec(spec).runs if run.task == task and run.variant == method
    ]
    return dataclasses.replace(run, settings=dataclasses.replace(run.settings, **settings))


def read_rows(path):
    with path.open() as handle:
        return list(csv.DictReader(handle))


# ---------------------------------------------------------------------- tasks
@pytest.mark.parametrize("task", [cls.__name__ for cls in ALL_EASY] + [tasks.CUE_TASK])
def test_every_task_gives_flat_float_observations_in_its_space(task):
    env = tasks.make_task(task)
    assert env.observation_space.dtype == np.float32 and len(env.observation_space.shape) == 1
    observation, _ = env.reset(seed=0)
    for _ in range(20):
        assert observation.dtype == np.float32 and observation in env.observation_space
        observation, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            observation, _ = env.reset()


def test_flat_observations_one_hot_discrete_and_tuple_parts():
    env = tasks.make_task("AutoencodeEasy")  # Tuple(Discrete(2), Discrete(4))
    observation, _ = env.reset(seed=0)
    assert env.observation_space.shape == (6,)
    assert observation[:2].sum() == 1 and observation[2:].sum() == 1


def test_joint_discrete_action_covers_every_multidiscrete_action_once():
    env = tasks.JointDiscreteAction(tasks.make_task("BattleshipEasy"))
    assert env.action_space == spaces.Discrete(64)
    actions = {tuple(env.action(k)) for k in range(64)}
    assert actions == {(row, column) for row in range(8) for column in range(8)}


def test_the_suite_skips_dqn_only_on_box_actions():
    spec = harness.load_spec(HARNESS / "suite.toml")
    expansion = harness.expand_spec(spec)
    assert len(expansion.runs) == (15 * 6 - 2 * 2) * 3
    assert len(expansion.not_applicable) == 4
    assert all("Pendulum" in line and "DQN" in line for line in expansion.not_applicable)
    assert {run.task for run in expansion.runs} == {*tasks.popgym_easy_tasks(), "CueMemory"}


def test_reconstruction_cumulants_hold_the_inputs_of_earlier_steps():
    env = tasks.LaggedObservations(tasks.make_task("CueMemory"), lags=[1, 3])
    cumulants = tasks.ReconstructionCumulants("reward", 5, (1, 3))
    observations = [env.reset(seed=0)[0]]
    for _ in range(4):
        observation, reward, _, _, info = env.step(0)
        observations.append(observation)
        values = cumulants(observation, reward, info)
        assert values.shape == (1 + 2 * 5,) and values[0] == reward
        back = [
            observations[-1 - lag] if lag < len(observations) else np.zeros(5) for lag in (1, 3)
        ]
        np.testing.assert_array_equal(values[1:], np.concatenate(back))


def test_the_wrapper_gets_reconstruction_heads(tmp_path):
    run = tiny_run(tmp_path)
    method = harness.Method(
        "PPO",
        agent_state={
            "cumulants": "reward+observation",
            "reconstruct_lags": [2, 4],
            "reconstruct_past": 0,
        },
    )
    venv = harness.make_venv(dataclasses.replace(run, method=method), 2, 0)
    assert len(venv.cumulant_names) == 1 + 5 + 2 * 5
    venv.reset()
    venv.step(np.zeros(2, dtype=int))


def test_reconstruction_heads_can_be_supervised_while_the_others_keep_gamma(tmp_path):
    run = tiny_run(tmp_path)
    agent_state = {
        "cumulants": "reward+observation",
        "gamma": 0.8,
        "reconstruct_lags": [2, 4],
        "reconstruct_gamma": 0.0,
    }
    method = harness.Method("PPO", agent_state=agent_state)
    venv = harness.make_venv(dataclasses.replace(run, method=method), 2, 0)
    assert venv.core.settings.gamma == (0.8,) * (1 + 5) + (0.0,) * (2 * 5)
    venv.reset()
    venv.step(np.zeros(2, dtype=int))
    resolved = harness.resolved_agent_state(agent_state)
    assert resolved["reconstruct_gamma"] == 0.0
    assert "reconstruct_gamma" not in harness.resolved_agent_state({"reconstruct_lags": [2]})
    with pytest.raises(ValueError, match="reconstruct_gamma must be a number in"):
        harness._check_agent_state({"reconstruct_gamma": 0.0})


def test_the_saturation_probe_tells_a_pinned_state_from_a_live_one():
    columnar = state_saturation.SETTINGS["columnar 7 (the first defaults)"]
    pinned = state_saturation.saturation("RepeatPreviousEasy", 8000, 500, seed=0, **columnar)
    live = state_saturation.saturation(
        "RepeatPreviousEasy", 8000, 500, seed=0, **{**columnar, "center_cumulants": True}
    )
    assert pinned[0] > 0.99 and pinned[1] < 0.01  # every feature at +-1, for good
    assert live[0] < 0.5 and live[1] > 5 * pinned[1]  # off the bounds, and varying


def test_the_readmes_suite_table_is_the_committed_results():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert suite_table.suite_table() in readme


def test_doctests_of_the_task_module():
    assert doctest.testmod(tasks).failed == 0


# ---------------------------------------------------------------------- specs
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[grid]\ntask=['CueMemory']\nmethod=['nope']", "unknown method"),
        ("[grid]\ntask=['Nope']\nmethod=['ppo']", "unknown task"),
        ("[grid]\ntask=['CueMemory']\nmethod=['ppo']\n[grid.agent_state]\ngamma=[0.5]", "no agent"),
        ("[methods.x]\nbase='ppo_agentstate'\nagent_state={learner='nope'}", "nope"),
        ("[methods.x]\nbase='ppo_agentstate'\nagent_state={cumulants='both'}", "cumulants"),
        ("[methods.x]\nbase='ppo'\nframe_stack=-1", "frame_stack"),
        ("[run]\nstep=5", "unknown \\[run\\] options"),
        ("[sweeps]\nseeds=1", "unknown tables"),
    ],
)
def test_bad_specs_fail_before_anything_runs(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        harness.expand_spec(harness.load_spec(write_spec(tmp_path, text)))


def test_agent_state_axes_make_variants_and_folder_names(tmp_path):
    text = TINY_SPEC.replace('method = ["ppo", "ppo_agentstate"]', 'method = ["ppo_agentstate"]')
    text += "\n[grid.agent_state]\nstep_size = [0.003, 0.03]\ncumulants = ['observation']\n"
    runs = harness.expand_spec(harness.load_spec(write_spec(tmp_path, text))).runs
    assert [run.name for run in runs][:2] == [
        "task=RepeatPreviousEasy,method=ppo_agentstate,step_size=0.003,cumulants=observation,seed=0",
        "task=RepeatPreviousEasy,method=ppo_agentstate,step_size=0.03,cumulants=observation,seed=0",
    ]
    assert runs[0].method.agent_state == {"step_size": 0.003, "cumulants": "observation"}
    assert runs[0].method.algorithm_kwargs == {"n_steps": 32, "batch_size": 64, "n_epochs": 1}


@pytest.mark.parametrize("spec", sorted(path.name for path in HARNESS.glob("*.toml")))
def test_every_committed_spec_expands_to_runs(spec):
    assert harness.expand_spec(harness.load_spec(HARNESS / spec)).runs


def test_the_wrapper_search_spec_expands():
    expansion = harness.expand_spec(harness.load_spec(HARNESS / "wrapper_search.toml"))
    variants = {run.variant for run in expansion.runs}
    tasks_of = defaultdict(set)
    for run in expansion.runs:
        tasks_of[run.variant].add(run.task)
    round_four = {"as_both_centred_observe3", "as_both_elstm_observe3", "as_both_observe3"}
    round_four.add("as_both_centred_elstm_observe3")  # the defaults when it ran
    assert {variant for variant, tasks in tasks_of.items() if len(tasks) == 15} == round_four
    assert all(len(tasks) == 5 for variant, tasks in tasks_of.items() if variant not in round_four)
    assert len(expansion.runs) == 3 * (5 * len(variants) + 10 * len(round_four))
    assert {"as_reconstruct", "as_both,step_size=0.003", "as_both_elstm"} <= variants


def test_the_wrapper_search_spec_means_the_same_runs_whatever_the_defaults(monkeypatch):
    """Its runs are committed: a change of the wrapper's defaults must not change them."""
    runs = harness.expand_spec(harness.load_spec(HARNESS / "wrapper_search.toml")).runs
    searched = [run for run in runs if run.method.agent_state is not None]
    now = {run.variant: harness.resolved_agent_state(run.method.agent_state) for run in searched}
    other_defaults = {
        "cumulants": "observation",
        "gamma": 0.5,
        "lambda_": 0.5,
        "center_cumulants": False,
        "reconstruct_past": 2,
        "observe_past": 2,
        "step_size": 0.1,
        "include_prev_action": False,
        "include_prev_reward": False,
        "n_features": 5,
    }
    settings_from_options = harness.settings_from_options

    def with_other_defaults(learner, options):
        return settings_from_options(learner, {**other_defaults, **options})

    monkeypatch.setattr(harness, "settings_from_options", with_other_defaults)
    monkeypatch.setattr(harness.AgentStateSettings, "learner", "rtu")
    for run in searched:
        assert harness.resolved_agent_state(run.method.agent_state) == now[run.variant], run.variant


def test_the_wrapper_defaults_are_the_best_setting_of_the_committed_search():
    """AgentStateVecEnv() with no options = the setting with the best mean over the whole
    suite, among those the search's last round ran on every task: leaders of the earlier
    rounds, which ran five tasks."""
    table = read_rows(
        Path(__file__).parents[1] / "benchmarks/results/memory_wrapper_search/results.csv"
    )
    by_variant = {}
    for row in table:
        by_variant.setdefault(row["variant"], {})[row["task"]] = float(row["eval_return_mean"])
    five_tasks = set.intersection(*(set(returns) for returns in by_variant.values()))
    assert len(five_tasks) == 5
    searched = {name: returns for name, returns in by_variant.items() if name != "ppo"}
    ranked = sorted(searched, key=lambda name: -np.mean([searched[name][t] for t in five_tasks]))
    whole_suite = {name: returns for name, returns in searched.items() if len(returns) == 15}
    assert len(whole_suite) == 4 and set(whole_suite) <= set(ranked[:6])
    best = max(whole_suite, key=lambda name: np.mean(list(whole_suite[name].values())))
    spec = harness.load_spec(HARNESS / "wrapper_search.toml")
    (run,) = [
        run
        for run in harness.expand_spec(spec).runs
        if run.variant == best and run.task == "CueMemory" and run.seed == 0
    ]
    defaults = harness.resolved_agent_state({})
    assert harness.resolved_agent_state(run.method.agent_state) == defaults, best


def test_the_actor_critic_defaults_are_the_best_setting_of_the_committed_search():
    """RTRLActorCritic(env)'s core and `agentstate train`'s env count = the searched variant
    with the best mean over the suite."""
    from agentstate.rl.actor_critic import DEFAULT_LEARNER, DEFAULT_LEARNER_KWARGS
    from agentstate.rl.training import TrainConfig

    table = read_rows(
        Path(__file__).parents[1] / "benchmarks/results/memory_actor_critic/search/results.csv"
    )
    by_variant = {}
    for row in table:
        by_variant.setdefault(row["variant"], {})[row["task"]] = float(row["eval_return_mean"])
    assert all(len(returns) == 15 for returns in by_variant.values())
    best = max(by_variant, key=lambda name: np.mean(list(by_variant[name].values())))
    spec = harness.load_spec(HARNESS / "actor_critic_search.toml")
    (run,) = [
        run
        for run in harness.expand_spec(spec).runs
        if run.variant == best and run.task == "CueMemory" and run.seed == 0
    ]
    kwargs = run.method.algorithm_kwargs
    assert (kwargs["learner"], kwargs["learner_kwargs"]) == (
        DEFAULT_LEARNER, dict(DEFAULT_LEARNER_KWARGS)
    ), best  # fmt: skip
    assert run.method.n_envs == TrainConfig(env="CartPole-v1").envs


# ---------------------------------------------------------------------- one run
def test_a_run_keeps_the_budget_trains_whole_rollouts_and_writes_its_folder(tmp_path):
    run = tiny_run(tmp_path, steps=400)  # rollouts of 256: one trained, one cut at 400
    out = tmp_path / run.name
    out.mkdir()  # as a killed run leaves it: restarted from step 0
    (out / "metrics.csv").write_text("step\n999999\n")
    assert not harness.is_finished(run, tmp_path)
    marker = harness.execute_bench_run(run, str(tmp_path), queue.Queue())
    assert marker["env_steps"] == 400 and json.loads((out / "done.json").read_text()) == marker
    config = json.loads((out / "config.json").read_text())
    assert config["method"]["agent_state"] == {} and config["versions"]["popgym"] != "absent"
    rows = read_rows(out / "metrics.csv")
    assert [int(row["step"]) for row in rows] == [0, 256, 400]
    assert [int(row["eval_episodes"]) for row in rows] == [8, 8, 8]
    assert all(-1 <= float(row["eval_return"]) <= 1 for row in rows)
    assert float(rows[-1]["train_seconds"]) == pytest.approx(marker["train_seconds"], abs=1e-3)
    episodes = read_rows(out / "episodes.csv")
    assert len(episodes) == sum(int(row["train_episodes"]) for row in rows) > 0
    assert {float(row["return"]) for row in episodes} <= {-1.0, 1.0}


def test_a_run_another_live_sweep_holds_is_left_alone(tmp_path):
    run = tiny_run(tmp_path)
    out = tmp_path / run.name
    with claim_run(out, "another-sweep"):  # this process stands in for the other sweep
        with pytest.raises(RunClaimedElsewhere, match="another-sweep"):
            harness.execute_bench_run(run, str(tmp_path), queue.Queue(), "this-sweep")
        assert sorted(path.name for path in out.iterdir()) == ["running.json"]


def test_on_policy_runs_stop_inside_the_rollout_that_would_pass_the_budget(tmp_path):
    model = PPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=64, n_epochs=1, seed=0)
    run = tiny_run(tmp_path, steps=160, eval_every=0)
    callback = harness.BudgetAndCurve(run.settings, _NoRecord(), lambda step: None)
    model.learn(total_timesteps=run.settings.steps, callback=callback)
    assert model.num_timesteps == 160 and model._n_updates == 2  # 2 whole rollouts of 64
    model = PPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=64, n_epochs=1, seed=0)
    settings = harness.RunSettings(steps=128, eval_every=0)
    model.learn(128, callback=harness.BudgetAndCurve(settings, _NoRecord(), lambda step: None))
    assert model.num_timesteps == 128 and model._n_updates == 2  # the last one ends on budget


class _NoRecord:
    def episode(self, *args):
        pass


def test_evaluation_sees_the_trained_learner_frozen_and_leaves_training_alone(tmp_path):
    run = tiny_run(tmp_path)
    venv = harness.make_venv(run, 8, 0)
    model = PPO("MlpPolicy", venv, n_steps=32, batch_size=64, n_epochs=1, seed=0)
    model.learn(256)
    trained = venv.state_dict()
    evaluate = harness._Evaluator(run, venv)
    mean, _, episodes = evaluate(model, 8)
    assert episodes == 8 and -1 <= mean <= 1 and not evaluate.venv.learning
    assert venv.learning
    evaluated = evaluate.venv.state_dict()["engine"]["learner"]["params"]
    for name, value in trained["engine"]["learner"]["params"].items():
        assert np.array_equal(np.asarray(value), np.asarray(evaluated[name]))
    after = venv.state_dict()["engine"]["learner"]["params"]
    assert all(np.array_equal(trained["engine"]["learner"]["params"][k], after[k]) for k in after)


# ---------------------------------------------------------------------- the sweep
@pytest.mark.expensive
def test_the_harness_runs_as_a_sweep_aggregates_and_skips_finished_runs(tmp_path):
    spec, out = write_spec(tmp_path, TINY_SPEC), tmp_path / "out"
    report = harness.run_bench(spec, out, workers=2, progress=False, log=lambda line: None)
    assert report.failed == {} and report.skipped == []
    assert sorted((run["task"], run["variant"]) for run in report.finished) == sorted(TINY_POINTS)
    for name in TINY_RUNS:
        assert {"config.json", "metrics.csv", "episodes.csv", "done.json"} <= {
            path.name for path in (out / name).iterdir()
        }
    (out / "task=CueMemory,method=ppo,seed=1").mkdir()  # started, never finished
    (out / "task=CueMemory,method=ppo,seed=1" / "config.json").write_text("{}")
    summary = results.aggregate(out)
    assert summary["unfinished"] == ["task=CueMemory,method=ppo,seed=1"]
    assert [(row["task"], row["variant"]) for row in summary["rows"]] == TINY_POINTS
    assert all(row["seeds"] == 1 and row["env_steps"] == 512 for row in summary["rows"])
    assert len(read_rows(out / "results.csv")) == 4
    markdown = (out / "results.md").read_text()
    assert "| task | ppo | ppo_agentstate |" in markdown and "| CueMemory |" in markdown
    assert "- task=CueMemory,method=ppo,seed=1" in markdown
    assert (out / "curves.png").stat().st_size > 0

    done_times = {name: (out / name / "done.json").stat().st_mtime_ns for name in TINY_RUNS}
    again = harness.run_bench(spec, out, workers=2, progress=False, log=lambda line: None)
    assert again.finished == [] and sorted(again.skipped) == sorted(TINY_RUNS)
    assert done_times == {name: (out / name / "done.json").stat().st_mtime_ns for name in TINY_RUNS}


def test_the_results_table_means_over_shared_tasks_and_over_all_tasks_where_run():
    """A search's later round runs some variants on more tasks: one mean over the tasks
    every variant ran, another over all of them for the variants that ran them all."""
    returns = {("a", "wide"): 0.5, ("b", "wide"): 0.1, ("c", "wide"): -0.3, ("a", "narrow"): 0.9}
    rows = [
        {"task": task, "variant": variant, "seeds": 3, "eval_return_mean": value}
        | {"eval_return_se": 0.01, "train_seconds_mean": 30.0, "train_seconds_se": 1.0}
        for (task, variant), value in returns.items()
    ]
    markdown = results._markdown(rows, ["a", "b", "c"], ["narrow", "wide"], {}, [])
    assert "| **mean over 1 tasks** | **0.900** | **0.500** |" in markdown
    assert "| **mean over 3 tasks** | – | **0.100** |" in markdown
    assert "| c | – | -0.30 ± 0.01 |" in markdown


def test_later_runs_replace_their_cells_of_the_committed_results_and_leave_the_rest(tmp_path):
    """A suite that spans sessions: the cells a later sweep aggregates replace the same cells
    of the committed results.csv, byte for byte the rest stays, and results.md follows."""

    def row(task, variant, value, seeds=3):
        return {"task": task, "variant": variant, "seeds": seeds, "eval_return_mean": value} | {
            "eval_return_se": 0.01,
            "train_seconds_mean": 30.5,
            "train_seconds_se": 1.25,
            "env_steps": 100000,
            "steps_per_second_mean": 3278.6885245901637,
        }

    committed = [
        row("RepeatPreviousEasy", "ppo", -0.48),
        row("RepeatPreviousEasy", "recurrent_ppo", 0.1, seeds=1),
        row("CueMemory", "ppo", 0.05),
    ]
    with (tmp_path / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, results.RESULT_COLUMNS)
        writer.writeheader()
        writer.writerows(committed)
    before = (tmp_path / "results.csv").read_text().splitlines()
    later = [
        row("RepeatPreviousEasy", "recurrent_ppo", 0.98),
        row("CueMemory", "recurrent_ppo", 0.6),
    ]

    results.merge_into(tmp_path, later)

    after = (tmp_path / "results.csv").read_text().splitlines()
    assert [line.split(",")[:4] for line in after[1:]] == [
        ["RepeatPreviousEasy", "ppo", "3", "-0.48"],
        ["RepeatPreviousEasy", "recurrent_ppo", "3", "0.98"],
        ["CueMemory", "ppo", "3", "0.05"],
        ["CueMemory", "recurrent_ppo", "3", "0.6"],
    ]
    assert after[0] == before[0] and after[1] == before[1] and after[3] == before[3]
    markdown = (tmp_path / "results.md").read_text()
    assert "| RepeatPreviousEasy | -0.48 ± 0.01 | 0.98 ± 0.01 |" in markdown
    with pytest.raises(FileNotFoundError, match="merge into a folder of results"):
        results.merge_into(tmp_path / "nowhere", later)
    with pytest.raises(ValueError, match="1 seeds would replace the 3"):
        results.merge_into(tmp_path, [row("CueMemory", "ppo", 0.9, seeds=1)])
    assert (tmp_path / "results.csv").read_text().splitlines() == after


def test_a_run_that_fails_is_recorded_with_its_error_and_listed_apart(tmp_path):
    spec = write_spec(tmp_path, """
[run]
steps = 64
eval_every = 0
eval_episodes = 2
eval_envs = 1

[methods.broken]
base = "ppo"
algorithm_kwargs = { no_such_option = 1 }

[grid]
task = ["CueMemory"]
method = ["broken"]
""")  # fmt: skip
    out = tmp_path / "out"
    report = harness.run_bench(spec, out, workers=1, progress=False, log=lambda line: None)
    name = "task=CueMemory,method=broken,seed=0"
    assert list(report.failed) == [name] and "no_such_option" in report.failed[name]
    recorded = json.loads((out / name / harness.FAILED_NAME).read_text())
    assert recorded["error"] == report.failed[name]
    summary = results.aggregate(out)
    assert summary["failed"] == {name: report.failed[name]} and summary["unfinished"] == []
    assert f"- {name}: TypeError" in (out / "results.md").read_text()


def test_a_folder_with_another_finished_config_is_refused(tmp_path):
    run = tiny_run(tmp_path)
    folder = tmp_path / run.name
    folder.mkdir()
    identity = run.identity()
    identity["settings"]["steps"] = 999
    (folder / "done.json").write_text(json.dumps(identity))
    with pytest.raises(ValueError, match="settings.steps is 999 there, 512 here"):
        harness.is_finished(run, tmp_path)
    (folder / "done.json").write_text(json.dumps(run.identity()))
    assert harness.is_finished(run, tmp_path)


def test_a_run_finished_under_other_wrapper_defaults_is_another_run(tmp_path):
    run = tiny_run(tmp_path)  # agent_state = {}: the wrapper's defaults
    folder = tmp_path / run.name
    folder.mkdir()
    (folder / "done.json").write_text(json.dumps(run.identity()))
    assert harness.is_finished(run, tmp_path)
    # The folder's run read agent_state = {} too, but under a default gamma of 0.5.
    identity = run.identity()
    identity["agent_state_settings"] = harness.resolved_agent_state({"gamma": 0.5})
    (folder / "done.json").write_text(json.dumps(identity))
    with pytest.raises(ValueError, match="agent_state_settings.td_config.gamma is 0.5 there"):
        harness.is_finished(run, tmp_path)


def test_a_run_whose_options_spell_out_a_default_is_the_same_run(tmp_path):
    run = tiny_run(tmp_path)  # agent_state = {}
    folder = tmp_path / run.name
    folder.mkdir()
    default_gamma = harness.AgentStateSettings.gamma
    spelled = dataclasses.replace(run.method, agent_state={"gamma": default_gamma})
    identity = dataclasses.replace(run, method=spelled).identity()
    assert identity["method"] != run.identity()["method"]
    (folder / "done.json").write_text(json.dumps(identity))
    assert harness.is_finished(run, tmp_path)


def test_a_methods_agent_state_is_merged_into_its_bases(tmp_path):
    text = (
        TINY_SPEC
        + """
[methods.base_32]
base = "ppo_agentstate"
agent_state = { n_features = 32, td_options = { optimizer = "rmsprop_td" } }

[methods.base_32_both]
base = "base_32"
agent_state = { cumulants = "reward+observation", td_options = { head_step_size = 0.001 } }
"""
    )
    methods = harness.load_spec(write_spec(tmp_path, text)).methods
    assert methods["base_32_both"].agent_state == {
        "n_features": 32,
        "td_options": {"optimizer": "rmsprop_td", "head_step_size": 0.001},
        "cumulants": "reward+observation",
    }
    assert methods["base_32"].agent_state == {
        "n_features": 32,
        "td_options": {"optimizer": "rmsprop_td"},
    }


# ---------------------------------------------------------------------- results
def test_time_estimates_count_rollout_cycles_and_the_partial_rollout(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    method = {"algorithm": "PPO", "n_envs": 8, "algorithm_kwargs": {}}
    marker = {"method": method, "env_steps": 2 * 16384, "train_seconds": 50.0}
    (folder / "done.json").write_text(json.dumps(marker))
    (folder / "metrics.csv").write_text("step,train_seconds\n0,0\n8192,4.0\n32768,50.0\n")
    seconds, how = results.estimate_seconds(folder, 100_000)
    assert seconds == pytest.approx(6 * 25.0 + (100_000 - 6 * 16384) * 4.0 / 8192)
    assert how == "cycles + collection"
    marker["method"] = {"algorithm": "DQN", "n_envs": 1, "algorithm_kwargs": {}}
    (folder / "done.json").write_text(json.dumps(marker))
    assert results.estimate_seconds(folder, 100_000)[0] == pytest.approx(50.0 * 100_000 / 32768)
