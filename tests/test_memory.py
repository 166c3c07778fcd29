"""The memory plan (utils/training/memory.py): sizes by hand, the plan against measured peaks on the CPU,
the fit check and its cheapest fix, --plan loading nothing, the backend "auto" keys, gradient checkpointing,
and the per-Mac-size configs fitting their class."""

import dataclasses
import json
import runpy
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import REPO, trainer_main

from mlx_grpo.config import ConfigChange, ConfigError, GRPOConfig, load_config, validate
from mlx_grpo.training import memory
from mlx_grpo.training.backend import resolve_for_backend, resolve_headroom, resolve_kv_buffers
from mlx_grpo.training.memory import (
    GB,
    MemoryPlanError,
    ModelDims,
    check_fits,
    checkpoint_blocks,
    model_dims,
    plan_memory,
    quantized_bytes,
)

DEMO_MODEL_CONFIG = json.loads((REPO / "demo" / "model" / "config.json").read_text())
D20 = json.loads((REPO / "configs" / "models" / "nanochat-d20.json").read_text())
D32 = json.loads((REPO / "configs" / "models" / "nanochat-d32.json").read_text())
QWEN2_MOE = {"model_type": "qwen2_moe", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64, "rms_norm_eps": 1e-6,
             "num_experts_per_tok": 2, "num_experts": 4, "moe_intermediate_size": 32,
             "shared_expert_intermediate_size": 64}
bench = runpy.run_path(str(REPO / "bench" / "memory_plan.py"), run_name="memory_plan_bench")


def test_model_dims_count_nanochat_parameters_by_hand():
    dims = model_dims(D20)
    # embedding + head (65536 x 1280 each) + 20 blocks of q, k, v, proj (1280^2 each) and fc, proj (4 x 1280^2 each)
    assert dims.params == 2 * 65536 * 1280 + 20 * 12 * 1280 ** 2 == 560_988_160
    assert (dims.layers, dims.hidden, dims.heads, dims.kv_dim, dims.intermediate, dims.vocab) == (
        20, 1280, 10, 1280, 5120, 65536)
    assert mx.get_active_memory() < 100e6  # the lazy model allocated nothing like its 2.2 GB


def test_lora_adapters_are_counted_on_the_lazy_model():
    cfg = validate(GRPOConfig(model_name="x", train_type="lora", lora_rank=8))
    dims = model_dims(DEMO_MODEL_CONFIG, cfg)
    # 2 blocks x rank 8 x (in + out) of c_q, c_k, c_v, c_proj (64 + 64) and c_fc (64 + 256), c_proj (256 + 64)
    assert dims.adapters == 2 * 8 * (4 * 128 + 2 * 320)


def test_quantized_bytes_by_hand():
    dims = ModelDims(params=128 * 64 + 10, layers=1, hidden=64, heads=1, kv_dim=64, intermediate=256, vocab=128,
                     quantizable=((128 * 64, 64), (10, 5)))  # the second's width 5 is not divisible: stays dense
    # 4 bits: half a byte per weight; a bf16 scale and bias per 64 weights; the 10 others bf16
    assert quantized_bytes(dims, 4, 64, 2) == 128 * 64 // 2 + 2 * 128 * 2 + 10 * 2


def test_resident_and_update_parts_add_up_by_hand():
    cfg = validate(GRPOConfig(model_name="x", quantize_for_rollouts=False, beta=0.0, pad_to_multiple_of=1,
                              prefill_align=1, compute_dtype="float32", share_prompt_forward=False))
    dims = model_dims(DEMO_MODEL_CONFIG)
    plan = plan_memory(dims, cfg, available=10 * GB, source="test")
    assert plan.resident == {"policy": 4 * dims.params, "optimizer": 8 * dims.params, "reference": 0}
    assert "old_policy" not in plan.phases and "reference" not in plan.phases  # on-policy, beta 0
    width = cfg.max_prompt_length + cfg.generation_limit - 1
    rows = cfg.effective_prompts_per_step * cfg.num_generations
    micro = cfg.effective_micro_batch_size
    update = (12 * dims.params + rows * width * 12 + (4 + 4) * dims.params
              + memory.train_activations(dims, micro, width, 4, cfg))
    assert plan.phases["update"] == update
    assert plan.fits
    # The shared-prompt forward (the default where micro-batches hold whole groups): each prompt once.
    shared = plan_memory(dims, dataclasses.replace(cfg, share_prompt_forward=True), available=10 * GB, source="test")
    prompts = micro // cfg.num_generations
    new = cfg.generation_limit
    activations = (micro * new * dims.vocab * 4 * memory.TRAIN_FLOAT32_PER_LOGIT + dims.layers * (
        memory.train_activations_per_layer(dims, prompts, cfg.max_prompt_length, 4, per_score=1)
        + memory.train_activations_per_layer(dims, micro, new, 4, keys=cfg.max_prompt_length + new)))
    assert shared.phases["update"] == update - memory.train_activations(dims, micro, width, 4, cfg) + activations
    assert shared.phases["update"] < plan.phases["update"]


@pytest.mark.parametrize("config", ["smoke.toml", "demo.toml"])
def test_the_plan_is_within_15_percent_of_the_measured_peaks(config):
    cfg = load_config(REPO / "configs" / config, ["model_name=demo/model"])
    peaks, plan = bench["measure"](cfg, DEMO_MODEL_CONFIG, steps=2)
    assert set(peaks) == set(plan.phases)
    for phase, measured in peaks.items():
        assert abs(plan.phases[phase] / measured - 1) <= 0.15, (phase, plan.phases[phase], measured)


def test_too_large_stops_with_the_phase_and_the_cheapest_change_that_fits():
    cfg = validate(GRPOConfig(model_name="x", max_prompt_length=256, micro_batch_size=16, compute_dtype="bfloat16",
                              num_generations=8, quantize_for_rollouts=False, beta=0.02, eval_batch_size=16))
    plan = plan_memory(model_dims(D32, cfg), cfg, available=int(48 * GB), source="test")
    assert not plan.fits
    with pytest.raises(MemoryPlanError) as error:
        check_fits(D32, cfg, plan)
    message = str(error.value)
    assert "\n" not in message and f"the {plan.peak_phase} phase needs" in message
    change = dict(item.split("=") for item in message.split("fits: ")[1].split(" (plan")[0].split("--set ")[1:])
    assert "micro_batch_size" in change and "train_type" not in change  # the math unchanged: smaller batches do
    fixed = dataclasses.replace(cfg, **{k.strip(): int(v) for k, v in change.items()})
    assert plan_memory(model_dims(D32, fixed), fixed, available=int(48 * GB), source="").fits
    larger = dataclasses.replace(fixed, micro_batch_size=fixed.micro_batch_size * 2)  # the largest that fits
    assert not plan_memory(model_dims(D32, larger), larger, available=int(48 * GB), source="").fits


def test_a_full_d32_on_16_gb_is_told_to_train_adapters():
    cfg = validate(GRPOConfig(model_name="x", max_prompt_length=256, micro_batch_size=2, num_generations=8))
    change, fixed = memory.cheapest_fix(D32, cfg, int(10.7 * GB))
    assert change.get("train_type") == "lora" and fixed.fits


def test_plan_flag_prints_the_plan_and_loads_no_model(tmp_path, monkeypatch, capsys):
    import mlx_grpo.models

    def no_loading(*args, **kwargs):
        raise AssertionError("--plan loaded a model")

    monkeypatch.setattr(mlx_grpo.models, "load_model", no_loading)
    plan = trainer_main(["--config", REPO / "configs" / "smoke.toml", "--plan", "--set", "model_name=demo/model",
                         "--set", f"output_dir={tmp_path}"])
    out = capsys.readouterr().out
    assert "[memory] peak GB per phase: rollout" in out and "[auto] pad_to_multiple_of = 1" not in out  # smoke sets 1
    assert "[auto] prefill_align = 1 (cpu" in out and plan.fits and not list(tmp_path.iterdir())


def test_a_run_that_does_not_fit_stops_before_loading(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(memory, "machine_memory", lambda: (int(1e6), "a test machine"))
    with pytest.raises(SystemExit) as stop:
        trainer_main(["--config", REPO / "configs" / "smoke.toml", "--set", "model_name=demo/model",
                      "--set", f"output_dir={tmp_path}"])
    assert str(stop.value).startswith("error: memory plan: the ") and "a test machine" in str(stop.value)
    assert not list(tmp_path.iterdir())


def test_backend_auto_keys_per_backend():
    cfg = validate(GRPOConfig(model_name="x"))
    assert (cfg.pad_to_multiple_of, cfg.prefill_align, cfg.rollout_headroom) == (None, None, None)
    cuda, notes = resolve_for_backend(cfg, "cuda")
    assert (cuda.pad_to_multiple_of, cuda.prefill_align) == (64, 64) and len(notes) == 2
    assert resolve_headroom(cuda, "cuda", 10**9)[0].rollout_headroom == 0.15
    for backend in ("metal", "cpu"):
        other, _ = resolve_for_backend(cfg, backend)
        assert (other.pad_to_multiple_of, other.prefill_align) == (1, 1)
    given = validate(GRPOConfig(model_name="x", pad_to_multiple_of=8, rollout_headroom=0.3))
    kept, notes = resolve_for_backend(given, "cuda")
    assert kept.pad_to_multiple_of == 8 and notes == ["[auto] prefill_align = 64 (cuda: fewer shapes to compile and plan)"]
    assert resolve_headroom(kept, "cpu", 10**9) == (kept, [])
    assert load_config(None, ["model_name=x", "pad_to_multiple_of=auto"]).pad_to_multiple_of is None


def test_rollout_kv_buffers_auto_takes_two_where_the_plan_fits_them_else_one():
    cfg = validate(GRPOConfig(model_name="x", batch_size=2, num_generations=16, max_prompt_length=100,
                              max_new_tokens=256, max_completion_length=256, quantize_for_rollouts=False,
                              compute_dtype="bfloat16", beta=0.0, eval_samples=0, micro_batch_size=2))
    assert cfg.rollout_kv_buffers is None
    dims = model_dims(D20, cfg)
    one = plan_memory(dims, dataclasses.replace(cfg, rollout_kv_buffers=1), available=0, source="t", backend="cpu")
    two = plan_memory(dims, dataclasses.replace(cfg, rollout_kv_buffers=2), available=0, source="t", backend="cpu")
    assert two.peak_phase == "rollout" and two.peak > one.peak

    def plan_for(available):
        return lambda c: plan_memory(dims, c, available=available, source="t", backend="cpu")

    roomy, notes = resolve_kv_buffers(cfg, plan_for(two.peak))
    assert roomy.rollout_kv_buffers == 2 and notes[0].startswith("[auto] rollout_kv_buffers = 2 (")
    tight, notes = resolve_kv_buffers(cfg, plan_for(two.peak - 1))
    assert tight.rollout_kv_buffers == 1 and "more than this machine can use" in notes[0]
    assert resolve_kv_buffers(cfg, lambda c: None)[0].rollout_kv_buffers == 2  # no plan
    given = dataclasses.replace(cfg, rollout_kv_buffers=1)
    assert resolve_kv_buffers(given, plan_for(two.peak)) == (given, [])
    assert load_config(None, ["model_name=x", "rollout_kv_buffers=auto"]).rollout_kv_buffers is None
    assert ConfigChange("rollout_kv_buffers", 2, 1).safe  # a resume on another machine may choose otherwise
    with pytest.raises(ConfigError, match="rollout_kv_buffers must be 1, 2, 3"):
        load_config(None, ["model_name=x", "rollout_kv_buffers=0"])


def _tiny_nanochat():
    from mlx_lm.models import nanochat

    args = nanochat.ModelArgs(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                              vocab_size=64, max_position_embeddings=512, intermediate_size=128)
    mx.random.seed(0)
    model = nanochat.Model(args)
    mx.eval(model.parameters())
    return model


def test_grad_checkpoint_gives_the_same_gradients_with_less_memory_and_only_on_its_model():
    from mlx.utils import tree_flatten

    model, other = _tiny_nanochat(), _tiny_nanochat()
    inputs = mx.array(np.random.default_rng(0).integers(0, 64, (4, 256)).astype(np.int32))

    def loss(model):
        return nn.losses.cross_entropy(model(inputs), inputs).mean()

    def grads_and_peak():
        mx.synchronize()
        mx.reset_peak_memory()
        start = mx.get_active_memory()
        _, grads = nn.value_and_grad(model, loss)(model)
        mx.eval(grads)
        return dict(tree_flatten(grads)), mx.get_peak_memory() - start

    plain, plain_peak = grads_and_peak()
    assert checkpoint_blocks(model) == 2 and checkpoint_blocks(model) == 0
    checkpointed, checkpointed_peak = grads_and_peak()
    for name, value in plain.items():
        assert mx.allclose(value, checkpointed[name], atol=1e-6).item(), name
    assert checkpointed_peak < plain_peak
    assert type(other.layers[0]).__name__ == "TransformerBlock"  # the class itself is unchanged
    assert mx.array_equal(model(inputs[:, :8]), other(inputs[:, :8])).item()  # decoding path unchanged too



def test_on_cuda_the_plan_keeps_each_prompts_keys_once_as_the_decode_kernel_does(monkeypatch):
    """With CUDA's decode kernel the rollout holds each prompt's keys once (prompts x prompt length) and every
    row's generated ones (rows x new tokens), not every row's prompt and completion; elsewhere the per-row cache,
    in each of its rollout_kv_buffers buffers (auto: the decoders' 2)."""
    from mlx_grpo import cuda_kernels

    cfg = validate(GRPOConfig(model_name="x", batch_size=2, num_generations=16, max_prompt_length=100,
                              max_new_tokens=256, max_completion_length=256, quantize_for_rollouts=False,
                              compute_dtype="bfloat16", beta=0.0, eval_samples=0))
    dims = model_dims(D20, cfg)
    assert dims.decode_kernel  # nanochat d20: the fast decoder and 128-wide heads
    monkeypatch.setattr(cuda_kernels, "enabled", lambda: False)  # MLX_GRPO_CUDA_KERNELS=0: MLX's own attention
    per_row = plan_memory(dims, cfg, available=0, source="test", backend="cuda")
    monkeypatch.setattr(cuda_kernels, "enabled", lambda: True)
    once = plan_memory(dims, cfg, available=0, source="test", backend="cuda")
    assert plan_memory(dims, cfg, available=0, source="test", backend="cpu").phases["rollout"] == per_row.phases["rollout"]
    prompts, rows = cfg.effective_prompts_per_step, cfg.effective_prompts_per_step * 16
    kv = lambda n, length: n * dims.layers * 2 * dims.kv_dim * length * 2  # bf16 keys and values
    per_row_decode = 2 * kv(rows, 356) + kv(rows, 356) // dims.layers + kv(prompts, 100)  # more than the prefill
    assert per_row.phases["rollout"] - once.phases["rollout"] == per_row_decode - (kv(prompts, 100) + kv(rows, 256))
    assert per_row.phases["update"] == once.phases["update"]
    one_buffer = dataclasses.replace(cfg, rollout_kv_buffers=1)
    assert plan_memory(dims, one_buffer, available=0, source="test", backend="cuda").phases == once.phases  # kernel: 1
    monkeypatch.setattr(cuda_kernels, "enabled", lambda: False)
    one = plan_memory(dims, one_buffer, available=0, source="test", backend="cuda")
    assert per_row.phases["rollout"] - one.phases["rollout"] == kv(rows, 356)


def test_without_a_fast_decoder_the_plan_sizes_mlx_lms_one_growing_batch_cache():
    """mlx-lm's model call (a model type no fast decoder takes, or adapters decoded in place) keeps one batch
    cache per layer, from the longest prompt less one, grown BatchKVCache.step (256) tokens at a time, and
    prefills one prompt at a time."""
    cfg = validate(GRPOConfig(model_name="x", batch_size=2, num_generations=16, max_prompt_length=100,
                              max_new_tokens=300, max_completion_length=300, quantize_for_rollouts=False,
                              compute_dtype="float32", beta=0.0, eval_samples=0, prefill_align=1))
    dims = model_dims(D20, cfg)
    assert dims.fast_decoder and not model_dims(QWEN2_MOE).fast_decoder  # a model type of mlx-lm's only
    slow = dataclasses.replace(dims, fast_decoder=False, decode_kernel=False)
    plan = plan_memory(slow, cfg, available=0, source="test", backend="cpu")
    prompts, rows = cfg.effective_prompts_per_step, cfg.effective_prompts_per_step * 16
    kv = lambda n, length: n * dims.layers * 2 * dims.kv_dim * length * 4  # float32 keys and values
    logits = rows * dims.vocab * 4 * memory.FORWARD_FLOAT32_PER_LOGIT
    decode = kv(rows, 99 + 512) + kv(rows, 99 + 512) // dims.layers + logits  # 300 new tokens: 2 growth steps
    assert plan.phases["rollout"] == sum(plan.resident.values()) + decode  # more than the prefill
    fast = plan_memory(dims, cfg, available=0, source="test", backend="cpu")  # the per-row layout, two buffers
    assert fast.phases["rollout"] - plan.phases["rollout"] == 2 * kv(rows, 400) + kv(rows, 400) // dims.layers + kv(
        prompts, 100) - (kv(rows, 611) + kv(rows, 611) // dims.layers)
    # LoRA adapters decoded in place take mlx-lm's call too; merged into a dense copy, the fast decoder.
    lora = dataclasses.replace(cfg, train_type="lora", merge_adapters_for_decoding=False)
    in_place = plan_memory(model_dims(D20, lora), lora, available=0, source="test", backend="cpu")
    assert in_place.phases["rollout"] == sum(in_place.resident.values()) + decode
    merged = dataclasses.replace(lora, merge_adapters_for_decoding=True)
    assert plan_memory(model_dims(D20, merged), merged, available=0, source="test", backend="cpu").phases[
        "rollout"] == sum(in_place.resident.values()) + memory.dense_bytes(dims, 4) + fast.phases["rollout"] - sum(
        fast.resident.values())


def test_the_plan_is_within_15_percent_of_mlx_lms_measured_decode_with_adapters_in_place():
    from mlx_grpo.generation.engine import generate_completions
    from mlx_grpo.generation.sampling import make_rollout_sampler
    from mlx_grpo.training.lora import add_adapters

    config = dict(DEMO_MODEL_CONFIG, num_hidden_layers=8, vocab_size=64, max_position_embeddings=1024)
    cfg = validate(GRPOConfig(model_name="x", batch_size=4, gradient_accumulation_steps=1, num_generations=16,
                              max_prompt_length=40, max_new_tokens=40, max_completion_length=40,
                              quantize_for_rollouts=False, compute_dtype="float32", beta=0.0, eval_batch_size=64,
                              eval_max_new_tokens=40, prefill_align=1, train_type="lora",
                              merge_adapters_for_decoding=False))
    plan = plan_memory(model_dims(config, cfg), cfg, available=0, source="test", backend="cpu")
    mx.random.seed(0)
    model = memory.lazy_model(config)
    add_adapters(model, cfg)
    mx.eval(model.parameters())
    prompts = np.random.default_rng(0).integers(1, 64, size=(4, 40)).tolist()
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    generate_completions(model, prompts, group_size=16, max_new_tokens=40, sampler=make_rollout_sampler(1.0),
                         stop_token_ids=[])
    measured = mx.get_peak_memory() - before
    planned = plan.phases["rollout"] - sum(plan.resident.values())  # the policy itself decodes: no copy
    assert abs(planned / measured - 1) <= 0.15, (planned, measured)
    # Evaluation: eval_batch_size (64) questions, one completion each.
    questions = np.random.default_rng(1).integers(1, 64, size=(cfg.eval_batch_size, 40)).tolist()
    mx.clear_cache()
    mx.reset_peak_memory()
    generate_completions(model, questions, group_size=1, max_new_tokens=cfg.eval_max_new_tokens,
                         sampler=make_rollout_sampler(0.0), stop_token_ids=[])
    measured = mx.get_peak_memory() - before
    planned = plan.phases["eval"] - sum(plan.resident.values())
    assert abs(planned / measured - 1) <= 0.15, (planned, measured)


MAC_CLASSES = {16: 10.7, 24: 16.0, 36: 27.0, 64: 48.0, 128: 96.0}  # GB: RAM -> Metal's recommended working set


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "mac").glob("*.toml")), ids=lambda p: p.stem)
def test_mac_configs_fit_their_class_by_the_plan(path):
    depth, ram = path.stem.split("_")[1], int(path.stem.split("_")[2].rstrip("gb"))
    cfg = resolve_for_backend(load_config(path), "metal")[0]
    dims, available = model_dims(D20 if depth == "d20" else D32, cfg), int(MAC_CLASSES[ram] * GB)
    cfg = resolve_kv_buffers(cfg, lambda c: plan_memory(dims, c, available=available, source="test"))[0]  # as the trainer
    plan = plan_memory(dims, cfg, available=available, source="test")
    assert plan.fits, (path.name, plan.peak / GB)
    stated = float(path.read_text().split("memory plan: ")[1].split(" GB")[0])
    assert abs(stated - plan.peak / GB) < 0.05, (path.name, stated, plan.peak / GB)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_on_cuda_the_shared_log_prob_passes_take_the_completions_logits_only():
    """CUDA's costs by hand: the reference pass of the shared forward holds micro x new logits at the dtype's
    bytes (the plain forward: micro x row width at 24 bytes), and the importance-sampling correction's old-policy
    pass also holds the policy's compute_dtype copy."""
    cfg = validate(GRPOConfig(model_name="x", batch_size=2, num_generations=8, micro_batch_size=8,
                              max_prompt_length=100, max_new_tokens=256, max_completion_length=256,
                              compute_dtype="bfloat16", quantize_for_rollouts=True, beta=0.02, eval_samples=0,
                              pad_to_multiple_of=1, prefill_align=1))
    dims = model_dims(D20, cfg)
    costs = memory.CUDA_COSTS
    shared = plan_memory(dims, cfg, available=0, source="test", backend="cuda")
    plain = plan_memory(dims, dataclasses.replace(cfg, share_prompt_forward=False), available=0, source="test",
                        backend="cuda")
    width = 100 + 256 - 1
    pass_rest = 8 * width * (4 * dims.hidden + dims.intermediate) * 2  # one layer's activations, bf16
    assert plain.phases["reference"] - shared.phases["reference"] == (
        8 * width * dims.vocab * costs.forward_logit_bytes - 8 * 256 * dims.vocab * costs.shared_forward_logit_bytes[
            "bfloat16"] + pass_rest - 8 * 256 * (4 * dims.hidden + dims.intermediate) * 2)
    no_correction = plan_memory(dims, dataclasses.replace(cfg, vllm_importance_sampling_correction=False),
                                available=0, source="test", backend="cuda")
    assert shared.phases["old_policy"] - no_correction.phases["old_policy"] == dims.params * 2
