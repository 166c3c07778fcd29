"""The one generation engine (rollouts, evaluation, inference), token sampling and nanochat's calculator."""
