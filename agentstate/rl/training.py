"""The run behind ``agentstate train``: one actor-critic learning online in a vector env.

Writes into the output folder ``config.json``, ``episodes.csv`` (every finished episode:
``step, stream, episode_return, episode_length``), ``learning_curve.csv`` and
``learning_curve.png`` (each stream's mean return over its last ``window`` episodes, sampled
every ``log_every`` steps; mean ± standard error over streams) and ``model.zip``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env

from agentstate.checkpoint import atomic_write_bytes
from agentstate.plotting import plot_learning_curve
from agentstate.rl.actor_critic import ActorCriticConfig, RTRLActorCritic, resolved_core


@dataclass
class TrainConfig:
    """Everything that defines one ``agentstate train`` run (written to ``config.json``)."""

    env: str
    """A Gymnasium id, or ``module:id`` (the module is imported first, e.g. ``popgym:...``)."""
    learner: str | None = None
    learner_kwargs: dict[str, Any] = field(default_factory=dict)
    """The core and its options, resolved on creation by ``resolved_core``: with no core named,
    the one that did best on the memory harness (``benchmarks/memory/README.md``), its options
    overridden by these; a named core with its plugin's defaults and these."""
    steps: int = 100_000
    """Env steps in all, summed over the envs."""
    envs: int = 1
    """Envs stepped together (the streams). One did better than 8 on the harness for the same
    env steps: eight times the updates."""
    seed: int = 0
    agent: dict[str, Any] = field(default_factory=dict)
    """``ActorCriticConfig`` fields that differ from its defaults."""
    window: int = 100
    """Episodes in each stream's running mean return."""
    log_every: int = 2_000
    """Steps between two points of the learning curve."""

    def __post_init__(self) -> None:
        self.learner, self.learner_kwargs = resolved_core(self.learner, self.learner_kwargs)
        for name in ("steps", "envs", "window", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        ActorCriticConfig(**self.agent)  # unknown or bad fields fail before any work


class EpisodeRecorder(BaseCallback):
    """Collects every finished episode (SB3's Monitor ``info["episode"]``) per stream."""

    def __init__(self, streams: int, window: int, log_every: int) -> None:
        super().__init__()
        self.episodes: list[tuple[int, int, float, int]] = []
        self.recent: list[list[float]] = [[] for _ in range(streams)]
        self.window = window
        self.log_every = log_every
        self.curve_steps: list[int] = []
        self.curve: list[np.ndarray] = []

    def _on_step(self) -> bool:
        for stream, info in enumerate(self.locals["infos"]):
            episode = info.get("episode")
            if episode is not None:
                self.episodes.append((self.num_timesteps, stream, float(episode["r"]),
                                      int(episode["l"])))  # fmt: skip
                self.recent[stream] = [*self.recent[stream][-(self.window - 1) :], episode["r"]]
        if self.num_timesteps // self.log_every > len(self.curve_steps):
            self.curve_steps.append(self.num_timesteps)
            self.curve.append(
                np.array([np.mean(recent) if recent else np.nan for recent in self.recent])
            )
        return True


def train(config: TrainConfig, out_dir: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Train one actor-critic and write its files; returns a summary of the run."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = make_vec_env(config.env, n_envs=config.envs, seed=config.seed)
    model = RTRLActorCritic(
        env,
        learner=config.learner,
        learner_kwargs=config.learner_kwargs,
        config=config.agent,
        seed=config.seed,
    )
    (out / "config.json").write_text(
        json.dumps(
            {"train": asdict(config), "agent": asdict(model.config), "env_id": config.env},
            indent=2,
        )
    )
    recorder = EpisodeRecorder(config.envs, config.window, config.log_every)
    model.learn(config.steps, callback=recorder, progress_bar=progress)
    _write_csv(out / "episodes.csv", ["step", "stream", "episode_return", "episode_length"],
               recorder.episodes)  # fmt: skip
    curve = np.stack(recorder.curve) if recorder.curve else np.zeros((0, config.envs))
    _write_csv(
        out / "learning_curve.csv",
        ["step", *(f"return_{b}" for b in range(config.envs))],
        [(step, *row) for step, row in zip(recorder.curve_steps, curve, strict=True)],
    )
    if len(recorder.curve_steps):
        plot_learning_curve(
            recorder.curve_steps,
            {f"RTRLActorCritic ({config.learner})": curve},
            out / "learning_curve.png",
            title=f"{config.env} — {config.learner}, {config.envs} envs",
            ylabel=f"episode return (mean of each env's last {config.window})",
        )
    model.save(out / "model")
    env.close()
    returns = [episode[2] for episode in recorder.episodes[-config.window :]]
    return {"episodes": len(recorder.episodes),
            "final_return": float(np.mean(returns)) if returns else float("nan")}  # fmt: skip


def _write_csv(path: Path, header: list[str], rows: Any) -> None:
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(header)
    for row in rows:
        writer.writerow([f"{value:.8g}" if isinstance(value, float) else value for value in row])
    atomic_write_bytes(path, text.getvalue().encode())


def agent_settings(items: Mapping[str, Any]) -> dict[str, Any]:
    """``ActorCriticConfig`` fields from parsed ``KEY=VALUE`` pairs, checked by name."""
    known = set(ActorCriticConfig.__dataclass_fields__)
    unknown = sorted(set(items) - known)
    if unknown:
        raise ValueError(
            f"unknown actor-critic setting(s) {', '.join(unknown)}; known: "
            f"{', '.join(sorted(known))}"
        )
    return dict(items)
