"""LoRA / DoRA / QLoRA on the tiny fixture: what trains, the reference, fuse, resume, inference."""

import dataclasses
import json
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten
from test_trainer import (comparable, interrupted_copy, read_records, run, same_weights, saved_weights,
                         toy_reward_file, train_records)

from mlx_grpo import fuse, inference
from mlx_grpo.config import ConfigError, GRPOConfig
from mlx_grpo.generation.engine import Completion
from mlx_grpo.models import ModelLoadError, load_model
from mlx_grpo.training.lora import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_FILE,
    adapter_weights,
    add_adapters,
    base_policy,
    load_adapted_model,
    save_adapters,
)
from mlx_grpo.training.update import (
    ensure_float32,
    frozen_logprobs,
    make_loss_and_grad,
    pack_micro_batches,
    policy_update,
)

TOKENS = mx.array([[1, 5, 9, 42, 7, 300, 11, 2]])


def adapted(model_dir, **settings):
    model, tokenizer = load_model(model_dir)
    cfg = GRPOConfig(model_name=str(model_dir), **settings)
    adapter_config = add_adapters(model, cfg)
    ensure_float32(model, adapters_only=True)
    return model, adapter_config


def updates(model, count, learning_rate=1e-2, beta=0.0, ref_logp=None, use_compile=False):
    completions = [Completion(0, tokens=[10, 11, 12], sampled=[1, 1, 1], stopped=True),
                   Completion(0, tokens=[13, 14], sampled=[1, 1], stopped=True)]
    slices, batches = pack_micro_batches([[1, 2, 3]], completions, micro_batch_size=2)
    loss_and_grad = make_loss_and_grad(
        model, temperature=1.0, loss_type="dapo", epsilon=0.2, epsilon_high=0.2, beta=beta,
        importance_sampling_level="token", max_completion_length=8, use_compile=use_compile)
    optimizer = optim.AdamW(learning_rate=learning_rate, weight_decay=0.0)
    for _ in range(count):
        model.train()
        result = policy_update(model, optimizer, loss_and_grad, batches, slices, mx.array([1.0, -1.0]), None,
                               ref_logp, {"num_sequences_total": 2, "num_tokens_total": 5, "num_micro_batches": 1},
                               1.0)
        model.eval()
        assert result.applied and np.isfinite(result.loss)
    return optimizer, batches


def snapshot(model):
    return {k: mx.array(v) for k, v in tree_flatten(model.parameters())}


@pytest.mark.parametrize("train_type", ["lora", "dora"])
def test_only_the_adapters_train_and_the_reference_is_the_base(tiny_model_dir, train_type):
    model, _ = adapted(tiny_model_dir, train_type=train_type)
    base, _ = load_model(tiny_model_dir)
    before = snapshot(model)
    adapter_names = set(adapter_weights(model))
    assert set(dict(tree_flatten(model.trainable_parameters()))) == adapter_names
    optimizer, batches = updates(model, 2, use_compile=train_type == "lora")

    after = dict(tree_flatten(model.parameters()))
    changed = {k for k in before if not mx.array_equal(before[k], after[k])}
    assert changed and changed <= adapter_names  # the base never moves
    assert {k for k in adapter_names if k.endswith("lora_b")} <= changed
    assert all(after[k].dtype == mx.float32 for k in adapter_names)
    assert {k.rsplit(".", 1)[0] for k, _ in tree_flatten(optimizer.state) if "." in k} == adapter_names

    # The reference is the base exactly: the policy with its adapters off, and the policy has moved.
    reference = frozen_logprobs(base_policy(model), batches, 1.0)
    assert all(mx.array_equal(r, b) for r, b in zip(reference, frozen_logprobs(base, batches, 1.0)))
    assert not mx.allclose(model(TOKENS), base(TOKENS))
    assert set(adapter_weights(model)) == adapter_names  # the adapters are back in place


def test_lora_keys_and_layers_choose_the_adapted_projections(tiny_model_dir):
    model, adapter_config = adapted(tiny_model_dir, train_type="lora", lora_keys=["attn.c_q", "attn.c_v"],
                                    lora_layers=1, lora_rank=4)
    assert sorted(adapter_weights(model)) == [f"transformer.h.1.attn.{p}.lora_{ab}" for p in ("c_q", "c_v")
                                              for ab in "ab"]
    assert adapter_config["num_layers"] == 1 and adapter_config["lora_parameters"]["rank"] == 4
    with pytest.raises(ConfigError, match="attn.c_x.*relative to a block"):
        adapted(tiny_model_dir, train_type="lora", lora_keys=["attn.c_x"])
    with pytest.raises(ConfigError, match="lora_layers = 3 but the model has 2 blocks"):
        adapted(tiny_model_dir, train_type="lora", lora_layers=3)


def test_config_keys_are_checked_and_full_training_still_refuses_a_quantized_model(tiny_model_dir):
    from mlx_grpo.config import validate

    with pytest.raises(ConfigError, match="base_quant_bits > 0.*train_type"):
        validate(GRPOConfig(base_quant_bits=4))
    with pytest.raises(ConfigError, match="lora_layers.*-1"):
        validate(GRPOConfig(train_type="lora", lora_layers=0))
    with pytest.raises(ConfigError, match="train_type must be one of full\\|lora\\|dora"):
        validate(GRPOConfig(train_type="qlora"))
    model, _ = adapted(tiny_model_dir, train_type="lora", base_quant_bits=4, base_quant_group_size=32)
    with pytest.raises(ValueError, match="quantized.*train_type"):
        ensure_float32(model)  # full training of a quantized model is refused


def test_dropout_acts_in_train_mode_only_and_changes_between_compiled_steps(tiny_model_dir):
    model, _ = adapted(tiny_model_dir, train_type="lora", lora_dropout=0.5)
    updates(model, 1)  # lora_b leaves zero, so dropout shows in the output
    assert mx.array_equal(model(TOKENS), model(TOKENS))  # eval mode: no dropout
    completions = [Completion(0, tokens=[10, 11, 12], sampled=[1, 1, 1], stopped=True)] * 2
    _, batches = pack_micro_batches([[1, 2, 3]], completions, micro_batch_size=2)
    loss_and_grad = make_loss_and_grad(
        model, temperature=1.0, loss_type="dapo", epsilon=0.2, epsilon_high=0.2, beta=0.0,
        importance_sampling_level="token", max_completion_length=8, use_compile=True)
    b = batches[0]
    args = (b.inputs, b.targets, b.mask, mx.array([1.0, -1.0]), None, None, *map(mx.array, (2.0, 6.0, 1.0)))
    model.train()
    (_, first), _ = loss_and_grad(*args)
    (_, second), _ = loss_and_grad(*args)
    model.eval()
    assert first["entropy_sum"].item() != second["entropy_sum"].item()  # a fresh dropout mask each compiled step


# ---------------------------------------------------------------------------------------------
# The trainer: a LoRA run, its exact resume, fuse and inference; a QLoRA run

LORA_SETTINGS = ("train_type=lora", "max_train_samples=8", "save_steps=2", "temperature=1.0",
                 "learning_rate=1e-2", "num_iterations=2", "beta=0.05", "quantize_for_rollouts=true",
                 "rollout_quant_group_size=32", "eval_samples=2")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir):
    """A 4-step LoRA run (checkpoints after steps 2 and 4), KL to the base, rollouts from a merged 4-bit copy."""
    tmp = tmp_path_factory.mktemp("lora_run")
    reward_file = toy_reward_file(tmp)
    settings = (*LORA_SETTINGS, f"reward_file={reward_file}", "reward_funcs=digit_reward")
    run(tmp, tiny_model_dir, *settings, run_name="full")
    return tmp, settings


def test_a_lora_checkpoint_holds_only_the_adapters_in_mlx_lm_format(lora_run, tiny_model_dir):
    tmp, _ = lora_run
    checkpoint = tmp / "out" / "full" / "checkpoints" / "step_000004"
    assert (checkpoint / ADAPTER_FILE).is_file() and not (checkpoint / "model.safetensors").exists()
    adapter_config = json.loads((checkpoint / ADAPTER_CONFIG_FILE).read_text())
    assert adapter_config["model"] == str(tiny_model_dir) and adapter_config["fine_tune_type"] == "lora"
    assert adapter_config["num_layers"] == 2 and adapter_config["lora_parameters"]["rank"] == 8
    saved = mx.load(str(checkpoint / ADAPTER_FILE))
    assert saved and all(k.endswith(("lora_a", "lora_b")) for k in saved)
    assert all(mx.any(v != 0).item() for k, v in saved.items() if k.endswith("lora_b"))  # they trained
    optimizer_keys = {k.rsplit(".", 1)[0] for k in mx.load(str(checkpoint / "optimizer.safetensors")) if "." in k}
    assert optimizer_keys == set(saved)
    for record in train_records(tmp / "out" / "full"):
        assert np.isfinite(record["loss"]) and "memory/peak_gb" in record and "kl" in record
    with pytest.raises(ModelLoadError, match="holds LoRA adapters.*fuse"):
        load_model(checkpoint)  # the adapters alone are not a model


def test_resume_of_a_lora_run_continues_exactly(lora_run, tiny_model_dir):
    tmp, settings = lora_run
    full = tmp / "out" / "full"
    part = interrupted_copy(full, tmp / "out" / "part", step=2, update=4)
    run(tmp, tiny_model_dir, *settings, run_name="part", extra_args=["--resume"])

    assert comparable(read_records(part)) == comparable(read_records(full))
    a, b = saved_weights(full, 4, ADAPTER_FILE), saved_weights(part, 4, ADAPTER_FILE)
    assert set(a) == set(b) and same_weights(a, b)


def test_fused_model_reproduces_the_adapted_model_and_inference_loads_checkpoints(lora_run, tiny_model_dir, capsys):
    tmp, _ = lora_run
    run_dir = tmp / "out" / "full"
    checkpoint = run_dir / "checkpoints" / "step_000004"
    assert fuse.main(["--checkpoint", str(run_dir), "--output", str(tmp / "fused")]) == 0  # the newest checkpoint
    fused, _ = load_model(tmp / "fused")  # a plain nanochat folder
    assert (tmp / "fused" / "tokenizer.pkl").is_file()
    model, _ = load_adapted_model(checkpoint)  # base from the recorded model_name
    base, _ = load_model(tiny_model_dir)
    assert mx.allclose(fused(TOKENS), model(TOKENS), atol=1e-4)
    assert not mx.allclose(fused(TOKENS), base(TOKENS), atol=1e-2)
    assert fuse.main(["--checkpoint", str(checkpoint), "--output", str(tmp / "fused")]) == 1  # not empty
    assert "not empty" in capsys.readouterr().err

    greedy = ["--prompt", "What is 2+2?", "--temperature", "0", "--max-tokens", "6", "--no-tools"]
    assert inference.main(["--model", str(checkpoint), *greedy]) == 0
    from_checkpoint = capsys.readouterr().out
    assert inference.main(["--model", str(tiny_model_dir), "--adapter-path", str(checkpoint), *greedy]) == 0
    assert capsys.readouterr().out == from_checkpoint
    assert inference.main(["--model", str(tmp / "fused"), *greedy]) == 0
    assert capsys.readouterr().out == from_checkpoint


def test_a_qlora_run_trains_its_adapters_and_fuses_dequantized(tmp_path, tiny_model_dir, capsys):
    reward_file = toy_reward_file(tmp_path)
    run(tmp_path, tiny_model_dir, "train_type=lora", "base_quant_bits=4", "base_quant_group_size=32",
        f"reward_file={reward_file}", "reward_funcs=digit_reward", "temperature=1.0",
        "max_train_samples=4", "learning_rate=1e-2", "beta=0.05", "quantize_for_rollouts=true",
        "rollout_quant_group_size=32", "eval_samples=1")
    run_dir = tmp_path / "out" / "run"
    assert all(np.isfinite(r["loss"]) for r in train_records(run_dir))
    checkpoint = run_dir / "checkpoints" / "step_000002"
    assert json.loads((checkpoint / ADAPTER_CONFIG_FILE).read_text())["base_quantization"] == {
        "bits": 4, "group_size": 32}
    saved = mx.load(str(checkpoint / ADAPTER_FILE))
    assert all(mx.any(v != 0).item() for k, v in saved.items() if k.endswith("lora_b"))

    model, _ = load_adapted_model(checkpoint)  # the base is quantized again, as in training
    assert any(v.dtype == mx.uint32 for _, v in tree_flatten(model.parameters()))
    assert fuse.main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "fused")]) == 0
    fused, _ = load_model(tmp_path / "fused")
    assert not any(v.dtype == mx.uint32 for _, v in tree_flatten(fused.parameters()))  # dequantized
    assert mx.allclose(fused(TOKENS), model(TOKENS), atol=1e-4)
    capsys.readouterr()
    assert inference.main(["--model", str(checkpoint), "--prompt", "2+2?", "--temperature", "0", "--max-tokens", "3",
                           "--no-tools"]) == 0
    assert "[INFO]" not in capsys.readouterr().out  # stdout holds the answer only


def test_an_mlx_lm_model_fuses_into_an_mlx_lm_folder(tmp_path, tiny_mlx_lm_dir):
    model, adapter_config = adapted(tiny_mlx_lm_dir, train_type="dora")
    updates(model, 2)
    tokens = mx.array([[1, 5, 9, 12]])
    checkpoint = tmp_path / "checkpoint"
    save_adapters(checkpoint, model, adapter_config)
    fuse.fuse_checkpoint(checkpoint, tmp_path / "fused")
    fused, _ = load_model(tmp_path / "fused")
    assert mx.allclose(fused(tokens), model(tokens), atol=1e-4)
    assert not (tmp_path / "fused" / "tokenizer.pkl").exists() and (tmp_path / "fused" / "tokenizer.json").exists()


@pytest.mark.parametrize("train_type, base_quant_bits", [("lora", 0), ("dora", 0), ("lora", 4)])
def test_rollouts_come_from_a_merged_copy_with_the_adapted_policys_tokens(tiny_model_dir, train_type, base_quant_bits):
    """The rollout policy of an adapter run is a dense copy with the adapters merged (so the fast decoder runs
    it); greedy rollouts through it are the tokens of the unmerged adapters through mlx-lm's model call."""
    from mlx_grpo.generation.engine import generate_completions
    from mlx_grpo.generation.sampling import make_rollout_sampler
    from mlx_grpo.nanochat import decoder as nanochat_decode
    from mlx_grpo.training.distributed import World
    from mlx_grpo.training.lora import adapter_modules, eval_policy, has_adapters
    from mlx_grpo.training.step import build_step, rollout_policy

    settings = dict(train_type=train_type, base_quant_bits=base_quant_bits, base_quant_group_size=32,
                    compute_dtype="float32", lora_rank=4)
    model, _ = adapted(tiny_model_dir, **settings)
    for name, layer in adapter_modules(model):  # adapters that change the greedy tokens
        layer.lora_b = mx.random.normal(layer.lora_b.shape, key=mx.random.key(len(name))) * 0.3
    cfg = GRPOConfig(model_name=str(tiny_model_dir), **settings)
    setup = build_step(cfg, World(), model, total_updates=1, stop_token_ids=set())
    policy = rollout_policy(setup, quantized=False)
    assert policy is not model and not has_adapters(policy) and nanochat_decode.supports(policy)
    prompts = [[1, 5, 9, 11, 3], [2, 7], [4, 4, 8, 1]]
    kwargs = dict(group_size=2, max_new_tokens=12, sampler=make_rollout_sampler(0.0), stop_token_ids=set())
    merged, _ = generate_completions(policy, prompts, **kwargs)
    unmerged, _ = generate_completions(model, prompts, **kwargs)
    base, _ = generate_completions(load_model(tiny_model_dir)[0], prompts, **kwargs)
    assert [c.tokens for c in merged] == [c.tokens for c in unmerged]
    assert [c.tokens for c in merged] != [c.tokens for c in base], "the adapters should change the tokens"
    assert has_adapters(model)  # the policy keeps its adapters
    evaluated = eval_policy(model, mx.float32)  # evaluation decodes the same merged copy
    assert evaluated is not model and not has_adapters(evaluated) and nanochat_decode.supports(evaluated)
    assert [c.tokens for c in generate_completions(evaluated, prompts, **kwargs)[0]] == [c.tokens for c in merged]
    # merge_adapters_for_decoding = false: both decode through the adapters in place, no copy
    in_place = build_step(GRPOConfig(model_name=str(tiny_model_dir), merge_adapters_for_decoding=False, **settings),
                          World(), model, total_updates=1, stop_token_ids=set())
    assert rollout_policy(in_place, quantized=False) is model and eval_policy(model, mx.float32, False) is model


def test_the_plan_counts_the_merged_decoding_copy(tiny_model_dir):
    """With adapters, rollouts and evaluation hold one dense compute_dtype copy more, unless decoding in place."""
    from mlx_grpo.training.memory import dense_bytes, model_dims, plan_memory

    config = json.loads((Path(tiny_model_dir) / "config.json").read_text())
    plans = []
    for merge in (True, False):
        cfg = GRPOConfig(model_name=str(tiny_model_dir), train_type="lora", quantize_for_rollouts=False,
                         compute_dtype="bfloat16", merge_adapters_for_decoding=merge)
        # one decoder's cache for both (the fast decoders' and mlx-lm's differ: tests/test_memory.py)
        dims = dataclasses.replace(model_dims(config, cfg), fast_decoder=False, decode_kernel=False)
        plans.append(plan_memory(dims, cfg, available=0, source="test").phases)
    copy = dense_bytes(dims, 2)
    assert plans[0]["rollout"] - plans[1]["rollout"] == copy and plans[0]["eval"] - plans[1]["eval"] == copy
    assert plans[0]["update"] == plans[1]["update"]
