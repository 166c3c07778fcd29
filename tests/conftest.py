"""Session-scoped fixtures shared by the tests: a tiny nanochat checkpoint and its MLX conversion, and the
one way tests run the trainer script (mlx-grpo.py) and start subprocesses on this checkout's package."""

import os
import runpy
import sys
from pathlib import Path

import pytest
from fixture_checkpoint import build_tiny_checkpoint, build_tiny_mlx_lm_model

import mlx_grpo
from mlx_grpo.nanochat.checkpoint import find_checkpoint
from mlx_grpo.nanochat.convert import convert_checkpoint

REPO = Path(__file__).resolve().parents[1]
TRAINER = REPO / "mlx-grpo.py"


def trainer_main(argv):
    """mlx-grpo.py's main(argv), run in this process as `python mlx-grpo.py ARGS` would run it."""
    return runpy.run_path(str(TRAINER), run_name="mlx_grpo_trainer")["main"](list(map(str, argv)))


def bench_main(script, argv):
    """bench/SCRIPT's main(argv), run in this process as `python bench/SCRIPT ARGS` would run it (its folder
    first on sys.path, for bench/'s own modules)."""
    bench_dir = str(REPO / "bench")
    sys.path.insert(0, bench_dir)
    try:
        return runpy.run_path(str(REPO / "bench" / script), run_name=Path(script).stem)["main"](list(map(str, argv)))
    finally:
        sys.path.remove(bench_dir)


def subprocess_env(**extra):
    """os.environ for a subprocess that imports the same mlx_grpo as this process (this checkout's)."""
    package_parent = str(Path(mlx_grpo.__file__).parent.parent)
    path = os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


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
