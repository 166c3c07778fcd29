"""convert_nanochat.py --to-nanochat: nanochat .pt -> MLX -> .pt gives back every tensor (name, shape, dtype,
value), the meta's model_config and the tokenizer in nanochat's layout, for both architectures; adapters fused."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from fixture_checkpoint import build_tiny_2026_checkpoint

from mlx_grpo.config import GRPOConfig
from mlx_grpo.models import load_model
from mlx_grpo.nanochat.checkpoint import NanochatCheckpointError, find_checkpoint
from mlx_grpo.nanochat.convert import convert_checkpoint, main
from mlx_grpo.nanochat.export import export_to_nanochat
from mlx_grpo.training.lora import add_adapters, save_adapters


def assert_same_checkpoint(original_dir, exported_dir, step):
    want = torch.load(next(original_dir.glob("model_*.pt")), weights_only=True)
    got = torch.load(exported_dir / f"model_{step:06d}.pt", weights_only=True)
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert (got[name].shape, got[name].dtype) == (tensor.shape, tensor.dtype), name
        assert torch.equal(got[name], tensor), name
    want_meta = json.loads(next(original_dir.glob("meta_*.json")).read_text())
    got_meta = json.loads((exported_dir / f"meta_{step:06d}.json").read_text())
    assert got_meta["model_config"] == want_meta["model_config"]  # what nanochat's build_model reads
    assert got_meta["user_config"] == want_meta["user_config"] and got_meta["step"] == step


def test_the_october_model_round_trips(tiny_nanochat_ckpt_dir, tiny_model_dir, tmp_path, capsys):
    assert main(["--to-nanochat", str(tiny_model_dir), "--output", str(tmp_path / "base")]) == 0
    assert "model_000005.pt" in capsys.readouterr().out
    assert_same_checkpoint(tiny_nanochat_ckpt_dir, tmp_path / "base" / "chatrl_checkpoints" / "d2", 5)
    tokenizer = tmp_path / "base" / "tokenizer" / "tokenizer.pkl"
    assert tokenizer.read_bytes() == (tiny_nanochat_ckpt_dir / "tokenizer.pkl").read_bytes()


@pytest.mark.parametrize("era", ["e85db6b", "a825e63"])  # value embeddings; + smear and backout
def test_the_2026_model_round_trips_with_nanochats_names(tmp_path, era):
    ckpt = build_tiny_2026_checkpoint(tmp_path / "ckpt", era)
    convert_checkpoint(find_checkpoint(ckpt), tmp_path / "mlx", dtype="float32")
    summary = export_to_nanochat(tmp_path / "mlx", tmp_path / "base", tag="mine", step=7, stage="sft")
    assert summary.model_path == tmp_path / "base" / "chatsft_checkpoints" / "mine" / "model_000007.pt"
    assert_same_checkpoint(ckpt, summary.model_path.parent, 7)


def test_lora_adapters_are_fused_into_the_exported_weights(tiny_model_dir, tmp_path):
    cfg = GRPOConfig(model_name=str(tiny_model_dir), train_type="lora", lora_rank=2, lora_keys=["attn.c_q"])
    model = load_model(tiny_model_dir)[0]
    adapter_config = add_adapters(model, cfg)
    layer = model.layers[0].attn.c_q
    layer.lora_b = mx.random.normal(layer.lora_b.shape, key=mx.random.key(1))
    save_adapters(tmp_path / "ckpt", model, adapter_config)
    summary = export_to_nanochat(tmp_path / "ckpt", tmp_path / "base", step=3)
    got = torch.load(summary.model_path, weights_only=True)
    plain = load_model(tiny_model_dir)[0]
    w = np.array(plain.layers[0].attn.c_q.weight)
    delta = layer.scale * np.array(layer.lora_b).T @ np.array(layer.lora_a).T  # mlx-lm's fuse: W + s B^T A^T
    np.testing.assert_allclose(got["transformer.h.0.attn.c_q.weight"].numpy(), w + delta, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got["transformer.h.1.attn.c_k.weight"].numpy(),
                                  np.array(plain.layers[1].attn.c_k.weight))


def test_refusals_are_one_line(tiny_model_dir, tiny_mlx_lm_dir, tmp_path, capsys):
    assert main(["--to-nanochat", str(tiny_model_dir), "--output", str(tmp_path / "base")]) == 0
    assert main(["--to-nanochat", str(tiny_model_dir), "--output", str(tmp_path / "base")]) == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["--to-nanochat", str(tiny_model_dir), "--output", str(tmp_path / "base"), "--overwrite"]) == 0
    with pytest.raises(NanochatCheckpointError, match="model_type 'llama'"):
        export_to_nanochat(tiny_mlx_lm_dir, tmp_path / "other")
    assert main(["--to-nanochat", str(tiny_model_dir)]) == 1
    assert "needs --output" in capsys.readouterr().err
