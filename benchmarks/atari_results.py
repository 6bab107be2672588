"""Atari Prediction Benchmark: columnar 6:6, CCN 15:5 and T-BPTT (15 units, k = 4) on three games.

Each learner is one ``agentstate predict-atari`` process with one stream per game (Pong,
Breakout, SpaceInvaders); the three processes run in parallel. Afterwards, one at a time, the
replay speed of each game and the TD-step cost of each learner are measured alone.

Writes into ``--out`` (default ``benchmarks/results/atari``): one folder per learner
(``metrics.csv``, ``config.json``, ``summary.json``, ``learning_curve_<Game>.png``),
``results.json`` and ``README.md`` (the tables and the command that reproduces them).

Run: ``python benchmarks/atari_results.py --policies DIR [--steps 250000] [--lr 0.003]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import ale_py
import torch

import agentstate
from agentstate.envs.atari_prediction import AtariPrediction
from agentstate.td import TDConfig, TDPredictor

GAMES = ["Pong", "Breakout", "SpaceInvaders"]
BREAKOUT_NOTE = (
    "Breakout: the expert gets stuck twice. Its episodes 4 and 5 (frames 21,418-129,418 and "
    "129,419-237,419) run into the 108,000-frame limit with no reward after frames 24,881 and "
    "138,350, and an episode is scored only once it ends. For runs of 130k-237k frames the "
    "window therefore holds only zero returns: predict zero is exactly 0 there and the row "
    "measures how well a learner has learned to predict 0, not the expert's scoring."
)


def learners(steps: int) -> dict[str, tuple[str, dict[str, int]]]:
    """Label -> (registered name, keyword arguments); CCN's 3 stages split the run evenly."""
    return {
        "columnar 6:6": ("columnar", {"n_features": 6}),
        "CCN 15:5": (
            "ccn",
            {"n_features": 15, "columns_per_stage": 5, "steps_per_stage": -(-steps // 3)},
        ),
        "T-BPTT 15, k=4": ("tbptt", {"n_features": 15, "truncation": 4}),
    }


def folder_name(label: str) -> str:
    return label.split()[0].lower().replace("-", "")


def predict_atari_argv(args: argparse.Namespace, name: str, kwargs: dict[str, int], out: Path):
    argv = [sys.executable, "-m", "agentstate.cli", "predict-atari", "--game", *GAMES]
    argv += ["--policies", str(args.policies), "--learner", name, "--steps", str(args.steps)]
    argv += ["--lr", str(args.lr), "--msre-window", str(args.msre_window)]
    argv += ["--log-every", str(args.log_every), "--out", str(out), "--no-progress"]
    for key, value in kwargs.items():
        argv += ["--learner-kwarg", f"{key}={value}"]
    return argv


def replay_frames_per_second(game: str, policies: Path, frames: int) -> float:
    env = AtariPrediction(game, policies_dir=policies)
    env.reset()
    started = time.perf_counter()
    for _ in range(frames):
        _, _, terminated, truncated, _ = env.step(0)
        if terminated or truncated:
            env.reset()
    return frames / (time.perf_counter() - started)


def td_step_us(name: str, kwargs: dict[str, int], streams: int, steps: int) -> float:
    learner = agentstate.make_learner(
        name, 275, streams=streams, independent_params=True, seed=0, **kwargs
    )
    engine = TDPredictor(learner, 1, TDConfig(gamma=0.98, step_size=1e-4))
    observations = torch.rand(steps + 100, streams, 275)
    cumulant = torch.zeros(streams, 1)
    for x in observations[:100]:
        engine.step(x, cumulant)
    started = time.perf_counter()
    for x in observations[100:]:
        engine.step(x, cumulant)
    return (time.perf_counter() - started) / steps * 1e6


def markdown(results: dict, command: str) -> str:
    labels = list(results["runs"])
    lines = [
        "# Atari Prediction Benchmark: results",
        "",
        f"MSRE (sliding mean over the last {results['msre_window']:,} scored frames of each "
        f"game) after {results['steps']:,} frames per game, one stream per game, "
        f"γ = 0.98, λ = 0.99, α = {results['lr']} (RMSProp-TD), 16 × 16 input (275 values). "
        "Predict zero and the running mean reward / (1 − γ) are the reference predictors "
        "(the same for every learner: the replays are identical).",
        "",
        "| game | predict zero | running mean reward | " + " | ".join(labels) + " |",
        "|---|---|---|" + "---|" * len(labels),
    ]
    for index, game in enumerate(GAMES):
        first = results["runs"][labels[0]]["final_msre"]
        cells = [f"{first['msre_zero'][index]:.4f}", f"{first['msre_mean_reward'][index]:.4f}"]
        cells += [f"{results['runs'][label]['final_msre']['msre'][index]:.4f}" for label in labels]
        lines.append(f"| {game} | " + " | ".join(cells) + " |")
    speeds = results["speed"]
    lines += [
        "",
        BREAKOUT_NOTE,
        "",
        "## Speed (measured alone, one at a time, torch 1 thread)",
        "",
        "| | µs per TD step, 3 streams | µs per stream-step |",
        "|---|---|---|",
    ]
    for label in labels:
        microseconds = speeds["td_step_us"][label]
        lines.append(f"| {label} | {microseconds:.0f} | {microseconds / 3:.0f} |")
    lines += ["", "| game | replay frames/s (emulation + 16 × 16 observation) |", "|---|---|"]
    lines += [f"| {game} | {speeds['replay_fps'][game]:,.0f} |" for game in GAMES]
    lines += [
        "",
        f"Wall-clock of the three parallel runs: {results['wall_clock_s'] / 60:.1f} min; "
        f"in-run speeds (sharing the cores) are in each folder's `summary.json`. Machine: "
        f"{results['machine']}; ale-py {results['ale_py']}, torch {results['torch']}, "
        f"{results['date']}.",
        "",
        "Reproduce (expert files from the authors' repositories, see the main README):",
        "",
        "```bash",
        command,
        "```",
        "",
        "Each learner's run: `agentstate predict-atari --game Pong Breakout SpaceInvaders "
        "--policies DIR --learner NAME --learner-kwarg ... --steps N --lr α` "
        "(exact arguments in `<learner>/config.json`).",
        "",
    ]
    return "\n".join(lines)


def reproduce_command(args: argparse.Namespace) -> str:
    return (
        f"python benchmarks/atari_results.py --policies DIR --steps {args.steps} "
        f"--lr {args.lr} --msre-window {args.msre_window} --log-every {args.log_every}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=250_000, help="frames per game")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--msre-window", type=int, default=100_000)
    parser.add_argument("--log-every", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/atari"))
    args = parser.parse_args()

    specs = learners(args.steps)
    started = time.perf_counter()
    processes = {
        label: subprocess.Popen(
            predict_atari_argv(args, name, kwargs, args.out / folder_name(label)),
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        for label, (name, kwargs) in specs.items()
    }
    for label, process in processes.items():
        if process.wait() != 0:
            raise SystemExit(f"{label} failed with exit code {process.returncode}")
    wall_clock = time.perf_counter() - started

    torch.set_num_threads(1)
    results = {
        "steps": args.steps,
        "lr": args.lr,
        "msre_window": args.msre_window,
        "wall_clock_s": wall_clock,
        "runs": {
            label: json.loads((args.out / folder_name(label) / "summary.json").read_text())
            for label in specs
        },
        "speed": {
            "replay_fps": {
                game: replay_frames_per_second(game, args.policies, 20_000) for game in GAMES
            },
            "td_step_us": {
                label: td_step_us(name, kwargs, streams=len(GAMES), steps=3_000)
                for label, (name, kwargs) in specs.items()
            },
        },
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores "
        f"(shared; load average {os.getloadavg()[0]:.1f} at the end)",
        "ale_py": ale_py.__version__,
        "torch": torch.__version__,
        "date": date.today().isoformat(),
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "README.md").write_text(markdown(results, reproduce_command(args)))
    print((args.out / "README.md").read_text())


if __name__ == "__main__":
    main()
