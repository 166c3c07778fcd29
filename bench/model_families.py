"""Random-weight models of each family bench/grpo_step.py runs, the decode bandwidth bound, and its
side-by-side rollout comparison.

    python bench/grpo_step.py --family qwen3 --rollout-paths     # Qwen3-0.6B's shape, bf16: three rollout paths
    python bench/grpo_step.py --family llama --rollout-paths     # Llama-3.2-1B's shape

--rollout-paths times rollouts only, all on the same model and prompts: our generate_completions on the fast
decoder, the same on mlx-lm's model call (fast_decode=False), and mlx-lm's own BatchGenerator (each row a
prompt of its own, mlx-lm's sampler), each once to warm up and then --steps times.
"""

import json
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.generate import BatchGenerator
from mlx_lm.models import llama, qwen3
from mlx_lm.models import nanochat as october_2025
from mlx_lm.sample_utils import make_sampler

from mlx_grpo.generation.engine import generate_completions, make_decoder
from mlx_grpo.generation.sampling import make_rollout_sampler
from mlx_grpo.nanochat import eras
from mlx_grpo.nanochat import model as nanochat_2026

VOCAB = 65536  # nanochat's October-2025 vocabulary
VOCAB_2026 = 32768  # since 2026

# The shapes of Qwen/Qwen3-0.6B's and meta-llama/Llama-3.2-1B's config.json (weights random: nothing downloads).
QWEN3_0_6B = dict(model_type="qwen3", hidden_size=1024, num_hidden_layers=28, intermediate_size=3072,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, vocab_size=151936,
                  max_position_embeddings=40960, rope_theta=1000000.0, tie_word_embeddings=True)
LLAMA_3_2_1B = dict(model_type="llama", hidden_size=2048, num_hidden_layers=16, intermediate_size=8192,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5, vocab_size=128256,
                    max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True,
                    rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                  "original_max_position_embeddings": 8192, "rope_type": "llama3"})
FAMILIES = {"qwen3": (qwen3, QWEN3_0_6B), "llama": (llama, LLAMA_3_2_1B)}


def _random_weights(model):
    model.set_dtype(mx.float32)  # the trainer's float32 master weights
    mx.eval(model.parameters())
    return model


def build_model(depth, vocab=VOCAB):
    """nanochat's October-2025 architecture (mlx-lm's nanochat model) at this depth, random weights."""
    width = 64 * depth
    args = october_2025.ModelArgs(hidden_size=width, num_hidden_layers=depth, num_attention_heads=width // 128,
                                  num_key_value_heads=width // 128, vocab_size=vocab, intermediate_size=4 * width)
    return _random_weights(october_2025.Model(args))


def build_model_2026(depth, vocab=VOCAB_2026, window_pattern=eras.DEFAULT_WINDOW_PATTERN, sequence_len=2048):
    """nanochat's 2026 architecture (the newest era: value embeddings, smear, backout, windows) at this depth."""
    width = 64 * depth
    cfg = {"sequence_len": sequence_len, "vocab_size": vocab, "n_layer": depth, "n_head": width // 128,
           "n_kv_head": width // 128, "n_embd": width}
    era = eras.ERAS[-1]
    config = eras.model_config(cfg, eras.Architecture(era, window_pattern, era.softcap))
    model = nanochat_2026.Model(nanochat_2026.ModelArgs.from_dict(config))
    # Lambdas as a trained model has them (zeros would skip nothing: the same ops run either way).
    model.x0_lambdas = mx.full((depth,), 0.1)
    model.smear_lambda, model.backout_lambda = mx.array([0.5]), mx.array([0.2])
    return _random_weights(model)


def build_family_model(family, depth=None, vocab=None, overrides=None):
    """A random-weight float32 model of `family` at its config's shape; depth/vocab/overrides change ModelArgs."""
    module, config = FAMILIES[family]
    config = {**config, **(overrides or {})}
    if depth is not None:
        config["num_hidden_layers"] = depth
    if vocab is not None:
        config["vocab_size"] = vocab
    return _random_weights(module.Model(module.ModelArgs(**config)))


NANOCHAT_FAMILIES = ("nanochat", "nanochat_2026")
# What --family builds: (bench/grpo_step.py's args) -> a random-weight float32 model.
BUILDERS = {
    "nanochat": lambda args: build_model(args.depth, args.vocab),
    "nanochat_2026": lambda args: build_model_2026(args.depth, args.vocab, args.window_pattern, args.sequence_len),
    **{family: (lambda args, family=family: build_family_model(family, args.depth, args.vocab, args.model_args))
       for family in FAMILIES},
}


def count_params(model):
    return sum(v.size for _, v in tree_flatten(model.parameters()))


def decode_read_params(model):
    """Parameters a decode step reads (and the matmuls' FLOPs count): all but the embedding tables, token and
    value embeddings (one row each), plus the head when it is the tied input embedding."""
    params = count_params(model) - sum(m.weight.size for _, m in model.named_modules() if isinstance(m, nn.Embedding))
    if getattr(model.args, "tie_word_embeddings", False):
        params += model.model.embed_tokens.weight.size
    return params


def kv_layers(model):
    """(key width = kv heads x head dim, window or None) of each layer."""
    if hasattr(model, "transformer"):  # nanochat, both architectures
        windows = getattr(model.args, "window_sizes", None) or [None] * len(model.layers)
        return [(b.attn.c_k.weight.shape[0], window) for b, window in zip(model.layers, windows)]
    return [(b.self_attn.k_proj.weight.shape[0], None) for b in model.layers]


def decode_shape(model):
    """What a decode step reads of this model (before adapters are added): (weight parameters, kv_layers)."""
    return decode_read_params(model), kv_layers(model)


def decode_bound_seconds(shape, rows, prompt_lens, new_tokens, bytes_per_weight, bandwidth_tbs):
    """Seconds to read the weights and the KV cache (bf16; a window's part of it) once per decode step, for a
    model of this decode_shape."""
    read_params, layers = shape
    weight_bytes = read_params * bytes_per_weight
    mean_prompt = float(np.mean(prompt_lens))
    total = 0.0
    for step in range(new_tokens):
        context = mean_prompt + step
        # K and V in bf16; a window reads window + 1 keys at most
        kv_bytes = sum(2 * rows * (context if w is None else min(context, w + 1)) * kv * 2 for kv, w in layers)
        total += (weight_bytes + kv_bytes) / (bandwidth_tbs * 1e12)
    return total


def _batch_generator_rollout(model, prompts, group, new_tokens, temperature, top_k):
    rows = len(prompts) * group
    gen = BatchGenerator(model, max_tokens=new_tokens, sampler=make_sampler(temp=temperature, top_k=top_k),
                         completion_batch_size=rows, prefill_batch_size=rows)
    gen.insert([p for p in prompts for _ in range(group)])
    generated = 0
    while responses := gen.next_generated():
        generated += len(responses)
    gen.close()
    return generated


def compare_rollout_paths(args, model, rng):
    """Time the three rollout paths on `model` (cast to args.compute_dtype) with the same prompts each step."""
    model.set_dtype(mx.bfloat16 if args.compute_dtype == "bfloat16" else mx.float32)
    mx.eval(model.parameters())
    vocab = model.args.vocab_size
    sampler = make_rollout_sampler(args.temperature, top_k=args.top_k)
    probe = make_decoder(model, [[1, 2]], 1, 1)
    fast_name = type(probe).__name__
    del probe

    def ours(prompts, fast):
        completions, stats = generate_completions(model, prompts, group_size=args.group, max_new_tokens=args.new_tokens,
                                                  sampler=sampler, stop_token_ids=set(), fast_decode=fast)
        return stats.generated_tokens

    paths = {f"generate_completions ({fast_name})": lambda p: ours(p, True),
             "generate_completions (mlx-lm model call)": lambda p: ours(p, False),
             "mlx-lm BatchGenerator": lambda p: _batch_generator_rollout(model, p, args.group, args.new_tokens,
                                                                         args.temperature, args.top_k)}
    steps = []
    for step in range(args.steps + 1):
        lens = rng.integers(int(args.prompt_len * 0.8), int(args.prompt_len * 1.2) + 1, size=args.prompts)
        prompts = [rng.integers(0, vocab - 9, size=n).tolist() for n in lens]
        bound = decode_bound_seconds(decode_shape(model), len(prompts) * args.group, lens, args.new_tokens,
                                     mx.bfloat16.size if args.compute_dtype == "bfloat16" else 4, args.bandwidth_tbs)
        row = {}
        for name, run in paths.items():
            mx.synchronize()
            start = time.perf_counter()
            generated = run(prompts)
            mx.synchronize()
            seconds = time.perf_counter() - start
            row[name] = {"tok_s": generated / seconds, "seconds": seconds, "vs_bandwidth_bound": bound / seconds}
        label = "warm-up" if step == 0 else f"step {step}"
        print(f"[{label}] " + "; ".join(f"{k}: {v['tok_s']:.0f} tok/s ({v['vs_bandwidth_bound']:.1%} of the "
                                        f"bandwidth bound)" for k, v in row.items()), flush=True)
        if step > 0:
            steps.append(row)
    names = list(paths)
    summary = {name: {key: float(np.mean([s[name][key] for s in steps])) for key in steps[0][name]} for name in names}
    summary["fast_over_model_call"] = summary[names[0]]["tok_s"] / summary[names[1]]["tok_s"]
    summary["fast_over_batch_generator"] = summary[names[0]]["tok_s"] / summary[names[2]]["tok_s"]
    summary.update({"family": args.family, "shape": f"{args.prompts}x{args.group}x{args.new_tokens}",
                    "device": str(mx.default_device()), "mlx": mx.__version__})
    print("[mean] " + json.dumps(summary))
    return summary
