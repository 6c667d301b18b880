"""Reinforcement learning from the judge: token log-probs, rewards, GRPO arithmetic (pure torch, no Ray)."""
