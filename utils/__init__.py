"""Shared building blocks of MLX-GRPO: tokenizer, model loading, rewards, loss math, rollouts."""
