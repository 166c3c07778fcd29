"""Tiny model folders for tests, built locally (nothing is downloaded).

- A nanochat checkpoint written the way nanochat writes one (torch.save of the state dict):
  bf16 transformer.wte.weight, fp32 everything else, torch (out, in) layout, model_{step:06d}.pt
  + meta_{step:06d}.json, and the run's tokenizer.pkl. Weights are scaled so logits are O(1) and
  greedy decoding is not trivially constant.
- The same for each 2026 era of nanochat's architecture (tiny_state_dict_2026): the lambdas, value
  embeddings (bf16, like wte), their gates and the smear/backout scalars at values that matter
  (not nanochat's neutral inits), padded vocab rows.
- A non-nanochat mlx-lm model (tiny llama + word-level Hugging Face tokenizer), for the
  mlx_lm.load path.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from fixture_tokenizer import build_tiny_tokenizer

TINY_MODEL_CONFIG = {
    "sequence_len": 256,
    "vocab_size": 512,
    "n_layer": 2,
    "n_head": 2,
    "n_kv_head": 2,
    "n_embd": 64,
}


def tiny_state_dict(model_config: dict = TINY_MODEL_CONFIG, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    n, vocab = model_config["n_embd"], model_config["vocab_size"]
    kv = model_config["n_kv_head"] * (n // model_config["n_head"])

    def normal(shape, std):
        return torch.randn(shape, generator=gen) * std

    def linear(out_dim, in_dim):
        return normal((out_dim, in_dim), 1 / math.sqrt(in_dim))

    state = {"transformer.wte.weight": normal((vocab, n), 0.5).to(torch.bfloat16)}
    for i in range(model_config["n_layer"]):
        p = f"transformer.h.{i}."
        state[p + "attn.c_q.weight"] = linear(n, n)
        state[p + "attn.c_k.weight"] = linear(kv, n)
        state[p + "attn.c_v.weight"] = linear(kv, n)
        state[p + "attn.c_proj.weight"] = linear(n, n)
        state[p + "mlp.c_fc.weight"] = linear(4 * n, n)
        state[p + "mlp.c_proj.weight"] = linear(n, 4 * n)
    state["lm_head.weight"] = normal((vocab, n), 0.5)
    return state


def write_checkpoint(
    folder: str | Path,
    state_dict: dict,
    step: int = 5,
    model_config: dict = TINY_MODEL_CONFIG,
) -> Path:
    """model_{step:06d}.pt + meta_{step:06d}.json in folder (no tokenizer)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, folder / f"model_{step:06d}.pt")
    meta = {
        "step": step,
        "val_loss": 1.234,
        "mmlu_acc": 0.25,
        "model_config": dict(model_config),
        "user_config": {"device_batch_size": 4, "num_epochs": 1},
    }
    with open(folder / f"meta_{step:06d}.json", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    return folder


def build_tiny_checkpoint(folder: str | Path, step: int = 5, seed: int = 0) -> Path:
    """A flat checkpoint folder (hub-release layout) with tokenizer.pkl beside the weights."""
    folder = Path(folder)
    enc = build_tiny_tokenizer(folder, vocab_size=TINY_MODEL_CONFIG["vocab_size"])
    assert enc.n_vocab == TINY_MODEL_CONFIG["vocab_size"], enc.n_vocab
    return write_checkpoint(folder, tiny_state_dict(seed=seed), step=step)


# A 2026 model: GQA (4 query heads on 2 kv heads), 4 layers (value embeddings on 1 and 3, backout at 2),
# a vocab of 500 padded to 512 rows, and windows that bind on sequences of ~300 tokens (S = 128, L = 256).
TINY_2026_CONFIG = {
    "sequence_len": 256,
    "vocab_size": 500,
    "n_layer": 4,
    "n_head": 4,
    "n_kv_head": 2,
    "n_embd": 64,
}
# The tensors each 2026 era adds, by the era's first commit: lambdas; value-embedding gate width; smear/backout.
ERA_TENSORS = {
    "aa530cd": (0, False),
    "fbc1484": (0, False),
    "e85db6b": (32, False),
    "aba30cb": (32, False),
    "6ed7d1d": (12, False),
    "a825e63": (12, True),
}


def tiny_state_dict_2026(era: str, model_config: dict = TINY_2026_CONFIG, seed: int = 0) -> dict[str, torch.Tensor]:
    """A 2026 checkpoint's state dict for `era` (see ERA_TENSORS), written like nanochat's."""
    gate_width, smear = ERA_TENSORS[era]
    gen = torch.Generator().manual_seed(seed)
    n, n_layer = model_config["n_embd"], model_config["n_layer"]
    rows = -(-model_config["vocab_size"] // 64) * 64
    kv = model_config["n_kv_head"] * (n // model_config["n_head"])

    def normal(shape, std):
        return torch.randn(shape, generator=gen) * std

    state = tiny_state_dict(model_config, seed)
    state["transformer.wte.weight"] = normal((rows, n), 0.8).to(torch.bfloat16)
    state["lm_head.weight"] = normal((rows, n), 0.5)
    state["resid_lambdas"] = torch.linspace(1.15, 1.05, n_layer)
    state["x0_lambdas"] = torch.linspace(0.3, 0.1, n_layer)
    if gate_width:
        for i in range(n_layer):
            if i % 2 == (n_layer - 1) % 2:
                state[f"value_embeds.{i}.weight"] = normal((rows, kv), 0.5).to(torch.bfloat16)
                state[f"transformer.h.{i}.attn.ve_gate.weight"] = normal((model_config["n_kv_head"], gate_width), 1.0)
    if smear:
        state["smear_gate.weight"] = normal((1, 24), 0.5)
        state["smear_lambda"] = torch.tensor([0.7])
        state["backout_lambda"] = torch.tensor([0.3])
    return state


def build_tiny_2026_checkpoint(folder: str | Path, era: str, window_pattern: str | None = "SSSL", step: int = 5,
                               seed: int = 0) -> Path:
    """A flat 2026 checkpoint folder of `era` with its tokenizer.pkl; window_pattern None: a meta without it."""
    folder = Path(folder)
    enc = build_tiny_tokenizer(folder, vocab_size=TINY_2026_CONFIG["vocab_size"])
    assert enc.n_vocab == TINY_2026_CONFIG["vocab_size"], enc.n_vocab
    config = dict(TINY_2026_CONFIG)
    if window_pattern is not None:
        config["window_pattern"] = window_pattern
    return write_checkpoint(folder, tiny_state_dict_2026(era, seed=seed), step=step, model_config=config)


TINY_WORDS = "the a cat dog sat on mat and how many is 0 1 2 3 4 5 6 7 8 9 + - * / = ? . #".split()


def build_tiny_mlx_lm_model(folder: str | Path, seed: int = 0) -> Path:
    """A float32 llama (1 layer, width 32) with a word-level tokenizer that mlx_lm.load reads offline."""
    import mlx.core as mx
    from mlx_lm.models import llama
    from mlx_lm.utils import save_config, save_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(TINY_WORDS)}}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=words, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(
        folder
    )
    config = {
        "model_type": "llama",
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": len(vocab),
        "tie_word_embeddings": False,
    }
    mx.random.seed(seed)
    save_model(folder, llama.Model(llama.ModelArgs.from_dict(config)))
    save_config(config, folder / "config.json")
    return folder
