"""GSM8K-style data and the reward functions."""
