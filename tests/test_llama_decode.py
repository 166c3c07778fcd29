"""The fast Llama/Qwen decoder (utils/generation/llama_decoder.py) against mlx-lm's own generation, on tiny
random-weight models of each family built from mlx-lm's ModelArgs."""


import mlx.core as mx
import numpy as np
import pytest
from conftest import bench_main
from mlx_lm.generate import BatchGenerator, generate_step
from mlx_lm.models import llama, qwen2, qwen3
from mlx_lm.models.rope_utils import initialize_rope
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import quantize_model

from mlx_grpo import cuda_kernels
from mlx_grpo.generation import llama_decoder
from mlx_grpo.generation.engine import MlxLmDecoder, ReusableCache, generate_completions, make_decoder
from mlx_grpo.generation.sampling import make_rollout_sampler
from mlx_grpo.nanochat import decoder as nanochat_decode

on_cuda = pytest.mark.skipif(not cuda_kernels.runs_on_cuda_gpu(), reason="needs MLX's CUDA backend")

VOCAB = 96
LLAMA3_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_type": "llama3"}
COMMON = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=96, num_attention_heads=4, vocab_size=VOCAB)
FAMILIES = {
    # Llama 3: GQA 4:1, llama3 rope scaling (its short original context makes every frequency band differ), untied.
    "llama": lambda **o: llama.Model(llama.ModelArgs(**{
        **COMMON, "model_type": "llama", "num_key_value_heads": 1, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": LLAMA3_ROPE, "max_position_embeddings": 128, "tie_word_embeddings": False, **o})),
    "llama_biases": lambda **o: llama.Model(llama.ModelArgs(**{
        **COMMON, "model_type": "llama", "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "attention_bias": True,
        "mlp_bias": True, "rope_scaling": {"type": "linear", "factor": 2.0}, **o})),
    # Qwen2: q/k/v biases, tied embeddings.
    "qwen2": lambda **o: qwen2.Model(qwen2.ModelArgs(**{
        **COMMON, "model_type": "qwen2", "num_key_value_heads": 2, "rms_norm_eps": 1e-6, **o})),
    # Qwen3: q/k norms before RoPE, head_dim 32 != hidden / heads.
    "qwen3": lambda **o: qwen3.Model(qwen3.ModelArgs(**{
        **COMMON, "model_type": "qwen3", "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "max_position_embeddings": 512,
        "head_dim": 32, "tie_word_embeddings": True, "rope_theta": 1e6, **o})),
}
KERNEL_HEADS = {"llama": {"head_dim": 32}, "qwen2": {"hidden_size": 128}, "qwen3": {}}  # head_dim 32: the kernel's
PROMPTS = [[1, 5, 9, 11, 3, 8, 2, 6, 4], [2, 7], [4, 4, 8, 1]]  # ragged: left padding / per-prompt lengths


def build(family, quantize=False, seed=0, **overrides):
    mx.random.seed(seed)
    model = FAMILIES[family](**overrides)
    model.set_dtype(mx.float32)
    if quantize:  # as the trainer's quantized rollout copy is made (utils/training/update.py's frozen_copy)
        model, _ = quantize_model(model, {}, group_size=32, bits=8)
    mx.eval(model.parameters())
    return model


def mlx_lm_greedy(model, prompt, n):
    """mlx-lm's own single-sequence generation (generate_step), greedy."""
    tokens = []
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=n, sampler=lambda x: mx.argmax(x, axis=-1)):
        tokens.append(int(token))
    return tokens


def batch_generator_greedy(model, prompts, n):
    """mlx-lm's BatchGenerator (its batched decoding of ragged prompts), greedy."""
    gen = BatchGenerator(model, max_tokens=n)
    uids = gen.insert(prompts)
    tokens = {uid: [] for uid in uids}
    while responses := gen.next_generated():
        for r in responses:
            tokens[r.uid].append(r.token)
    gen.close()
    return [tokens[u] for u in uids]


@pytest.mark.parametrize("family, quantize", [("llama", False), ("llama_biases", False), ("qwen2", False),
                                              ("qwen3", False), ("qwen3", True)])
def test_greedy_rollouts_equal_mlx_lms_generation(family, quantize):
    model = build(family, quantize)
    n = 12
    decoder = make_decoder(model, PROMPTS, 2, n)
    assert type(decoder) is llama_decoder.LlamaDecoder
    completions, _ = generate_completions(model, PROMPTS, group_size=2, max_new_tokens=n,
                                          sampler=make_rollout_sampler(0.0), stop_token_ids=set())
    ours = [c.tokens for c in completions]
    theirs = [mlx_lm_greedy(model, p, n) for p in PROMPTS]
    assert ours == [t for t in theirs for _ in range(2)]
    assert batch_generator_greedy(model, PROMPTS, n) == theirs


def assert_same_steps(fast, slow, steps, atol, rtol, keep_after=None, keep=None):
    """Greedy decode on both decoders (group size 2) from the same first tokens, the rows in `keep` only from
    step `keep_after` on; every step's logits must agree."""
    tokens = mx.array([p[-1] for p in PROMPTS for _ in range(2)], dtype=mx.int32)
    for t in range(steps):
        if t == keep_after:
            fast.filter(mx.array(keep))
            slow.filter(mx.array(keep))
            tokens = tokens[mx.array(keep)]
        a, b = (d.step(tokens).astype(mx.float32) for d in (fast, slow))
        np.testing.assert_allclose(np.array(a), np.array(b), atol=atol, rtol=rtol)
        tokens = mx.argmax(b, axis=-1).astype(mx.int32)


@pytest.mark.parametrize("family, by_hand", [("llama", False), ("qwen3", False), ("llama", True), ("qwen3", True)])
def test_step_logits_equal_mlx_lm_model_call_through_compaction(family, by_hand, monkeypatch):
    """by_hand: the masked attention written out, as on CUDA (nanochat's decoder.attention_by_gemm)."""
    monkeypatch.setattr(nanochat_decode, "masked_attention_by_hand", lambda: by_hand)
    model = build(family)
    fast, slow = llama_decoder.LlamaDecoder(model, PROMPTS, 2, 7), MlxLmDecoder(model, PROMPTS, 2)
    assert_same_steps(fast, slow, 7, atol=2e-5, rtol=1e-5, keep_after=3, keep=[0, 3, 5])


def test_a_kept_chat_cache_continues_on_the_fast_decoder():
    model = build("qwen3")
    kwargs = dict(group_size=1, max_new_tokens=5, sampler=make_rollout_sampler(0.0), stop_token_ids=set())
    cache = ReusableCache(model)
    first, _ = generate_completions(model, [PROMPTS[0]], cache=cache, **kwargs)
    follow_up = PROMPTS[0] + first[0].tokens + [3, 1]
    second, _ = generate_completions(model, [follow_up], cache=cache, **kwargs)
    assert second[0].tokens == mlx_lm_greedy(model, follow_up, 5)


def test_one_token_prompts():
    model = build("qwen2")
    completions, _ = generate_completions(model, [[3], [5]], group_size=2, max_new_tokens=4,
                                          sampler=make_rollout_sampler(0.0), stop_token_ids=set())
    assert [c.tokens for c in completions] == [mlx_lm_greedy(model, p, 4) for p in ([3], [5]) for _ in range(2)]


def test_other_models_keep_mlx_lms_path():
    model = build("llama")
    linear_to_lora_layers(model, 1, {"rank": 2, "scale": 1.0, "dropout": 0.0})  # adapters: not plain linears
    assert not llama_decoder.supports(model)
    assert type(make_decoder(model, PROMPTS, 1, 2)) is MlxLmDecoder
    sliding = llama.Model(llama.ModelArgs(model_type="llama", num_key_value_heads=2, rms_norm_eps=1e-5,
                                          layer_types=["sliding_attention", "full_attention"], sliding_window=4,
                                          **COMMON))
    assert not llama_decoder.supports(sliding)
    yarn = qwen3.Model(qwen3.ModelArgs(
        model_type="qwen3", num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=512, head_dim=16,
        tie_word_embeddings=True, rope_theta=1e6,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}, **COMMON))
    assert not llama_decoder.supports(yarn)
    assert llama_decoder.supports(build("qwen3"))
    mistral = llama.Model(llama.ModelArgs(model_type="mistral", num_key_value_heads=2, rms_norm_eps=1e-5, **COMMON))
    assert llama_decoder.supports(mistral)  # mlx-lm loads model type mistral with its llama module


@pytest.mark.parametrize("scaling", [None, {"type": "linear", "factor": 2.0}, LLAMA3_ROPE])
def test_kernel_rope_frequencies_are_the_rope_modules(scaling):
    """The CUDA kernel's RoPE is mx.fast.rope with these freqs: on the CPU, check them against mlx-lm's module."""
    rope = initialize_rope(32, 500000.0, False, scaling, 128)
    x = mx.random.normal((3, 2, 1, 32))
    positions = mx.array([0, 17, 300])
    # All on the CPU, the frequencies too: the formula is the question, and CUDA's pow and RoPE from a base round
    # differently (at position 300 by more than the tolerance).
    with mx.stream(mx.cpu):
        freqs = llama_decoder._kernel_rope_freqs(rope, 32)
        ours = mx.fast.rope(x, 32, traditional=False, base=None, scale=1.0, offset=positions, freqs=freqs)
        np.testing.assert_allclose(np.array(ours), np.array(rope(x, offset=positions)), atol=1e-5)
    assert llama_decoder._kernel_rope_freqs(initialize_rope(32, 1e4, True, None, 128), 32) is None


def emulated_decode_attention(qkv, inv_freq, step, row_prompt, prompt_len, prompt_k, prompt_v, generated_kv, window,
                              n_heads, n_kv_heads, head_dim, eps, scale, qk_norm=True, pre_rope_norm=None):
    """utils/cuda_kernels/decode.py's decode_attention in MLX ops (qk_norm=False: RoPE only, or Qwen3's norms
    before it), cache write included."""
    assert not qk_norm and int(window[0].item()) >= prompt_k.shape[2] + generated_kv.shape[3]  # no window
    rows, t, qk_heads = qkv.shape[0], int(step[0].item()), n_heads + n_kv_heads
    x = qkv.reshape(rows, qk_heads + n_kv_heads, 1, head_dim)
    if pre_rope_norm is not None:
        q_weight, k_weight = pre_rope_norm
        x = mx.concatenate([mx.fast.rms_norm(x[:, :n_heads], q_weight, eps),
                            mx.fast.rms_norm(x[:, n_heads:qk_heads], k_weight, eps), x[:, qk_heads:]], axis=1)
    lens = prompt_len[row_prompt]
    qk = mx.fast.rope(x[:, :qk_heads], head_dim, traditional=False, base=None, scale=1.0, offset=lens + t,
                      freqs=1.0 / inv_freq)
    generated_kv[:, 0, :, t:t + 1] = qk[:, n_heads:]
    generated_kv[:, 1, :, t:t + 1] = x[:, qk_heads:]
    keys = mx.concatenate([prompt_k[row_prompt], generated_kv[:, 0]], axis=2)
    values = mx.concatenate([prompt_v[row_prompt], generated_kv[:, 1]], axis=2)
    width, capacity = prompt_k.shape[2], generated_kv.shape[3]
    column = mx.arange(width + capacity)[None]
    mask = (column < lens[:, None]) | ((column >= width) & (column <= width + t))
    out = mx.fast.scaled_dot_product_attention(qk[:, :n_heads], keys, values, scale=scale,
                                               mask=mask[:, None, None, :])
    return out.reshape(rows, -1)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_the_kernel_layout_with_an_emulated_kernel_equals_mlx_lm(family, monkeypatch):
    """The CUDA path's wiring (each prompt's keys once, q/k/v as the kernel reads them, its RoPE frequencies,
    compaction) on the CPU, with the kernel replaced by the same math in MLX ops."""
    monkeypatch.setattr(cuda_kernels, "available", lambda: True)
    model = build(family, **KERNEL_HEADS[family])
    calls = []
    monkeypatch.setattr(llama_decoder.cuda_decode, "decode_attention",
                        lambda *a, **k: calls.append(k["pre_rope_norm"]) or emulated_decode_attention(*a, **k))
    fast, slow = llama_decoder.LlamaDecoder(model, PROMPTS, 2, 6), MlxLmDecoder(model, PROMPTS, 2)
    assert fast.use_kernel
    tol = 1e-2 if cuda_kernels.runs_on_cuda_gpu() else 5e-5  # CUDA's float32 matmuls run at TF32-like precision
    assert_same_steps(fast, slow, 6, atol=tol, rtol=1e-5, keep_after=3, keep=[1, 2, 5])
    assert calls and all((w is not None) == (family == "qwen3") for w in calls)  # Qwen3's norms go to the kernel


@on_cuda
@pytest.mark.parametrize("family, dtype", [("llama", mx.float32), ("qwen3", mx.float32), ("qwen2", mx.bfloat16),
                                           ("qwen3", mx.bfloat16)])
def test_cuda_kernel_matches_the_portable_path(family, dtype):
    model = build(family, **KERNEL_HEADS[family])
    model.set_dtype(dtype)
    kernel, portable = (llama_decoder.LlamaDecoder(model, PROMPTS, 2, 6, use_kernel=k) for k in (True, False))
    assert kernel.use_kernel and not portable.use_kernel
    tol = 1e-2 if dtype == mx.float32 else 0.15  # MLX's CUDA attention and matmuls run float32 at TF32-like precision
    assert_same_steps(kernel, portable, 6, atol=tol, rtol=0, keep_after=3, keep=[0, 4, 5])


def test_bench_compares_the_three_rollout_paths():
    tiny = '{"hidden_size": 64, "num_hidden_layers": 1, "intermediate_size": 64, "num_attention_heads": 4, ' \
           '"num_key_value_heads": 2, "head_dim": 16, "vocab_size": 128}'
    summary = bench_main("grpo_step.py", ["--family", "qwen3", "--model-args", tiny, "--prompts", "2", "--group", "2",
                             "--prompt-len", "5", "--new-tokens", "4", "--steps", "1", "--rollout-paths",
                             "--compute-dtype", "float32"])
    assert summary["generate_completions (LlamaDecoder)"]["tok_s"] > 0
    assert summary["fast_over_model_call"] > 0 and summary["fast_over_batch_generator"] > 0
