"""nanochat's 2026 architecture: every era converts exactly, decodes like its full forward, loads in plain
mlx_lm.load, is refused where the files are wrong, and trains (quantized copies, LoRA/DoRA/QLoRA, saving)."""

import contextlib
import io
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
from fixture_checkpoint import TINY_2026_CONFIG, build_tiny_2026_checkpoint, tiny_state_dict_2026, write_checkpoint
from mlx.utils import tree_flatten, tree_unflatten

from mlx_grpo import cuda_kernels
from mlx_grpo.models import load_model, save_model_folder
from mlx_grpo.nanochat import eras
from mlx_grpo.nanochat.checkpoint import find_checkpoint
from mlx_grpo.nanochat.convert import convert_checkpoint, main

REPO = Path(__file__).resolve().parents[1]
T = 300  # longer than both windows of the fixture (S = 128, L = 256): every window binds

# ---------------------------------------------------------------------------------------------
# Independent reference: nanochat's forward of each era in float64 numpy, read from the .pt file, with
# the constants of shared/reference/nanochat-2026.md written out here (no code shared with mlx_grpo).
# window: the w of "a query at p sees keys p-w..p" per layer of the fixture (sequence_len 256, 4 layers).
FULL, SSSL = [None] * 4, [128, 128, 128, 256]
REFERENCE_ERAS = {
    "aa530cd": dict(rope=1e4, softcap=15.0, qk=1.0, gate=(0, 0.0), windows=FULL, smear=False),
    "fbc1484": dict(rope=1e4, softcap=15.0, qk=1.0, gate=(0, 0.0), windows=[128, 256, 128, 256], smear=False),
    "e85db6b": dict(rope=1e4, softcap=15.0, qk=1.0, gate=(32, 2.0), windows=SSSL, smear=False),
    "aba30cb": dict(rope=1e4, softcap=20.0, qk=1.0, gate=(32, 2.0), windows=SSSL, smear=False),
    "6ed7d1d": dict(rope=1e5, softcap=15.0, qk=1.15, gate=(12, 3.0), windows=SSSL, smear=False),
    "a825e63": dict(rope=1e5, softcap=15.0, qk=1.2, gate=(12, 3.0), windows=SSSL, smear=True),
}
# How each era's fixture is written and converted: (meta window_pattern, convert_checkpoint options).
FIXTURES = {
    "aa530cd": (None, {}),
    "fbc1484": ("SL", {}),
    "e85db6b": ("SSSL", {}),
    "aba30cb": ("SSSL", {"softcap": 20.0}),
    "6ed7d1d": ("SSSL", {}),
    "a825e63": ("SSSL", {}),
}


def _norm(x):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.finfo(np.float32).eps)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _rotary(x, base):
    # x: (T, H, D), half-split layout, rotation by -theta: y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos.
    length, _, dim = x.shape
    angles = np.outer(np.arange(length), 1.0 / base ** (np.arange(0, dim, 2) / dim))
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    x1, x2 = x[..., : dim // 2], x[..., dim // 2 :]
    return np.concatenate([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], axis=-1)


def reference_logits(w, cfg, ids, era, windows=None):
    c = REFERENCE_ERAS[era]
    windows = c["windows"] if windows is None else windows
    length, C, H, Hkv, n = len(ids), cfg["n_embd"], cfg["n_head"], cfg["n_kv_head"], cfg["n_layer"]
    D, ids = C // H, np.asarray(ids)
    x = _norm(w["transformer.wte.weight"][ids])
    if c["smear"]:
        gate = w["smear_lambda"] * _sigmoid(x[:, :24] @ w["smear_gate.weight"].T)
        x = np.concatenate([x[:1], x[1:] + gate[1:] * x[:-1]])
    x0, x_mid = x, None
    pos = np.arange(length)
    for i in range(n):
        p = lambda name: w[f"transformer.h.{i}.{name}.weight"]  # noqa: E731
        x = w["resid_lambdas"][i] * x + w["x0_lambdas"][i] * x0
        a = _norm(x)
        q = (a @ p("attn.c_q").T).reshape(length, H, D)
        k = (a @ p("attn.c_k").T).reshape(length, Hkv, D)
        v = (a @ p("attn.c_v").T).reshape(length, Hkv, D)
        if f"value_embeds.{i}.weight" in w:
            channels, scale = c["gate"]
            gate = scale * _sigmoid(a[:, :channels] @ p("attn.ve_gate").T)
            v = v + gate[..., None] * w[f"value_embeds.{i}.weight"][ids].reshape(length, Hkv, D)
        q, k = _norm(_rotary(q, c["rope"])) * c["qk"], _norm(_rotary(k, c["rope"])) * c["qk"]
        k, v = np.repeat(k, H // Hkv, axis=1), np.repeat(v, H // Hkv, axis=1)
        allowed = pos[:, None] >= pos[None]
        if windows[i] is not None:
            allowed &= pos[:, None] - pos[None] <= windows[i]
        scores = np.where(allowed, np.einsum("thd,shd->hts", q, k) / np.sqrt(D), -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        x = x + np.einsum("hts,shd->thd", probs, v).reshape(length, C) @ p("attn.c_proj").T
        x = x + (np.maximum(_norm(x) @ p("mlp.c_fc").T, 0) ** 2) @ p("mlp.c_proj").T
        if c["smear"] and i == n // 2:
            x_mid = x
    if x_mid is not None:
        x = x - w["backout_lambda"] * x_mid
    logits = (_norm(x) @ w["lm_head.weight"].T)[:, : cfg["vocab_size"]]
    return c["softcap"] * np.tanh(logits / c["softcap"])


def reference_weights(ckpt_dir):
    state = torch.load(Path(ckpt_dir) / "model_000005.pt", map_location="cpu", weights_only=True)
    return {k: v.double().numpy() for k, v in state.items()}


def token_ids(length=T, seed=0):
    return np.random.default_rng(seed).integers(0, TINY_2026_CONFIG["vocab_size"], size=length).tolist()


# ---------------------------------------------------------------------------------------------
# One converted float32 folder per era


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """era -> (checkpoint dir, float32 MLX folder, the warnings the conversion printed), built on first use."""
    built = {}

    def get(era):
        if era not in built:
            root = tmp_path_factory.mktemp(f"nanochat_{era}")
            pattern, options = FIXTURES[era]
            ckpt = build_tiny_2026_checkpoint(root / "ckpt", era, window_pattern=pattern)
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                convert_checkpoint(find_checkpoint(ckpt), root / "mlx", dtype="float32", **options)
            built[era] = (ckpt, root / "mlx", err.getvalue())
        return built[era]

    return get


@pytest.mark.parametrize("era", list(REFERENCE_ERAS))
def test_logits_match_the_reference_forward_of_each_era(converted, era):
    ckpt, folder, _ = converted(era)
    model, _ = load_model(folder)
    ids = token_ids()
    got = np.array(model(mx.array([ids]))[0], dtype=np.float64)
    weights = reference_weights(ckpt)
    want = reference_logits(weights, TINY_2026_CONFIG, ids, era)
    assert got.shape == want.shape == (T, TINY_2026_CONFIG["vocab_size"])  # padded rows sliced off
    assert want.std() > 1.0, "fixture logits should not be ~0"
    assert np.abs(got - want).max() <= 1e-3
    if REFERENCE_ERAS[era]["windows"] != FULL:  # the test sees the windows: without them the logits differ
        unwindowed = reference_logits(weights, TINY_2026_CONFIG, ids, era, windows=FULL)
        assert np.abs(unwindowed - want).max() > 1e-2


def test_config_states_every_constant_of_the_era(converted):
    _, folder, _ = converted("a825e63")
    config = json.loads((folder / "config.json").read_text())
    assert config == {
        "model_type": "nanochat_2026", "nanochat_era": "a825e63",
        "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 500, "padded_vocab_size": 512, "max_position_embeddings": 256, "intermediate_size": 256,
        "rope_theta": 100000.0, "softcap": 15.0, "qk_scale": 1.2, "rms_norm_eps": float(np.finfo(np.float32).eps),
        "window_pattern": "SSSL", "window_sizes": [128, 128, 128, 256],
        "value_embedding_layers": [1, 3], "ve_gate_channels": 12, "ve_gate_scale": 3.0,
        "smear": True, "smear_gate_channels": 24, "backout_layer": 2,
    }
    meta = json.loads((folder / "nanochat_meta.json").read_text())
    assert meta["conversion"]["era"] == "a825e63" and meta["conversion"]["warnings"] == []


def test_short_windows_follow_each_era_at_nanochat_sizes():
    """S for sequence_len 2048: half until 6ed7d1d, then 768 (a third, FA3 tiles), then 512 (a quarter)."""
    cfg = {"sequence_len": 2048, "vocab_size": 32768, "n_layer": 6, "n_head": 12, "n_kv_head": 12, "n_embd": 1536}
    got = {era.commit: eras.model_config(cfg, eras.Architecture(era, "SSSL", era.softcap))["window_sizes"]
           for era in (eras.WINDOWS, eras.AUTORESEARCH, eras.SMEAR)}
    assert got == {"fbc1484": [1024, 1024, 1024, 2048, 1024, 2048], "6ed7d1d": [768, 768, 768, 2048, 768, 2048],
                   "a825e63": [512, 512, 512, 2048, 512, 2048]}


# ---------------------------------------------------------------------------------------------
# Caches: prefill + decode equal the full forward


def incremental_logits(model, ids, chunks):
    """The logits of ids fed through one cache in chunks of the given sizes."""
    cache, out, start = model.make_cache(), [], 0
    for size in chunks:
        out.append(model(mx.array([ids[start:start + size]]), cache=cache))
        start += size
    assert start == len(ids)
    return np.array(mx.concatenate(out, axis=1)[0])


@pytest.mark.parametrize("era", ["aa530cd", "e85db6b", "a825e63"])
def test_prefill_and_token_by_token_decode_equal_the_full_forward(converted, era):
    model, _ = load_model(converted(era)[1])
    ids = token_ids()
    full = np.array(model(mx.array([ids]))[0])
    # Single steps across the short window (128) and the long one (256); chunks in between.
    chunks = [37] + [1] * 20 + [60] + [1] * 20 + [120] + [1] * 43
    assert np.abs(incremental_logits(model, ids, chunks) - full).max() <= 1e-4


def test_the_engines_batched_decode_merges_filters_and_equals_the_full_forward(converted):
    """Rows of two prompt lengths prefilled apart, merged into one left-padded batch cache (smear state
    included), stepped, filtered: every row's next-token logits are its own full forward's."""
    from mlx_grpo.generation.engine import MlxLmDecoder, make_decoder

    model, _ = load_model(converted("a825e63")[1])
    prompts = [token_ids(140, seed=1), token_ids(40, seed=2)]  # the long one past the short window (128)
    decoder = make_decoder(model, prompts, 2, 50, fast_decode=False)
    assert isinstance(decoder, MlxLmDecoder)
    rows = [list(prompts[0]), list(prompts[0]), list(prompts[1]), list(prompts[1])]
    fed = token_ids(30, seed=3)
    got = [[] for _ in rows]  # per row: the logits of each step

    def steps(live, count):
        for t in range(count):
            logits = np.array(decoder.step(mx.array([rows[r][-1] for r in live])))
            for i, r in enumerate(live):
                got[r].append(logits[i])
                rows[r].append(fed[(t + r) % len(fed)])  # the next token fed to this row

    steps([0, 1, 2, 3], 12)
    keep = [2, 3]  # the short prompt's rows: the common left padding is trimmed
    decoder.filter(mx.array(keep))
    steps(keep, 4)
    for r, row in enumerate(rows):
        full = np.array(model(mx.array([row[:-1]]))[0])  # every token the row fed
        want = full[len(prompts[r // 2]) - 1:]
        assert len(got[r]) == len(want) and np.abs(np.array(got[r]) - want).max() <= 1e-4


# MLX's CUDA matmuls and attention run float32 at TF32-like precision; the CPU's are exact float32
FLOAT32_TOL = 1e-2 if cuda_kernels.runs_on_cuda_gpu() else 1e-4


def full_forward_greedy(model, prompt, steps):
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(np.argmax(np.array(model(mx.array([ids]))[0, -1]))))
    return ids[len(prompt):]


# windows and lambdas; + value embeddings, smear, backout; the same with two cache buffers written in turn
@pytest.mark.parametrize("era, alternate_buffers, by_hand", [("fbc1484", False, False), ("a825e63", False, False),
                                                         ("a825e63", True, False), ("a825e63", True, True)])
def test_the_fast_decoder_runs_the_2026_architecture_like_its_full_forward(converted, era, alternate_buffers, by_hand,
                                                                          monkeypatch):
    """utils/nanochat/decoder.py on the 2026 model: every step's logits are each row's full forward's (windows
    binding, rows filtered, a one-token prompt with no smear predecessor), and greedy rollouts through the
    engine give the full forward's greedy tokens. by_hand: the masked attention written out, as on CUDA."""
    from mlx_grpo.generation.engine import generate_completions, make_decoder
    from mlx_grpo.generation.sampling import make_rollout_sampler
    from mlx_grpo.nanochat import decoder as nanochat_decoder
    from mlx_grpo.nanochat.decoder import NanochatDecoder, supports

    monkeypatch.setattr(nanochat_decoder, "masked_attention_by_hand", lambda: by_hand)

    model, _ = load_model(converted(era)[1])
    assert supports(model)
    prompts = [token_ids(140, seed=1), token_ids(40, seed=2), token_ids(1, seed=3)]  # past S = 128; one token
    decoder = make_decoder(model, prompts, 2, 16)
    assert isinstance(decoder, NanochatDecoder) and not decoder.use_kernel
    if alternate_buffers:
        decoder = NanochatDecoder(model, prompts, 2, 16, alternate_buffers=True)
    rows = [list(prompts[r // 2]) for r in range(6)]
    fed, got = token_ids(30, seed=4), [[] for _ in rows]

    def steps(live, count):
        for t in range(count):
            logits = np.array(decoder.step(mx.array([rows[r][-1] for r in live], dtype=mx.int32)))
            for i, r in enumerate(live):
                got[r].append(logits[i])
                rows[r].append(fed[(t + r) % len(fed)])

    steps(list(range(6)), 10)
    keep = [0, 3, 4]
    decoder.filter(mx.array(keep))
    steps(keep, 6)
    for r, row in enumerate(rows):
        want = np.array(model(mx.array([row[:-1]]))[0])[len(prompts[r // 2]) - 1:]
        assert len(got[r]) == len(want) and np.abs(np.array(got[r]) - want).max() <= FLOAT32_TOL, r

    completions, _ = generate_completions(model, prompts, group_size=2, max_new_tokens=12,
                                          sampler=make_rollout_sampler(0.0), stop_token_ids=set())
    want = [full_forward_greedy(model, p, 12) for p in prompts]
    assert [c.tokens for c in completions] == [w for w in want for _ in range(2)]
    assert len({t for w in want for t in w}) > 3, "greedy decoding of the fixture should not be constant"


def test_a_quantized_rollout_copy_decodes_fast_with_the_model_calls_tokens(converted):
    """A 4-bit rollout copy (quantized value embeddings, plain gates) through the fast decoder: mlx-lm's model
    call on the same copy samples the same greedy tokens."""
    from mlx_grpo.generation.engine import generate_completions
    from mlx_grpo.generation.sampling import make_rollout_sampler
    from mlx_grpo.nanochat.decoder import supports
    from mlx_grpo.training.update import frozen_copy

    copy = frozen_copy(load_model(converted("a825e63")[1])[0], 4, 32)
    assert supports(copy)
    prompts = [token_ids(140, seed=1), token_ids(9, seed=2)]
    kwargs = dict(group_size=2, max_new_tokens=8, sampler=make_rollout_sampler(0.0), stop_token_ids=set())
    fast, _ = generate_completions(copy, prompts, **kwargs)
    slow, _ = generate_completions(copy, prompts, fast_decode=False, **kwargs)
    assert [c.tokens for c in fast] == [c.tokens for c in slow]


@pytest.mark.skipif(not cuda_kernels.runs_on_cuda_gpu(), reason="needs MLX's CUDA backend")
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_the_decode_kernel_runs_the_2026_architecture_like_the_portable_decoder(dtype):
    """utils/cuda_kernels/decode.py with windows, GQA, value embeddings, smear and the QK scale, against the
    portable decoder, on a model of the newest era with heads the kernel takes (the fixture's 16 are too narrow)."""
    from test_cuda_decode import assert_kernel_decodes_as_portable

    from mlx_grpo.nanochat import model as nanochat_2026

    era = eras.ERAS[-1]
    cfg = {**TINY_2026_CONFIG, "n_embd": 128}  # 4 heads of 32, 2 KV heads; S = 128 of sequence_len 256
    model = nanochat_2026.Model(nanochat_2026.ModelArgs.from_dict(
        eras.model_config(cfg, eras.Architecture(era, "SSSL", era.softcap))))
    model.x0_lambdas = mx.full((cfg["n_layer"],), 0.1)  # as a trained model has them, not the init's zeros
    model.smear_lambda, model.backout_lambda = mx.array([0.5]), mx.array([0.2])
    model.set_dtype(dtype)
    assert_kernel_decodes_as_portable(model, [token_ids(140, seed=1), token_ids(40, seed=2), [4]], dtype, steps=10,
                                      filter_at=5)


def test_a_chat_on_the_fast_decoder_keeps_the_smear_state_across_turns(converted):
    """A kept cache (utils/generation/chat.py's ReusableCache) from the fast decoder's row_cache, smear cache
    included: the next turn, prefilled only where it differs, samples what a fresh cache samples."""
    from mlx_grpo.generation.engine import ReusableCache, generate_completions
    from mlx_grpo.generation.sampling import make_rollout_sampler

    model, _ = load_model(converted("a825e63")[1])
    kwargs = dict(group_size=1, max_new_tokens=8, sampler=make_rollout_sampler(0.0), stop_token_ids=set())
    kept = ReusableCache(model)
    first = token_ids(30, seed=5)
    turn1, _ = generate_completions(model, [first], cache=kept, **kwargs)
    second = first + turn1[0].tokens[:5] + token_ids(7, seed=6)  # keeps part of the reply, then differs
    turn2, stats = generate_completions(model, [second], cache=kept, **kwargs)
    assert stats.prompt_tokens == 7
    assert turn2[0].tokens == full_forward_greedy(model, second, 8)


def test_mlx_lm_generation_single_and_batched_matches_greedy_full_forwards(converted):
    """mlx-lm's generate (one row) and batch_generate (right-padded prompts: the smear state is read at each
    row's last real token) give the greedy tokens of the full forward."""
    from mlx_lm import batch_generate, stream_generate

    model, tokenizer = load_model(converted("a825e63")[1])
    prompts = [token_ids(20, seed=4), token_ids(9, seed=5)]

    def greedy(prompt, steps=6):
        """(tokens, their log-probs) of greedy decoding by full forwards."""
        ids, logprobs = list(prompt), []
        for _ in range(steps):
            logits = np.array(model(mx.array([ids]))[0, -1], dtype=np.float64)
            ids.append(int(np.argmax(logits)))
            logprobs.append(logits.max() - np.log(np.exp(logits - logits.max()).sum()) - logits.max())
        return ids[len(prompt):], logprobs

    want = [greedy(p) for p in prompts]
    tokens = sum((w[0] for w in want), [])
    assert not set(tokens) & set(tokenizer.eos_token_ids), "the fixture's greedy must not stop early"
    assert len(set(tokens)) > 2, "greedy decoding of the fixture should not be constant"
    argmax = lambda logprobs: mx.argmax(logprobs, axis=-1)  # noqa: E731
    single = [r.token for r in stream_generate(model, tokenizer, prompts[0], max_tokens=6, sampler=argmax)]
    assert single == want[0][0]
    batched = batch_generate(model, tokenizer, prompts, max_tokens=6, sampler=argmax, return_token_ids=True,
                             return_logprobs=True)
    assert [list(t) for t in batched.token_ids] == [w[0] for w in want]
    assert np.abs(np.array(batched.logprobs) - np.array([w[1] for w in want])).max() <= 1e-4


def test_a_left_padded_batch_prefill_equals_each_rows_full_forward(converted):
    """mlx-lm's batch caches built for left-padded prompts: the smear skips the padding before each first token."""
    from mlx_lm.models.cache import BatchKVCache

    model, _ = load_model(converted("a825e63")[1])
    prompts = [token_ids(150, seed=6), token_ids(60, seed=7)]
    padding = [0, 90]
    cache = [BatchKVCache(padding) for _ in model.make_cache()]
    padded = mx.array([[0] * pad + p for pad, p in zip(padding, prompts)])
    prefill = np.array(model(padded[:, :-1], cache=cache))
    step = np.array(model(padded[:, -1:], cache=cache))
    for row, (pad, prompt) in enumerate(zip(padding, prompts)):
        want = np.array(model(mx.array([prompt]))[0])
        assert np.abs(prefill[row, pad:] - want[:-1]).max() <= 1e-4
        assert np.abs(step[row, 0] - want[-1]).max() <= 1e-4


def test_the_cache_trims_like_mlx_lms(converted):
    """utils/generation/chat.py reuses a trimmed cache across turns and tool calls: after trimming, the
    next tokens see exactly the kept prefix (the smear reads the kept last token)."""
    from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

    model, _ = load_model(converted("a825e63")[1])
    ids, other = token_ids(60, seed=8), token_ids(10, seed=9)
    cache = model.make_cache()
    model(mx.array([ids]), cache=cache)
    assert can_trim_prompt_cache(cache) and trim_prompt_cache(cache, 25) == 25
    got = np.array(model(mx.array([other]), cache=cache)[0])
    want = np.array(model(mx.array([ids[:35] + other]))[0, 35:])
    assert np.abs(got - want).max() <= 1e-4


# ---------------------------------------------------------------------------------------------
# Eras, ambiguities, refusals


def test_the_summary_names_the_era_and_ambiguities_warn_by_name(converted, tmp_path, capsys):
    ckpt, _, printed = converted("e85db6b")
    assert printed.count("\n") == 1 and "softcap 15 or 20" in printed and "aba30cb" in printed
    assert "--softcap 20" in printed
    assert main([str(ckpt), "--output", str(tmp_path / "a"), "--softcap", "20"]) == 0
    out, err = capsys.readouterr()
    assert "the aba30cb (2026-03-02) era" in out and err == ""
    assert json.loads((tmp_path / "a" / "config.json").read_text())["softcap"] == 20.0
    assert "full attention" in converted("aa530cd")[2] and "--window-pattern" in converted("aa530cd")[2]
    assert converted("a825e63")[2] == ""


def test_a_meta_without_window_pattern_warns_and_the_flag_sets_it(tmp_path, capsys):
    ckpt = build_tiny_2026_checkpoint(tmp_path / "sft", "a825e63", window_pattern=None)
    assert main([str(ckpt), "--output", str(tmp_path / "default")]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "records no window_pattern" in err and "8b4849d" in err
    assert json.loads((tmp_path / "default" / "config.json").read_text())["window_pattern"] == "SSSL"
    assert main([str(ckpt), "--output", str(tmp_path / "flag"), "--window-pattern", "sl"]) == 0
    assert capsys.readouterr().err == ""
    assert json.loads((tmp_path / "flag" / "config.json").read_text())["window_sizes"] == [128, 256, 128, 256]


def refusal(tmp_path, capsys, state, model_config=None, tokenizer_size=None, args=()):
    """main() on a checkpoint of these tensors/meta: the one error line; nothing may be written."""
    folder = tmp_path / "ckpt"
    shutil.copytree(build_tiny_2026_checkpoint(tmp_path / "good", "a825e63"), folder)
    write_checkpoint(folder, state, model_config=model_config or {**TINY_2026_CONFIG, "window_pattern": "SSSL"})
    if tokenizer_size is not None:
        from fixture_tokenizer import build_tiny_tokenizer

        build_tiny_tokenizer(folder, vocab_size=tokenizer_size)
    assert main([str(folder), "--output", str(tmp_path / "out"), *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert not (tmp_path / "out").exists()
    return err[0]


HEAD = lambda: tiny_state_dict_2026("a825e63")  # noqa: E731


@pytest.mark.parametrize("extra, names", [
    ({"bigram_embed.embed.weight": torch.zeros(1000, 64), "bigram_lambdas": torch.zeros(4)}, ["engram"]),
    ({"transformer.h.0.attn.new_gate.weight": torch.zeros(2, 8)}, ["no known nanochat era", "92d63d4"]),
])
def test_tensors_of_no_known_era_are_refused_by_name(tmp_path, capsys, extra, names):
    line = refusal(tmp_path, capsys, {**HEAD(), **extra})
    assert all(name in line for name in [*extra, *names]), line


def test_era_mixtures_are_refused(tmp_path, capsys):
    state = HEAD()
    del state["resid_lambdas"], state["x0_lambdas"]
    assert "no resid_lambdas/x0_lambdas" in refusal(tmp_path / "a", capsys, state)
    state = tiny_state_dict_2026("e85db6b")
    state.update({k: v for k, v in HEAD().items() if k.startswith(("smear", "backout"))})
    assert "no nanochat era has both" in refusal(tmp_path / "b", capsys, state)


def test_tensors_that_disagree_with_the_meta_are_refused(tmp_path, capsys):
    line = refusal(tmp_path / "a", capsys, HEAD(), {**TINY_2026_CONFIG, "n_layer": 3, "window_pattern": "SSSL"})
    assert "unexpected tensors" in line and "transformer.h.3.attn.c_q.weight" in line
    line = refusal(tmp_path / "b", capsys, HEAD(), {**TINY_2026_CONFIG, "n_embd": 128, "window_pattern": "SSSL"})
    assert "wrong shape" in line and "meta_000005.json" in line and "(512, 64) != (512, 128)" in line


@pytest.mark.parametrize("change, words", [
    ({"window_pattern": "SSXL"}, ["meta_000005.json", "'SSXL'", "letters other than S and L"]),
    ({"n_head": 3, "n_kv_head": 3}, ["meta_000005.json", "n_head 3", "divide n_embd"]),
    ({"n_kv_head": 3}, ["meta_000005.json", "n_kv_head 3", "must divide n_head"]),
    ({"dropout": 0.1}, ["meta_000005.json", "dropout", "no known nanochat era"]),
])
def test_bad_meta_is_one_line_naming_the_file_and_value(tmp_path, capsys, change, words):
    line = refusal(tmp_path, capsys, HEAD(), {**TINY_2026_CONFIG, "window_pattern": "SSSL", **change})
    assert all(w in line for w in words), line


def test_a_tokenizer_of_another_size_is_refused(tmp_path, capsys):
    line = refusal(tmp_path, capsys, HEAD(), tokenizer_size=520)
    assert "tokenizer.pkl has 520 tokens" in line and "vocab_size 500" in line


@pytest.mark.parametrize("args, words", [
    (["--softcap", "20"], ["a825e63", "softcap is 15"]),
    (["--window-pattern", "SL"], ["contradicts", "'SSSL'"]),
    (["--window-pattern", "SXL"], ["--window-pattern", "letters other than S and L"]),
])
def test_flags_that_contradict_the_checkpoint_are_refused(tmp_path, capsys, args, words):
    line = refusal(tmp_path, capsys, HEAD(), args=args)
    assert all(w in line for w in words), line


# ---------------------------------------------------------------------------------------------
# Plain mlx_lm.load, in a process that has imported nothing of ours


def test_plain_mlx_lm_load_reads_the_folder_through_the_installed_pth(converted, tmp_path):
    """setup.py's build_py output is what pip installs: its .pth makes mlx_lm.models.nanochat_2026 importable."""
    site = tmp_path / "site"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    build = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path),
                            "build_py", "--build-lib", str(site)], cwd=REPO, env=env, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    assert (site / "mlx_grpo-mlx_lm.pth").is_file()
    folder = converted("a825e63")[1]
    script = (
        "import json, site, sys; site.addsitedir(sys.argv[1])\n"
        "assert 'mlx_lm' not in sys.modules and 'mlx_grpo.nanochat.model' not in sys.modules\n"
        "import mlx.core as mx, mlx_lm\n"
        "model, tokenizer = mlx_lm.load(sys.argv[2])\n"
        "assert type(model) is sys.modules['mlx_lm.models.nanochat_2026'].Model\n"
        "ids = tokenizer.encode('How many clips?')\n"
        "print(json.dumps({'file': sys.modules['mlx_grpo'].__file__, 'ids': ids, "
        "'logits': model(mx.array([ids]))[0, -1].tolist()}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(site), str(folder)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # mlx_grpo itself may come from an editable install of this checkout (CI's pip install -e): the
    # built .pth is what put the finder in place either way.
    model, _ = load_model(folder)
    assert np.allclose(out["logits"], np.array(model(mx.array([out["ids"]]))[0, -1]), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Training on it


def test_a_quantized_rollout_copy_keeps_the_architecture(converted):
    from mlx_grpo.training.update import frozen_copy

    model, _ = load_model(converted("a825e63")[1])
    copy = frozen_copy(model, 4, 32)
    attn = copy.transformer.h[1].attn
    assert isinstance(attn.c_q, nn.QuantizedLinear) and isinstance(attn.value_embed, nn.QuantizedEmbedding)
    assert isinstance(attn.ve_gate, nn.Linear) and isinstance(copy.smear_gate, nn.Linear)  # too narrow to quantize
    ids = mx.array([token_ids(160)])
    assert np.corrcoef(np.array(model(ids)).ravel(), np.array(copy(ids)).ravel())[0, 1] > 0.9


@pytest.mark.parametrize("train_type, quant_bits", [("lora", 0), ("dora", 0), ("lora", 4)])
def test_adapters_go_on_the_six_block_matrices_and_round_trip(converted, tmp_path, train_type, quant_bits):
    from mlx_grpo import fuse
    from mlx_grpo.config import GRPOConfig
    from mlx_grpo.training.lora import (
        adapter_modules,
        add_adapters,
        load_adapted_model,
        read_adapter_config,
        save_adapters,
    )
    from mlx_grpo.training.update import ensure_float32

    folder = converted("a825e63")[1]
    model, _ = load_model(folder)
    cfg = GRPOConfig(model_name=str(folder), train_type=train_type, lora_rank=4,
                     base_quant_bits=quant_bits, base_quant_group_size=32)
    adapter_config = add_adapters(model, cfg)
    ensure_float32(model, adapters_only=True)
    matrices = ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    adapted_layers = {f"transformer.h.{i}.{m}" for i in range(4) for m in matrices}
    assert {name for name, _ in adapter_modules(model)} == adapted_layers
    trainable = {k.rsplit(".", 1)[-1] for k, _ in tree_flatten(model.trainable_parameters())}
    assert trainable == ({"lora_a", "lora_b", "m"} if train_type == "dora" else {"lora_a", "lora_b"})
    for name, layer in adapter_modules(model):  # adapters that do something
        layer.lora_b = mx.random.normal(layer.lora_b.shape, key=mx.random.key(len(name))) * 0.05
    ids = mx.array([token_ids(40)])
    adapted = np.array(model(ids))

    save_adapters(tmp_path / "ckpt", model, adapter_config)
    assert read_adapter_config(tmp_path / "ckpt")["lora_parameters"]["keys"] == list(matrices)
    reloaded, _ = load_adapted_model(tmp_path / "ckpt")  # mlx-lm's load_adapters rebuilds the same layers
    assert np.abs(np.array(reloaded(ids)) - adapted).max() <= 1e-5
    fuse.fuse_checkpoint(tmp_path / "ckpt", tmp_path / "fused")  # utils/fuse.py: a nanochat_2026 folder
    fused, _ = load_model(tmp_path / "fused")
    assert type(fused).__module__ == "mlx_grpo.nanochat.model"
    assert np.abs(np.array(fused(ids)) - adapted).max() <= 1e-3


def test_every_new_parameter_trains_in_float32_and_a_saved_folder_loads_back_exactly(converted, tmp_path):
    from mlx_grpo.training.update import ensure_float32

    folder = converted("a825e63")[1]
    model, tokenizer = load_model(folder)
    model.set_dtype(mx.bfloat16)
    ensure_float32(model)
    params = dict(tree_flatten(model.parameters()))
    assert all(v.dtype == mx.float32 for v in params.values())
    ids = mx.array([token_ids(160)])

    def loss_fn(m):
        return nn.losses.cross_entropy(m(ids[:, :-1]), ids[:, 1:]).mean()

    _, grads = nn.value_and_grad(model, loss_fn)(model)
    grads = dict(tree_flatten(grads))
    new = ["resid_lambdas", "x0_lambdas", "smear_gate.weight", "smear_lambda", "backout_lambda",
           "transformer.h.1.attn.ve_gate.weight", "transformer.h.3.attn.value_embed.weight"]
    assert set(grads) == set(params) and all(float(mx.abs(grads[k]).max()) > 0 for k in new)
    model.update(tree_unflatten([(k, params[k] - 1e-2 * grads[k]) for k in params]))
    save_model_folder(tmp_path / "trained", model, tokenizer, folder)
    loaded, _ = load_model(tmp_path / "trained")
    reloaded = dict(tree_flatten(loaded.parameters()))
    assert all(mx.array_equal(v, reloaded[k]) for k, v in tree_flatten(model.parameters()))
    assert json.loads((tmp_path / "trained" / "nanochat_meta.json").read_text())["parent"] == str(folder)


def test_a_trainer_run_resumes_exactly_and_its_checkpoint_answers_in_inference(converted, tmp_path, capsys):
    """mlx-grpo.py on the 2026 model: rollouts from a 4-bit copy (mlx-lm's model call, calculator on),
    full-precision updates, a checkpoint per step; resumed after step 1 it logs and ends as the whole run."""
    from test_trainer import (comparable, interrupted_copy, read_records, run, same_weights, saved_weights,
                             toy_reward_file)

    from mlx_grpo import inference

    folder = converted("a825e63")[1]
    toy_reward_file(tmp_path)
    settings = ("max_train_samples=4", "save_steps=1", "temperature=1.0", "learning_rate=1e-3",
                f"reward_file={tmp_path / 'toy_reward.py'}", "reward_funcs=digit_reward",
                "quantize_for_rollouts=true", "rollout_quant_group_size=32", "eval_samples=1")
    run(tmp_path, folder, *settings, run_name="full")
    full = tmp_path / "out" / "full"
    part = interrupted_copy(full, tmp_path / "out" / "part", step=1, update=1)
    run(tmp_path, folder, *settings, run_name="part", extra_args=["--resume"])
    assert comparable(read_records(part)) == comparable(read_records(full))
    a, b = saved_weights(full, 2), saved_weights(part, 2)
    assert set(a) == set(dict(tree_flatten(load_model(folder)[0].parameters())))
    assert same_weights(a, b)
    checkpoint = full / "checkpoints" / "step_000002"
    assert json.loads((checkpoint / "config.json").read_text())["model_type"] == "nanochat_2026"
    capsys.readouterr()
    assert inference.main(["--model", str(checkpoint), "--prompt", "2+2?", "--temperature", "0",
                           "--max-tokens", "3", "--no-tools"]) == 0
    assert capsys.readouterr().out.strip()
