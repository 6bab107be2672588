"""A cue-memory task: remember a cue across a delay, then choose the matching action.

Each episode: the first observation shows a cue (left or right); then ``delay`` blank
observations; then a "go" observation. The action taken at "go" ends the episode with reward
+1 if it matches the cue and -1 otherwise (actions before "go" do nothing). The terminal
observation shows which side was correct (feedback, as after a choice in a T-maze), which a
policy cannot use but a predictive state can learn from.

Observation (5 floats in [0, 1]): ``[cue left, cue right, go, correct was left, correct was
right]``. A memoryless policy scores 0 on average; one that remembers the cue scores 1.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces


class CueMemoryEnv(gym.Env):
    """See the module docstring.

    Example:
        >>> env = CueMemoryEnv(delay=2)
        >>> observation, info = env.reset(seed=0)
        >>> observation.tolist()[:2] in ([1.0, 0.0], [0.0, 1.0])
        True
    """

    metadata = {"render_modes": []}

    def __init__(self, delay: int = 10) -> None:
        self.delay = delay
        self.observation_space = spaces.Box(0.0, 1.0, (5,), np.float32)
        self.action_space = spaces.Discrete(2)
        self.cue = 0
        self.t = 0

    def _observation(self, *, cue: bool = False, go: bool = False, feedback: bool = False):
        observation = np.zeros(5, dtype=np.float32)
        if cue:
            observation[self.cue] = 1.0
        observation[2] = float(go)
        if feedback:
            observation[3 + self.cue] = 1.0
        return observation

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self.cue = int(self.np_random.integers(2))
        self.t = 0
        return self._observation(cue=True), {"cue": self.cue}

    def step(self, action: int):
        self.t += 1
        if self.t <= self.delay + 1:  # blanks, then "go" at t = delay + 1
            return self._observation(go=self.t == self.delay + 1), 0.0, False, False, {}
        reward = 1.0 if int(action) == self.cue else -1.0
        return self._observation(feedback=True), reward, True, False, {"cue": self.cue}
