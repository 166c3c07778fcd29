"""The GRPO step: loss math, the optimizer update, LoRA, data parallel, checkpoints, evaluation, metrics."""
