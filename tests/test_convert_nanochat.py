"""convert_nanochat.py / mlx_grpo.nanochat.convert: conversion is exact, and wrong checkpoints are refused."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from fixture_checkpoint import TINY_MODEL_CONFIG, tiny_state_dict, write_checkpoint

from mlx_grpo.models import load_model
from mlx_grpo.nanochat.checkpoint import (
    NanochatCheckpoint,
    NanochatCheckpointError,
    checkpoint_name,
    find_checkpoint,
    resolve_checkpoint,
)
from mlx_grpo.nanochat.convert import convert_checkpoint, default_output_dir, main

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Independent reference: nanochat's October-2025 forward pass in float64 numpy, read straight from
# the .pt file (no code shared with mlx_grpo.nanochat.convert or mlx-lm).


def _rms_norm(x):
    # nanochat: F.rms_norm without weight, eps = torch's default (float32 machine epsilon).
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.finfo(np.float32).eps)


def _rotary(x, base=10000.0):
    # x: (T, H, D), half-split layout, rotation by -theta: y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos.
    T, _, D = x.shape
    inv_freq = 1.0 / base ** (np.arange(0, D, 2) / D)
    angles = np.outer(np.arange(T), inv_freq)  # (T, D/2)
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return np.concatenate([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], axis=-1)


def _reference_weights(ckpt_dir, step=5):
    state = torch.load(Path(ckpt_dir) / f"model_{step:06d}.pt", map_location="cpu", weights_only=True)
    with open(Path(ckpt_dir) / f"meta_{step:06d}.json") as f:
        cfg = json.load(f)["model_config"]
    return {k: v.double().numpy() for k, v in state.items()}, cfg


def reference_logits(weights, cfg, ids):
    T, C, H, Hkv = len(ids), cfg["n_embd"], cfg["n_head"], cfg["n_kv_head"]
    D = C // H
    x = _rms_norm(weights["transformer.wte.weight"][np.asarray(ids)])
    causal = np.tril(np.ones((T, T), dtype=bool))
    for i in range(cfg["n_layer"]):
        w = lambda name: weights[f"transformer.h.{i}.{name}.weight"]  # noqa: E731
        h = _rms_norm(x)
        q = (h @ w("attn.c_q").T).reshape(T, H, D)
        k = (h @ w("attn.c_k").T).reshape(T, Hkv, D)
        v = (h @ w("attn.c_v").T).reshape(T, Hkv, D)
        q, k = _rms_norm(_rotary(q)), _rms_norm(_rotary(k))
        k, v = np.repeat(k, H // Hkv, axis=1), np.repeat(v, H // Hkv, axis=1)
        scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(D)
        scores = np.where(causal, scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        y = np.einsum("hts,shd->thd", probs, v).reshape(T, C)
        x = x + y @ w("attn.c_proj").T
        h = _rms_norm(x)
        x = x + (np.maximum(h @ w("mlp.c_fc").T, 0) ** 2) @ w("mlp.c_proj").T
    logits = _rms_norm(x) @ weights["lm_head.weight"].T
    return 15.0 * np.tanh(logits / 15.0)


def reference_greedy(weights, cfg, prompt, max_tokens, stop_ids):
    ids, out = list(prompt), []
    for _ in range(max_tokens):
        token = int(np.argmax(reference_logits(weights, cfg, ids)[-1]))
        out.append(token)
        ids.append(token)
        if token in stop_ids:
            break
    return out


# ---------------------------------------------------------------------------------------------
# Helpers


def make_checkpoint(folder, source_dir, state, step=5, model_config=TINY_MODEL_CONFIG):
    """A checkpoint folder with the given state dict and the fixture's tokenizer.pkl."""
    write_checkpoint(folder, state, step=step, model_config=model_config)
    shutil.copyfile(Path(source_dir) / "tokenizer.pkl", Path(folder) / "tokenizer.pkl")
    return Path(folder)


def convert_error(folder, tmp_path) -> str:
    with pytest.raises(NanochatCheckpointError) as e:
        convert_checkpoint(find_checkpoint(folder), tmp_path / "out")
    assert not (tmp_path / "out").exists(), "a refused checkpoint must not leave an output folder"
    return str(e.value)


# ---------------------------------------------------------------------------------------------
# Exactness


def test_logits_match_independent_reference(tiny_nanochat_ckpt_dir, tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir)
    weights, cfg = _reference_weights(tiny_nanochat_ckpt_dir)
    ids = tokenizer.encode("Natalia sold 48 clips in April and 24 clips in May.")
    ids = [tokenizer.bos_token_id] + ids
    assert len(ids) > 10
    got = np.array(model(mx.array([ids]))[0], dtype=np.float64)
    want = reference_logits(weights, cfg, ids)
    assert got.shape == want.shape == (len(ids), cfg["vocab_size"])
    assert want.std() > 1.0, "fixture logits should not be ~0"
    assert np.abs(got - want).max() <= 1e-3


def test_greedy_generation_through_mlx_lm_matches_reference(tiny_nanochat_ckpt_dir, tiny_model_dir):
    from mlx_lm import stream_generate

    model, tokenizer = load_model(tiny_model_dir)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "How many clips did Natalia sell?"}], add_generation_prompt=True
    )
    got = [
        r.token
        for r in stream_generate(model, tokenizer, prompt, max_tokens=12, sampler=lambda lp: mx.argmax(lp, axis=-1))
    ]
    weights, cfg = _reference_weights(tiny_nanochat_ckpt_dir)
    want = reference_greedy(weights, cfg, prompt, 12, set(tokenizer.eos_token_ids))
    assert got == want
    assert len(set(want)) > 1, "greedy decoding of the fixture should not be constant"


# ---------------------------------------------------------------------------------------------
# Output folder


def test_output_folder_contents(tiny_nanochat_ckpt_dir, tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config == {
        "model_type": "nanochat",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "vocab_size": 512,
        "max_position_embeddings": 256,
        "intermediate_size": 256,
        "rope_theta": 10000.0,
    }
    assert (tiny_model_dir / "tokenizer.pkl").read_bytes() == (tiny_nanochat_ckpt_dir / "tokenizer.pkl").read_bytes()
    meta = json.loads((tiny_model_dir / "nanochat_meta.json").read_text())
    assert meta["model_config"] == TINY_MODEL_CONFIG and meta["val_loss"] == 1.234
    assert meta["conversion"]["step"] == 5 and meta["conversion"]["source"] == str(tiny_nanochat_ckpt_dir)
    assert meta["conversion"]["dtype"] == "float32"
    weights = mx.load(str(tiny_model_dir / "model.safetensors"))
    assert len(weights) == 6 * 2 + 2
    assert all(w.dtype == mx.float32 for w in weights.values())


def test_default_dtype_is_bfloat16_and_exact(tiny_nanochat_ckpt_dir, tmp_path, capsys):
    assert main([str(tiny_nanochat_ckpt_dir), "--output", str(tmp_path / "bf16")]) == 0
    summary = capsys.readouterr().out
    assert "depth 2, width 64, 163,840 params, bfloat16" in summary and "MB on disk" in summary
    weights = mx.load(str(tmp_path / "bf16" / "model.safetensors"))
    assert all(w.dtype == mx.bfloat16 for w in weights.values())
    state = tiny_state_dict()
    # wte is bf16 in the checkpoint: the conversion must be bit-exact.
    wte = np.array(weights["transformer.wte.weight"].astype(mx.float32))
    assert np.array_equal(wte, state["transformer.wte.weight"].float().numpy())


def test_compiled_prefix_is_stripped(tiny_nanochat_ckpt_dir, tmp_path):
    state = {"_orig_mod." + k: v for k, v in tiny_state_dict().items()}
    folder = make_checkpoint(tmp_path / "compiled", tiny_nanochat_ckpt_dir, state)
    convert_checkpoint(find_checkpoint(folder), tmp_path / "out", dtype="float32")
    assert "lm_head.weight" in mx.load(str(tmp_path / "out" / "model.safetensors"))


# ---------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize(
    "extra",
    [
        {"value_embeds.0.weight": torch.zeros(512, 64)},
        {"transformer.h.0.attn.ve_gate.weight": torch.zeros(2, 32)},
    ],
)
def test_refuses_2026_tensors_without_their_era(tiny_nanochat_ckpt_dir, tmp_path, extra):
    # October-2025 tensors plus some of 2026 (without the lambdas every 2026 era has): of no known era.
    folder = make_checkpoint(tmp_path / "ckpt", tiny_nanochat_ckpt_dir, {**tiny_state_dict(), **extra})
    message = convert_error(folder, tmp_path)
    assert "no known era" in message and "resid_lambdas" in message
    assert all(name in message for name in extra)


def test_refuses_2026_model_config(tiny_nanochat_ckpt_dir, tmp_path):
    config = {**TINY_MODEL_CONFIG, "window_pattern": "SSSL"}
    folder = make_checkpoint(tmp_path / "ckpt", tiny_nanochat_ckpt_dir, tiny_state_dict(), model_config=config)
    assert "window_pattern" in convert_error(folder, tmp_path)


def test_refuses_missing_tensor(tiny_nanochat_ckpt_dir, tmp_path):
    state = tiny_state_dict()
    del state["transformer.h.1.mlp.c_fc.weight"]
    folder = make_checkpoint(tmp_path / "ckpt", tiny_nanochat_ckpt_dir, state)
    message = convert_error(folder, tmp_path)
    assert "missing" in message and "transformer.h.1.mlp.c_fc.weight" in message


def test_refuses_unexpected_tensor(tiny_nanochat_ckpt_dir, tmp_path):
    state = {**tiny_state_dict(), "transformer.h.2.attn.c_q.weight": torch.zeros(64, 64)}
    folder = make_checkpoint(tmp_path / "ckpt", tiny_nanochat_ckpt_dir, state)
    message = convert_error(folder, tmp_path)
    assert "unexpected" in message and "transformer.h.2.attn.c_q.weight" in message


def test_refuses_wrong_shape(tiny_nanochat_ckpt_dir, tmp_path):
    state = {**tiny_state_dict(), "lm_head.weight": torch.zeros(500, 64)}
    folder = make_checkpoint(tmp_path / "ckpt", tiny_nanochat_ckpt_dir, state)
    message = convert_error(folder, tmp_path)
    assert "lm_head.weight (500, 64) != (512, 64)" in message


def test_refuses_non_empty_output_unless_overwrite(tiny_nanochat_ckpt_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main([str(tiny_nanochat_ckpt_dir), "--output", str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main([str(tiny_nanochat_ckpt_dir), "--output", str(out), "--overwrite"]) == 0
    assert (out / "model.safetensors").is_file() and (out / "notes.txt").is_file()


def test_bad_quantization_arguments(tiny_nanochat_ckpt_dir, tmp_path, capsys):
    assert main([str(tiny_nanochat_ckpt_dir), "--output", str(tmp_path / "a"), "--q-group-size", "32"]) == 1
    assert "--q-bits" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the command line offers only the supported bits
        main([str(tiny_nanochat_ckpt_dir), "--output", str(tmp_path / "b"), "--q-bits", "7"])
    with pytest.raises(NanochatCheckpointError, match="unsupported quantization 7 bits / group 64"):
        convert_checkpoint(find_checkpoint(tiny_nanochat_ckpt_dir), tmp_path / "c", q_bits=7)
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# Sources, steps, quantization


def _converted_step(out) -> int:
    return json.loads((Path(out) / "nanochat_meta.json").read_text())["conversion"]["step"]


def test_step_selection(tiny_nanochat_ckpt_dir, tmp_path):
    folder = make_checkpoint(tmp_path / "ckpt", tiny_nanochat_ckpt_dir, tiny_state_dict(seed=1), step=5)
    write_checkpoint(folder, tiny_state_dict(seed=2), step=12)
    assert main([str(folder), "--output", str(tmp_path / "newest")]) == 0
    assert _converted_step(tmp_path / "newest") == 12
    assert main([str(folder), "--output", str(tmp_path / "five"), "--step", "5", "--dtype", "float32"]) == 0
    assert _converted_step(tmp_path / "five") == 5
    lm_head = mx.load(str(tmp_path / "five" / "model.safetensors"))["lm_head.weight"]
    assert np.array_equal(np.array(lm_head), tiny_state_dict(seed=1)["lm_head.weight"].numpy())
    with pytest.raises(NanochatCheckpointError, match="no step 7 .* 5, 12"):
        find_checkpoint(folder, step=7)


def test_base_dir_layout(tiny_nanochat_ckpt_dir, tmp_path, monkeypatch):
    base = tmp_path / "nanochat"
    (base / "tokenizer").mkdir(parents=True)
    shutil.copyfile(tiny_nanochat_ckpt_dir / "tokenizer.pkl", base / "tokenizer" / "tokenizer.pkl")
    write_checkpoint(base / "chatsft_checkpoints" / "d2", tiny_state_dict(), step=5)
    out = tmp_path / "sft"
    assert main([str(base), "--stage", "sft", "--tag", "d2", "--output", str(out)]) == 0
    assert (out / "tokenizer.pkl").read_bytes() == (base / "tokenizer" / "tokenizer.pkl").read_bytes()
    # --stage without SOURCE reads nanochat's base dir; a single tag needs no --tag.
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    assert main(["--stage", "sft", "--output", str(tmp_path / "env")]) == 0
    with pytest.raises(NanochatCheckpointError, match="mid_checkpoints does not exist"):
        resolve_checkpoint(None, stage="mid")


def test_default_output_names():
    def name(source, folder):
        return checkpoint_name(NanochatCheckpoint(source, Path(folder), 1, Path("m"), Path("j"), Path("t")))

    assert name("karpathy/nanochat-d32", "/hf/snap/abc") == "nanochat-d32"
    assert name("x", "/b/chatsft_checkpoints/d20") == "nanochat-d20-sft"
    assert name("x", "/runs/my-model") == "my-model"
    assert default_output_dir("nanochat-d32") == Path("models/nanochat-d32-mlx")
    assert default_output_dir("nanochat-d20-sft", 4) == Path("models/nanochat-d20-sft-mlx-4bit")


def test_default_output_folder_is_the_one_rule(tiny_nanochat_ckpt_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([str(tiny_nanochat_ckpt_dir), "--q-bits", "8", "--dtype", "float32"]) == 0
    out = tmp_path / default_output_dir(tiny_nanochat_ckpt_dir.name, 8)
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 8


def test_quantized_output_loads(tiny_nanochat_ckpt_dir, tiny_model_dir, tmp_path):
    from mlx_lm.utils import load_model as mlx_lm_load_model

    out = tmp_path / "q4"
    args = [str(tiny_nanochat_ckpt_dir), "--output", str(out), "--q-bits", "4", "--q-group-size", "32"]
    assert main(args + ["--dtype", "float32"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    assert config["quantization_config"] == config["quantization"]

    ids = mx.array([[1, 2, 3, 40, 50, 60]])
    reference = np.array(load_model(tiny_model_dir)[0](ids)).ravel()
    model, _ = load_model(out)
    assert isinstance(model.transformer.h[0].attn.c_q, nn.QuantizedLinear)
    quantized = np.array(model(ids)).ravel()
    assert np.corrcoef(reference, quantized)[0, 1] > 0.9
    # mlx-lm's own loader (the weights half of mlx_lm.load) reads the same folder.
    mlx_model, mlx_config = mlx_lm_load_model(out)
    assert mlx_config["quantization"]["bits"] == 4
    assert np.allclose(np.array(mlx_model(ids)).ravel(), quantized)


def test_hub_default_offline_is_one_line(tmp_path):
    # An empty cache of our own: a real cached d32 must not get converted here.
    cache = str(tmp_path / "hf")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": cache, "HF_HUB_CACHE": cache, "HUGGINGFACE_HUB_CACHE": cache}
    proc = subprocess.run(
        [sys.executable, str(REPO / "convert_nanochat.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "karpathy/nanochat-d32" in lines[0] and "convert_nanochat.py /path/to/folder" in lines[0]
    assert not (tmp_path / "models").exists()


def test_refuses_unreadable_model_file(tiny_nanochat_ckpt_dir, tmp_path):
    folder = make_checkpoint(tmp_path / "ckpt", tiny_nanochat_ckpt_dir, tiny_state_dict())
    (folder / "model_000005.pt").write_bytes(b"not a torch file")
    assert "cannot read" in convert_error(folder, tmp_path)
