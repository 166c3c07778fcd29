"""utils/convert_model.py: a tiny local Hugging Face model through mlx-lm, and the nanochat route."""

import argparse
import inspect
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_grpo import convert_model
from mlx_grpo.generation.chat import GenerationOptions, build_prompt, generate_reply
from mlx_grpo.models import load_model

HIDDEN, LAYERS, INTERMEDIATE, VOCAB = 64, 2, 128, 320


def build_tiny_hf_model(folder: Path) -> Path:
    """A random tiny Llama in Hugging Face format: config.json, model.safetensors and a byte-level
    BPE tokenizer trained with `tokenizers` and saved by transformers (no network)."""
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["the quick brown fox jumps over the lazy dog; 12 + 30 = 42"] * 20, trainer)
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>").save_pretrained(folder)

    config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS, "intermediate_size": INTERMEDIATE, "num_attention_heads": 2,
        "num_key_value_heads": 2, "vocab_size": VOCAB, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 128, "tie_word_embeddings": False, "torch_dtype": "float32",
        "bos_token_id": 0, "eos_token_id": 1,
    }
    (folder / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)

    def linear(out_dim, in_dim):
        return (rng.standard_normal((out_dim, in_dim)) / np.sqrt(in_dim)).astype(np.float32)

    weights = {"model.embed_tokens.weight": linear(VOCAB, HIDDEN), "lm_head.weight": linear(VOCAB, HIDDEN),
               "model.norm.weight": np.ones(HIDDEN, np.float32)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for name in ("q", "k", "v", "o"):
            weights[f"{p}self_attn.{name}_proj.weight"] = linear(HIDDEN, HIDDEN)
        weights[p + "mlp.gate_proj.weight"] = linear(INTERMEDIATE, HIDDEN)
        weights[p + "mlp.up_proj.weight"] = linear(INTERMEDIATE, HIDDEN)
        weights[p + "mlp.down_proj.weight"] = linear(HIDDEN, INTERMEDIATE)
        weights[p + "input_layernorm.weight"] = np.ones(HIDDEN, np.float32)
        weights[p + "post_attention_layernorm.weight"] = np.ones(HIDDEN, np.float32)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory):
    return build_tiny_hf_model(tmp_path_factory.mktemp("tiny_hf") / "tiny-llama")


def _quantized_layers(model):
    return [m for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)]


def test_hf_model_quantized_conversion_loads(tiny_hf_dir, tmp_path, capsys):
    import mlx_lm

    out = tmp_path / "tiny-llama-4bit"
    code = convert_model.main(["--hf-path", str(tiny_hf_dir), "--mlx-path", str(out), "-q", "--bits", "4",
                               "--group-size", "64", "--dtype", "float32", "--trust-remote-code"])
    assert code == 0 and f"-> {out}, 4-bit" in capsys.readouterr().out
    model, tokenizer, config = mlx_lm.load(str(out), return_config=True)
    assert config["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    assert len(_quantized_layers(model)) == LAYERS * 7 + 1  # every projection and lm_head
    text = mlx_lm.generate(model, tokenizer, "the quick", max_tokens=5)
    assert isinstance(text, str)
    # Also through this project's loader, which hands non-nanochat folders to mlx-lm.
    model2, tokenizer2 = load_model(out)
    reply = generate_reply(model2, tokenizer2, build_prompt(tokenizer2, "the quick", raw=True),
                           GenerationOptions(max_tokens=5, temperature=0.0))
    assert 1 <= len(reply.tokens) <= 5


def test_hf_model_unquantized_dtype(tiny_hf_dir, tmp_path):
    out = tmp_path / "tiny-llama-fp16"
    assert convert_model.main(["--hf-path", str(tiny_hf_dir), "--output-dir", str(out), "--dtype", "float16"]) == 0
    weights = mx.load(str(out / "model.safetensors"))
    assert {str(v.dtype) for v in weights.values()} == {"mlx.core.float16"}
    assert "quantization" not in json.loads((out / "config.json").read_text())


def test_every_hf_flag_reaches_mlx_lm_convert():
    """The original CLI raised TypeError on two of its flags: every keyword passed must exist."""
    from mlx_lm.convert import convert

    args = convert_model.parse_args(["--hf-path", "org/model", "-q", "--q-bits", "8", "--q-group-size", "32",
                                     "--dtype", "bfloat16", "--upload-repo", "me/model-8bit", "--revision", "main",
                                     "--trust-remote-code"])
    kwargs = convert_model.convert_kwargs(args, Path("out"))
    inspect.signature(convert).bind(**kwargs)
    assert kwargs["q_bits"] == 8 and kwargs["q_group_size"] == 32 and kwargs["trust_remote_code"] is True
    defaults = convert_model.convert_kwargs(convert_model.parse_args(["--hf-path", "org/model", "-q"]), Path("o"))
    assert (defaults["q_bits"], defaults["q_group_size"]) == (4, 64)
    assert convert_model.default_output_dir("org/model", 4) == Path("models/model-mlx-4bit")


def test_nanochat_folder_goes_to_the_nanochat_converter(tiny_nanochat_ckpt_dir, tmp_path, capsys):
    out = tmp_path / "nanochat-8bit"
    code = convert_model.main(["--hf-path", str(tiny_nanochat_ckpt_dir), "--output-dir", str(out), "-q",
                               "--q-bits", "8", "--dtype", "float32"])
    assert code == 0 and "step 5" in capsys.readouterr().out
    assert {"tokenizer.pkl", "nanochat_meta.json", "config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    meta = json.loads((out / "nanochat_meta.json").read_text())
    assert meta["conversion"]["quantization"]["bits"] == 8
    model, tokenizer = load_model(out)
    assert _quantized_layers(model)
    reply = generate_reply(model, tokenizer, build_prompt(tokenizer, "hello"), GenerationOptions(max_tokens=4, temperature=0.0))
    assert len(reply.tokens) <= 4


def test_both_fronts_put_a_nanochat_conversion_in_the_same_default_folder(tiny_nanochat_ckpt_dir, tmp_path,
                                                                         monkeypatch):
    from mlx_grpo.nanochat import convert as nanochat_convert

    monkeypatch.chdir(tmp_path)
    assert convert_model.main(["--hf-path", str(tiny_nanochat_ckpt_dir), "-q", "--q-bits", "8", "--dtype",
                               "float32"]) == 0
    out = nanochat_convert.default_output_dir(tiny_nanochat_ckpt_dir.name, 8)
    assert (tmp_path / out / "model.safetensors").is_file()
    assert nanochat_convert.main([str(tiny_nanochat_ckpt_dir), "--q-bits", "8", "--dtype", "float32"]) == 1  # same folder


def test_routing_and_errors(tiny_nanochat_ckpt_dir, tiny_hf_dir, tmp_path, capsys):
    assert convert_model.is_nanochat_source(str(tiny_nanochat_ckpt_dir))
    assert not convert_model.is_nanochat_source(str(tiny_hf_dir))
    assert convert_model.is_nanochat_source("karpathy/nanochat-d32")
    assert convert_model.is_nanochat_source("someone/other", forced=True)
    assert not convert_model.is_nanochat_source("Qwen/Qwen2.5-1.5B-Instruct")

    def error_of(argv):
        assert convert_model.main(argv) == 1
        return capsys.readouterr().err

    existing = tmp_path / "exists"
    existing.mkdir()
    assert "already exists" in error_of(["--hf-path", str(tiny_hf_dir), "--output-dir", str(existing)])
    (existing / "notes.txt").write_text("mine")  # nanochat: convert_nanochat.py's rule, an empty folder would do
    assert "not empty" in error_of(["--hf-path", str(tiny_nanochat_ckpt_dir), "--output-dir", str(existing)])
    assert "--overwrite: only for nanochat" in error_of(["--hf-path", str(tiny_hf_dir), "--output-dir",
                                                         str(tmp_path / "f"), "--overwrite"])
    assert "--upload-repo" in error_of(["--hf-path", str(tiny_nanochat_ckpt_dir), "--output-dir",
                                        str(tmp_path / "a"), "--upload-repo", "me/x"])
    assert "--step: only for nanochat" in error_of(["--hf-path", str(tiny_hf_dir), "--output-dir",
                                                     str(tmp_path / "b"), "--step", "3"])
    assert "no model_*.pt" in error_of(["--hf-path", str(tiny_hf_dir), "--nanochat", "--output-dir", str(tmp_path / "c")])
    base_dir = tmp_path / "nanochat_base"
    (base_dir / "chatsft_checkpoints" / "d20").mkdir(parents=True)
    assert "convert_nanochat.py" in error_of(["--hf-path", str(base_dir), "--output-dir", str(tmp_path / "d")])
    assert "cannot read" in error_of(["--hf-path", "not/a/repo/id", "--output-dir", str(tmp_path / "e")])
    with pytest.raises(SystemExit):
        convert_model.parse_args(["--hf-path", "x", "--q-bits", "4"])  # bits without -q
    with pytest.raises(SystemExit):
        convert_model.parse_args(["--hf-path", "x", "-q", "--q-bits", "7"])
    assert {p.name for p in tmp_path.iterdir()} == {"exists", "nanochat_base"}  # nothing half-written


def test_aliases_match_the_original_cli():
    args = convert_model.parse_args(["--hf-path", "x", "-q", "--bits", "2", "--group-size", "128", "--mlx-path", "o"])
    assert (args.q_bits, args.q_group_size, args.output_dir) == (2, 128, "o")
    assert isinstance(args, argparse.Namespace)
