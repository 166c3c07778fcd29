"""The embedded demo: the committed model and data, the script that makes them, and a short GRPO run."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import trainer_main
from mlx.utils import tree_flatten

from mlx_grpo.demo.build import (
    DemoSettings,
    init_nanochat_weights,
    model_config_of,
    render_sft_example,
    round_embedding_to_bf16,
    tokenizer_texts,
    write_nanochat_checkpoint,
)
from mlx_grpo.demo.synthetic_math import generate_problem, generate_problems, write_dataset
from mlx_grpo.models import load_model
from mlx_grpo.nanochat.checkpoint import find_checkpoint
from mlx_grpo.nanochat.convert import convert_checkpoint, mlx_config
from mlx_grpo.nanochat.folder import build_model, read_nanochat_meta
from mlx_grpo.nanochat.tokenizer import (
    NANOCHAT_SPECIAL_TOKENS,
    TiktokenTokenizerWrapper,
    nanochat_tokenizer,
    train_tokenizer,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = REPO_ROOT / "demo" / "model"
DEMO_DATA = REPO_ROOT / "demo" / "data"


def test_committed_demo_model_is_a_converted_nanochat_model():
    model, tokenizer, config = load_model(DEMO_MODEL, return_config=True)
    tok = nanochat_tokenizer(tokenizer)
    assert tok is not None and tok.vocab_size == config["vocab_size"]
    assert config["model_type"] == "nanochat"
    # nanochat's specials take the last 9 ids, in nanochat's order.
    assert [tok.encode_special(t) for t in NANOCHAT_SPECIAL_TOKENS] == list(range(tok.vocab_size - 9, tok.vocab_size))
    meta = read_nanochat_meta(DEMO_MODEL)
    assert meta["conversion"]["dtype"] == "float32" and meta["source"] == "utils/demo/build.py"
    assert all(v.dtype == mx.float32 for _, v in tree_flatten(model.parameters()))
    size = sum(p.stat().st_size for p in DEMO_MODEL.iterdir())
    assert size < 4_000_000, "the committed demo model should stay a few MB at most"
    prompt = tok.apply_chat_template([{"role": "user", "content": "Mia has 3 apples."}], add_generation_prompt=True)
    assert mx.all(mx.isfinite(model(mx.array(prompt)[None]))).item()


def test_committed_data_is_what_the_generator_makes(tmp_path):
    settings = read_nanochat_meta(DEMO_MODEL)["settings"]
    write_dataset(tmp_path, settings["num_train"], settings["num_test"], settings["seed"])
    for split in ("train", "test"):
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (DEMO_DATA / f"{split}.jsonl").read_bytes(), split
    train = {json.loads(line)["question"] for line in (DEMO_DATA / "train.jsonl").open(encoding="utf-8")}
    test = [json.loads(line)["question"] for line in (DEMO_DATA / "test.jsonl").open(encoding="utf-8")]
    assert not train & set(test), "held-out questions must not appear in train"


@pytest.fixture(scope="module")
def tiny_tokenizer():
    encoding = train_tokenizer(tokenizer_texts(generate_problems(200, seed=0)), vocab_size=300)
    return encoding, TiktokenTokenizerWrapper(encoding)


def test_tokenizer_is_trained_like_nanochat_and_deterministically(tiny_tokenizer):
    encoding, tok = tiny_tokenizer
    again = train_tokenizer(tokenizer_texts(generate_problems(200, seed=0)), vocab_size=300)
    assert again._mergeable_ranks == encoding._mergeable_ranks
    assert encoding.n_vocab == 300 and tok.bos_token_id == 291 and tok.output_end_id == 299
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(["a b c"], vocab_size=200)
    with pytest.raises(ValueError, match="lower vocab_size"):
        train_tokenizer(["a b c"], vocab_size=400)


def test_sft_rendering_trains_on_the_assistant_but_not_on_tool_outputs(tiny_tokenizer):
    _, tok = tiny_tokenizer
    import random

    problem = generate_problem(random.Random(1), "mul_add")
    ids, mask = render_sft_example(tok, problem.question, problem.solution)
    assert len(ids) == len(mask)
    prompt = tok.apply_chat_template([{"role": "user", "content": problem.question}], add_generation_prompt=True)
    assert ids[: len(prompt)] == prompt and not any(mask[: len(prompt)])
    assert ids[-1] == tok.assistant_end_id and mask[-1] == 1
    inside_output = False
    for token, trained in zip(ids, mask):
        if token == tok.output_start_id:
            inside_output = True
        if inside_output or token == tok.output_end_id:
            assert trained == 0
        if token == tok.output_end_id:
            inside_output = False
        if token in (tok.python_start_id, tok.python_end_id):
            assert trained == 1
    assert ids.count(tok.python_start_id) == 2


def test_written_checkpoint_converts_to_the_same_model(tiny_tokenizer, tmp_path):
    encoding, tok = tiny_tokenizer
    settings = DemoSettings(depth=1, width=32, num_heads=1, sequence_len=64)
    model_config = model_config_of(settings, tok.vocab_size)
    model = build_model(mlx_config(model_config))
    init_nanochat_weights(model, seed=0)
    # nanochat's init zeroes the output projections and the head; fill them so every weight matters below.
    zeros = [(n, mx.random.normal(w.shape, key=mx.random.key(i)) * 0.1)
             for i, (n, w) in enumerate(tree_flatten(model.parameters())) if not w.any().item()]
    assert len(zeros) == 3  # lm_head, attn.c_proj, mlp.c_proj
    model.load_weights(zeros, strict=False)
    round_embedding_to_bf16(model)
    ckpt = write_nanochat_checkpoint(tmp_path / "ckpt", model, model_config, encoding, step=7, extra_meta={"x": 1})
    assert sorted(p.name for p in ckpt.iterdir()) == ["meta_000007.json", "model_000007.pt", "tokenizer.pkl"]
    convert_checkpoint(find_checkpoint(ckpt), tmp_path / "mlx", dtype="float32")
    converted, tokenizer = load_model(tmp_path / "mlx")
    assert nanochat_tokenizer(tokenizer).encoding._mergeable_ranks == encoding._mergeable_ranks
    x = mx.array([tok.encode("Mia has 12 apples.")])
    assert np.array_equal(np.array(converted(x)), np.array(model(x)))


def test_short_demo_run_raises_accuracy(tmp_path, monkeypatch):
    # A shortened configs/demo.toml: same model, data and settings, fewer steps, no plots.
    monkeypatch.chdir(REPO_ROOT)
    history = trainer_main([
        "--config", "configs/demo.toml",
        "--set", f"output_dir={tmp_path}", "--set", "run_name=short",
        "--set", "max_train_samples=160", "--set", "eval_steps=0", "--set", "plot=false",
        "--set", "learning_rate=3e-4",
    ])
    before, after = history[0]["eval/accuracy"], history[-1]["eval/accuracy"]
    assert after > before + 0.02, (before, after)
