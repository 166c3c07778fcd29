"""MLX-GRPO's package: this folder, utils/, is installed as `mlx_grpo` (see pyproject.toml).

    config.py       the run configuration (TOML + --set, validated before anything loads)
    models.py       loading a policy and writing one back as a model folder
    nanochat/       nanochat checkpoints: conversion, tokenizer, the fast decoder
    generation/     the one generation engine (rollouts, evaluation, inference), sampling, calculator
    training/       the GRPO step: loss, update, LoRA, data parallel, checkpoints, evaluation, metrics
    data/           GSM8K loading and the reward functions
    cuda_kernels/   custom CUDA kernels behind one switch (MLX's CUDA backend only)
    demo/           the builder of the offline demo (not used at run time)
    inference.py, convert_model.py, fuse.py, plot.py: command-line tools (python utils/<tool>.py)
"""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent  # the checkout: configs/, data/, demo/
