"""Alignment from execution feedback: GRPO's rewards, rollouts and step metrics (the losses live in models/loss.py)."""
