"""The top-level README's comparison table over the suite, from the committed results.

Reads ``benchmarks/results/memory_actor_critic/results.csv`` (every method under its current
settings) and ``wrapper_previous_defaults/results.csv`` (the wrapper's runs under its
previous defaults: an eLSTM with centred heads and the past shown; the second defaults'
runs, an eLSTM with centred and reconstruction heads and no past shown, are in
``wrapper_second_defaults/``, the first's, columnar and uncentred, in
``wrapper_first_defaults/``) and prints a markdown table: one row per
task (mean ± s.e. over 3 seeds, the best of a row in bold), the mean over the 15 tasks where
a method has all of them, and the training seconds per run. A cell with fewer than 3
finished seeds reads ``queued``.

    python benchmarks/memory/suite_table.py
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parents[1] / "results" / "memory_actor_critic"
COLUMNS = {
    "ppo": "PPO",
    "ppo_framestack4": "PPO + FrameStack(4)",
    "ppo_agentstate": "PPO + wrapper",
    "ppo_agentstate (previous defaults)": "PPO + wrapper, previous defaults",
    "recurrent_ppo": "RecurrentPPO",
    "dqn": "DQN",
    "dqn_agentstate": "DQN + wrapper",
    "ac_rtu_1env_tanh": "actor-critic, defaults",
}
SEEDS = 3
Cell = tuple[float, float, int, float]  # mean, s.e., seeds, training seconds


def read(path: Path) -> dict[str, dict[str, Cell]]:
    """``{variant: {task: cell}}`` of a results.csv."""
    table: dict[str, dict[str, Cell]] = defaultdict(dict)
    with path.open() as handle:
        for row in csv.DictReader(handle):
            table[row["variant"]][row["task"]] = (
                float(row["eval_return_mean"]),
                float(row["eval_return_se"]),
                int(row["seeds"]),
                float(row["train_seconds_mean"]),
            )
    return table


def suite_table(results: Path = RESULTS) -> str:
    """The markdown table (see the module docstring)."""
    table = read(results / "results.csv")
    table["ppo_agentstate (previous defaults)"] = read(
        results / "wrapper_previous_defaults" / "results.csv"
    )["ppo_agentstate"]
    tasks = list(table["ppo"])
    lines = [
        "| task | " + " | ".join(COLUMNS.values()) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for task in tasks:
        finished = {m: table[m][task] for m in COLUMNS if table[m].get(task, (0, 0, 0))[2] == SEEDS}
        best = max(cell[0] for cell in finished.values())
        cells = []
        for method in COLUMNS:
            if method not in finished:
                box_actions = method.startswith("dqn") and "Pendulum" in task
                cells.append("not run" if box_actions else "queued")
                continue
            mean, error = finished[method][:2]
            text = f"{mean:.2f} ± {error:.2f}".replace("-", "−")
            cells.append(f"**{text}**" if mean >= best - 0.005 and len(finished) > 1 else text)
        label = "CueMemory (cue, 10 blanks)" if task == "CueMemory" else task
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    means, seconds = [], []
    for method in COLUMNS:
        done = [table[method][t] for t in tasks if table[method].get(t, (0, 0, 0))[2] == SEEDS]
        mean = np.mean([cell[0] for cell in done]) if len(done) == len(tasks) else None
        means.append("–" if mean is None else f"{mean:+.3f}".replace("-", "−"))
        times = [cell[3] for cell in done]
        seconds.append(f"{min(times):,.0f}-{max(times):,.0f}" if times else "–")
    lines.append(f"| mean over the {len(tasks)} tasks | " + " | ".join(means) + " |")
    lines.append("| training s per run | " + " | ".join(seconds) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(suite_table(), end="")
