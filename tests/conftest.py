"""Session-scoped fixtures shared by the tests: a tiny nanochat checkpoint and its MLX conversion."""

import pytest
from fixture_checkpoint import build_tiny_checkpoint, build_tiny_mlx_lm_model

from mlx_grpo.nanochat.checkpoint import find_checkpoint
from mlx_grpo.nanochat.convert import convert_checkpoint


@pytest.fixture(scope="session")
def tiny_nanochat_ckpt_dir(tmp_path_factory):
    """A raw nanochat folder: model_000005.pt, meta_000005.json, tokenizer.pkl (vocab 512, depth 2, width 64)."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_nanochat_ckpt"), step=5)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_nanochat_ckpt_dir, tmp_path_factory):
    """The tiny checkpoint converted to an MLX nanochat folder in float32 (load with mlx_grpo.models)."""
    out = tmp_path_factory.mktemp("tiny_model") / "nanochat-tiny-mlx"
    convert_checkpoint(find_checkpoint(tiny_nanochat_ckpt_dir), out, dtype="float32")
    return out


@pytest.fixture(scope="session")
def tiny_mlx_lm_dir(tmp_path_factory):
    """A tiny non-nanochat mlx-lm model folder (llama, word-level HF tokenizer) for the mlx_lm.load path."""
    return build_tiny_mlx_lm_model(tmp_path_factory.mktemp("tiny_mlx_lm") / "llama-tiny")
