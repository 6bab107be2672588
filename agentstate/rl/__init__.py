"""Reinforcement learning whose recurrent state is trained by the RL objective through RTRL."""

from agentstate.rl.actor_critic import ActorCriticConfig, RTRLActorCritic, RTRLPolicy

__all__ = ["ActorCriticConfig", "RTRLActorCritic", "RTRLPolicy"]
