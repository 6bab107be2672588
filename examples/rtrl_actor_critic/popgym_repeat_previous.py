"""An actor-critic whose recurrent state learns by RTRL, on a POPGym memory task.

RepeatPreviousEasy asks the agent to output the card it saw k steps ago: a memoryless policy
scores about -0.5 on average, one with enough memory 1.0. Needs ``pip install popgym``.

Run: ``python examples/rtrl_actor_critic/popgym_repeat_previous.py [--steps N] [--learner NAME]``
(as ``agentstate train popgym:popgym-RepeatPreviousEasy-v0`` does). With no ``--learner`` the
agent takes ``RTRLActorCritic``'s default core (chosen on the memory harness) and one env.
"""

import argparse

from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy

from agentstate.rl import RTRLActorCritic

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--steps", type=int, default=100_000)
parser.add_argument("--learner", default=None, help="a registered learner (default: the default)")
parser.add_argument("--features", type=int, default=32)
parser.add_argument("--envs", type=int, default=1)
args = parser.parse_args()

env = make_vec_env("popgym:popgym-RepeatPreviousEasy-v0", n_envs=args.envs, seed=0)
model = RTRLActorCritic(
    env, learner=args.learner, learner_kwargs={"n_features": args.features}, seed=0, verbose=1,
    log_interval=20_000,
)  # fmt: skip
model.learn(args.steps, progress_bar=False)
mean_return, std_return = evaluate_policy(model, env, n_eval_episodes=50, deterministic=True)
print(f"{model.learner}: mean return {mean_return:.3f} +- {std_return:.3f} over 50 episodes")
