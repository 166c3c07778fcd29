"""Random-weight models of each family bench/grpo_step.py runs, and its side-by-side rollout comparison.

    python bench/grpo_step.py --family qwen3 --rollout-paths     # Qwen3-0.6B's shape, bf16: three rollout paths
    python bench/grpo_step.py --family llama --rollout-paths     # Llama-3.2-1B's shape

--rollout-paths times rollouts only, all on the same model and prompts: our generate_completions on the fast
decoder, the same on mlx-lm's model call (fast_decode=False), and mlx-lm's own BatchGenerator (each row a
prompt of its own, mlx-lm's sampler), each once to warm up and then --steps times.
"""

import json
import time

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.generate import BatchGenerator
from mlx_lm.models import llama, nanochat, qwen3
from mlx_lm.sample_utils import make_sampler

from mlx_grpo.generation.engine import generate_completions, make_decoder
from mlx_grpo.generation.sampling import make_rollout_sampler

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


def build_family_model(family, depth=None, vocab=None, overrides=None):
    """A random-weight float32 model of `family` at its config's shape; depth/vocab/overrides change ModelArgs."""
    module, config = FAMILIES[family]
    config = {**config, **(overrides or {})}
    if depth is not None:
        config["num_hidden_layers"] = depth
    if vocab is not None:
        config["vocab_size"] = vocab
    model = module.Model(module.ModelArgs(**config))
    model.set_dtype(mx.float32)  # the trainer's float32 master weights
    mx.eval(model.parameters())
    return model


def model_dims(model):
    """(layers, hidden size, vocab, key width = kv heads x head dim, bytes-per-step parameter count): the
    parameters read once per decode step are all but an untied input embedding (a tied one is the head)."""
    if isinstance(model.args, nanochat.ModelArgs):
        a = model.args
        embed, tied = model.transformer.wte, False
        kv_width = a.num_key_value_heads * (a.hidden_size // a.num_attention_heads)
    else:
        a = model.args
        attn = model.layers[0].self_attn
        embed, tied = model.model.embed_tokens, a.tie_word_embeddings
        kv_width = attn.n_kv_heads * (attn.k_proj.weight.shape[0] // attn.n_kv_heads)
    params = sum(v.size for _, v in tree_flatten(model.parameters()))
    read = params - (0 if tied else embed.weight.size)
    return a.num_hidden_layers, a.hidden_size, a.vocab_size, kv_width, read


def decode_bound_seconds(model, rows, prompt_lens, new_tokens, bytes_per_weight, bandwidth_tbs):
    """Seconds to read the weights and the KV cache (bf16) once per decode step, at `bandwidth_tbs`."""
    layers, _, _, kv_width, read = model_dims(model)
    mean_prompt = float(np.mean(prompt_lens))
    total = 0.0
    for step in range(new_tokens):
        kv_bytes = 2 * layers * rows * (mean_prompt + step) * kv_width * 2  # K and V
        total += (read * bytes_per_weight + kv_bytes) / (bandwidth_tbs * 1e12)
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
    vocab = model_dims(model)[2]
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
        bound = decode_bound_seconds(model, len(prompts) * args.group, lens, args.new_tokens,
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
