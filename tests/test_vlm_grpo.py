"""GRPO on a tiny random Qwen2-VL: the loss forward with image features against decoding, LoRA updates."""

import json

import numpy as np
import pytest

pytest.importorskip("mlx_vlm")

import mlx.core as mx  # noqa: E402
from fixture_vlm import COLOURS, build_tiny_qwen2_vl, write_square  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from mlx_grpo import convert_model  # noqa: E402
from mlx_grpo.config import GRPOConfig, validate  # noqa: E402
from mlx_grpo.generation.engine import generate_completions, make_decoder  # noqa: E402
from mlx_grpo.generation.sampling import make_rollout_sampler  # noqa: E402
from mlx_grpo.training.distributed import World  # noqa: E402
from mlx_grpo.training.lora import adapter_modules, add_adapters, load_adapted_model  # noqa: E402
from mlx_grpo.training.step import TrainState, build_step, grpo_updates, rollout_policy, sample_rollouts  # noqa: E402
from mlx_grpo.training.update import PackedBatch, ensure_float32  # noqa: E402
from mlx_grpo.vlm.decode import VlmDecoder, prefill_prompt  # noqa: E402
from mlx_grpo.vlm.model import build_vlm_prompt, load_vlm, vlm_tokenizer  # noqa: E402

QUESTION = "What colour is the square?"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm_grpo")
    hf = build_tiny_qwen2_vl(root / "hf")
    assert convert_model.main(["--hf-path", str(hf), "--output-dir", str(root / "mlx")]) == 0
    images = {colour: str(write_square(root / f"{colour}.png", colour)) for colour in COLOURS}
    return root / "mlx", images


def _prompts(policy, images):
    return [build_vlm_prompt(policy, QUESTION, [images[c]]) for c in COLOURS]


def test_loss_forward_is_the_decoding_forward(folder):
    """The packed rows' logits (prompt features + completion embeddings at the decoding positions) equal the
    logits decoding computed step by step from the prefilled cache."""
    path, images = folder
    policy = load_vlm(path)
    prompts = _prompts(policy, images)
    completions, _ = generate_completions(policy, prompts, group_size=2, max_new_tokens=6,
                                          sampler=make_rollout_sampler(1.0, 1.0, 0, 0.0), stop_token_ids=set())
    slices, batches = policy.pack_micro_batches(prompts, completions, 4, pad_multiple=8)
    logits = np.concatenate([np.array(policy(b.inputs)) for b in batches])
    for row, completion in enumerate(completions):
        prompt = prompts[completion.prompt_index]
        cache, state = prefill_prompt(policy, prompt)
        policy.set_sequence_state(state)
        stepped = []
        for token in [prompt[-1]] + completion.tokens[:-1]:
            stepped.append(policy.language_model(mx.array([[token]]), cache=cache).logits[0, -1])
        start = len(prompt) - 1
        np.testing.assert_allclose(logits[row, start:start + len(completion.tokens)], np.array(mx.stack(stepped)),
                                   atol=1e-4)
    assert sum(b.mask.sum().item() for b in batches) == 6 * len(completions)


@pytest.mark.parametrize("use_compile", [False, True])
def test_lora_grpo_updates_reach_the_adapters(folder, use_compile):
    path, images = folder
    policy = load_vlm(path)
    tokenizer = vlm_tokenizer(policy)
    cfg = validate(GRPOConfig(run_name="r", train_type="lora", lora_rank=4, quantize_for_rollouts=False,
                              use_compile=use_compile, num_generations=4, max_new_tokens=6,
                              max_completion_length=6, temperature=1.0, top_p=1.0, learning_rate=1e-2,
                              warmup_ratio=0.0, beta=0.04, max_grad_norm=0.0))
    add_adapters(policy, cfg)
    ensure_float32(policy, adapters_only=True)
    vision_before = {k: np.array(v) for k, v in tree_flatten(policy.vlm.vision_tower.parameters())}
    assert not any(k.startswith("vlm.vision_tower") for k, _ in tree_flatten(policy.trainable_parameters()))
    setup = build_step(cfg, World(), policy, total_updates=2, stop_token_ids=tokenizer.eos_token_ids)
    # share_prompt_forward is on by default: VLM micro-batches still carry their image features, unshared;
    # the adapters sample in place (no merged copy of a VLM) through the policy's own decoder.
    assert cfg.share_prompt_forward and not setup.share_prompts
    assert rollout_policy(setup, quantized=False) is policy
    state = TrainState()
    prompts = _prompts(policy, images)
    assert isinstance(make_decoder(policy, prompts, 2, 4), VlmDecoder)
    mx.random.seed(3)
    rollouts = sample_rollouts(setup, state, prompts)
    assert all(isinstance(b, PackedBatch) and isinstance(b.model_inputs, dict) for b in rollouts.batches)
    target = rollouts.completions[0].tokens[0]
    rewards = [float(np.mean([t == target for t in c.tokens])) for c in rollouts.completions]
    assert np.std(rewards) > 0
    (update,) = grpo_updates(setup, state, rollouts, rewards)
    assert update.result.applied and np.isfinite(update.result.loss) and update.result.grad_norm > 0
    lora_b = {name: np.abs(np.array(layer.lora_b)).max() for name, layer in adapter_modules(policy)}
    assert lora_b and all(value > 0 for value in lora_b.values()), lora_b
    assert all(name.startswith("vlm.language_model.") for name in lora_b)
    for k, v in tree_flatten(policy.vlm.vision_tower.parameters()):
        np.testing.assert_array_equal(np.array(v), vision_before[k])
    assert rollouts.ref_logp is not None and all(np.isfinite(np.array(r)).all() for r in rollouts.ref_logp)


COLOUR_REWARD = '''
COLOURS = ("red", "green", "blue")


def colour_reward(completions, answer=None, **kwargs):
    """1 for naming the square's colour; 0.2 for naming another colour; else the share of vowels (a random
    model's dense signal)."""
    out = []
    for text, colour in zip(completions, answer):
        if colour in text:
            out.append(1.0)
        elif any(c in text for c in COLOURS):
            out.append(0.2)
        else:
            out.append(sum(ch in "aeiou" for ch in text) / max(len(text), 1) * 0.1)
    return out
'''


@pytest.mark.parametrize("train_type", ["lora", "full"])
def test_trainer_runs_grpo_on_image_questions(folder, tmp_path, train_type):
    """mlx-grpo.py on rows with images: finite losses, evaluation, a checkpoint that loads back as a VLM."""
    from conftest import trainer_main
    from fixture_vlm import write_colour_dataset

    from mlx_grpo.models import load_model

    path, _ = folder
    data = write_colour_dataset(tmp_path / "data", rows_per_colour=3)
    rows = (data / "train.jsonl").read_text().splitlines(keepends=True)
    (data / "train.jsonl").write_text("".join(rows[:6]))  # squares 0 and 1 of each colour
    (data / "test.jsonl").write_text("".join(rows[6:]))  # held out: the same question on other images
    (tmp_path / "rewards.py").write_text(COLOUR_REWARD)
    settings = [f"model_name={path}", f"output_dir={tmp_path / 'out'}", "run_name=run", f"dataset_path={data}",
                f"reward_file={tmp_path / 'rewards.py'}", "reward_funcs=colour_reward", "max_train_samples=4",
                "prompts_per_step=2", "num_generations=4", "micro_batch_size=4", "max_new_tokens=6",
                "max_completion_length=6", "eval_samples=3", "eval_max_new_tokens=6", "quantize_for_rollouts=false",
                "use_compile=false", "pad_to_multiple_of=1", "learning_rate=1e-3", "warmup_ratio=0",
                "completions_log_steps=1", "plot=false", f"train_type={train_type}",
                "temperature=1.0", "top_p=1.0"]
    args = ["--config", "configs/smoke.toml"]
    for item in settings:
        args += ["--set", item]
    history = trainer_main(args + ["--set", "save_steps=1"])
    run_dir = tmp_path / "out" / "run"
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    if train_type == "full":  # resumed after step 1, step 2 is the same
        trainer_main(args + ["--resume", str(run_dir / "checkpoints" / "step_000001")])
        resumed = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
        assert [r["loss"] for r in resumed if "loss" in r] == [r["loss"] for r in records if "loss" in r]
    losses = [r for r in records if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in losses)
    assert all(r["grad_norm"] > 0 for r in losses)
    assert len(history) == 2 and "eval/accuracy" in history[-1]
    checkpoint = sorted((run_dir / "checkpoints").iterdir())[-1]
    if train_type == "full":
        model, _ = load_model(checkpoint)
        assert hasattr(model, "processor")  # a VLM folder: config, weights, processor files
    else:  # the adapters on their base, as inference loads them
        assert (checkpoint / "adapters.safetensors").is_file()
        model, _ = load_adapted_model(checkpoint)
        assert hasattr(model, "processor") and adapter_modules(model)
    from mlx_grpo import inference

    assert inference.main(["--model", str(checkpoint), "--image", str(data / "red_0.png"), "--prompt", "Colour?",
                           "--max-tokens", "3"]) == 0


def test_training_the_vision_tower(folder):
    """vlm_train_vision: the loss forward runs the tower (the same logits as the step's constant features)
    and the update reaches the tower's weights."""
    from mlx_grpo.config import ConfigError
    from mlx_grpo.vlm import check_vlm_config
    from mlx_grpo.vlm.training import prepare_vlm_policy

    path, images = folder
    policy = load_vlm(path)
    cfg = validate(GRPOConfig(run_name="r", vlm_train_vision=True, use_compile=False, quantize_for_rollouts=False,
                              num_generations=4, max_new_tokens=4, max_completion_length=4, temperature=1.0,
                              top_p=1.0, learning_rate=1e-2, warmup_ratio=0.0, max_grad_norm=0.0))
    check_vlm_config(cfg)
    with pytest.raises(ConfigError, match="use_compile = false"):
        check_vlm_config(validate(GRPOConfig(run_name="r", vlm_train_vision=True, quantize_for_rollouts=False)))
    prepare_vlm_policy(policy, cfg)
    ensure_float32(policy)
    assert any(k.startswith("vlm.vision_tower.") for k, _ in tree_flatten(policy.trainable_parameters()))
    setup = build_step(cfg, World(), policy, total_updates=1, stop_token_ids=set())
    state = TrainState()
    prompts = _prompts(policy, images)
    rollouts = sample_rollouts(setup, state, prompts)
    live = policy(rollouts.batches[0].inputs)
    policy.train_vision = False
    _, constant_batches = policy.pack_micro_batches(prompts, rollouts.completions, cfg.effective_micro_batch_size,
                                                    pad_multiple=setup.cfg.pad_to_multiple_of)  # "auto" resolved
    np.testing.assert_allclose(np.array(live), np.array(policy(constant_batches[0].inputs)), atol=1e-5)
    policy.train_vision = True
    before = {k: np.array(v) for k, v in tree_flatten(policy.vlm.vision_tower.parameters())}
    rewards = [float(i % 3 == 0) for i in range(len(rollouts.completions))]
    (update,) = grpo_updates(setup, state, rollouts, rewards)
    assert update.result.applied and np.isfinite(update.result.loss)
    changed = [k for k, v in tree_flatten(policy.vlm.vision_tower.parameters()) if not np.array_equal(np.array(v),
                                                                                                     before[k])]
    assert changed
