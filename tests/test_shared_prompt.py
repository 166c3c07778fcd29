"""The shared-prompt training forward (utils/training/shared_prompt.py) equals the plain one: packing by hand,
log-probs, and the loss and gradients of every loss_type and importance-sampling level, with and without the
old-policy and reference passes, on every covered architecture; groups split across micro-batches included."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models import llama, nanochat, qwen2, qwen3

from mlx_grpo.config import IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES
from mlx_grpo.generation.engine import Completion
from mlx_grpo.nanochat import model as nanochat_2026
from mlx_grpo.training.shared_prompt import SharedPromptBatch, pack_shared_prompt_rows, supports_shared_prompt
from mlx_grpo.training.update import (
    PackedBatch,
    frozen_copy,
    frozen_logprobs,
    loss_normalizers,
    make_loss_and_grad,
    pack_micro_batches,
)

VOCAB = 97
GROUP = 3


def _october():
    return nanochat.Model(nanochat.ModelArgs(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=4, vocab_size=VOCAB, intermediate_size=128))


def _nanochat_2026():
    """Every 2026 feature at once: GQA, a window shorter than the rows, value embeddings, smear, backout."""
    args = nanochat_2026.ModelArgs(
        model_type="nanochat_2026", hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, padded_vocab_size=128, max_position_embeddings=64,
        intermediate_size=128, rope_theta=1e5, softcap=15.0, qk_scale=1.2, rms_norm_eps=1.2e-7,
        window_sizes=[3, 5, None], value_embedding_layers=[0, 2], ve_gate_channels=12, ve_gate_scale=3.0,
        smear=True, smear_gate_channels=24, backout_layer=1)
    model = nanochat_2026.Model(args)
    model.resid_lambdas = mx.array([1.1, 0.9, 1.05])
    model.x0_lambdas = mx.array([0.3, 0.2, 0.1])
    model.smear_lambda = mx.array([0.7])
    model.backout_lambda = mx.array([0.3])
    return model


def _llama():
    return llama.Model(llama.ModelArgs(model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                                       num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                                       vocab_size=VOCAB, tie_word_embeddings=False))


def _qwen3():
    return qwen3.Model(qwen3.ModelArgs(model_type="qwen3", hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                                       num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                                       vocab_size=VOCAB, max_position_embeddings=128, rope_theta=1e4, head_dim=8,
                                       tie_word_embeddings=True))


def _qwen2():
    return qwen2.Model(qwen2.ModelArgs(model_type="qwen2", hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                                       num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                                       vocab_size=VOCAB, tie_word_embeddings=True))


MODELS = {"nanochat": _october, "nanochat_2026": _nanochat_2026, "llama": _llama, "qwen2": _qwen2, "qwen3": _qwen3}


def build(kind, seed=0):
    mx.random.seed(seed)
    model = MODELS[kind]()
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    return model


def rollouts(seed=0):
    """Four prompts (one of a single token, lengths ragged) x GROUP completions: empty ones, forced tool tokens."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, VOCAB, size=n).tolist() for n in (6, 1, 10, 3)]
    completions = []
    for index in range(len(prompts)):
        for _ in range(GROUP):
            n = int(rng.integers(0, 9))
            sampled = [int(x) for x in rng.random(n) > 0.2]
            completions.append(Completion(index, rng.integers(1, VOCAB, size=n).tolist(), sampled, stopped=n < 7))
    return prompts, completions


def perturbed(model, scale, seed):
    """A frozen copy with noise on every weight: old-policy / reference log-probs that differ from the policy's."""
    mx.random.seed(seed)
    copy = frozen_copy(model)
    copy.update(tree_map(lambda p: p + scale * mx.random.normal(p.shape), copy.parameters()))
    mx.eval(copy.parameters())
    return copy


def completion_logp(logp, batch, prompts, completions):
    """Each completion's log-probs (plain rows: after the prompt; shared rows: from 0)."""
    out = []
    for r, c in enumerate(completions):
        start = len(prompts[c.prompt_index]) - 1 if isinstance(batch, PackedBatch) else 0
        out.append(np.array(logp[r, start:start + len(c.tokens)]))
    return out


def test_packing_by_hand():
    prompts = [[5, 6, 7], [8]]
    completions = [Completion(0, [1, 2], [1, 1]), Completion(1, [3, 4, 9], [1, 0, 1]), Completion(0, [2], [1])]
    batch = pack_shared_prompt_rows(prompts, completions, pad_id=0, drop_rows={2}, pad_multiple=4)
    assert batch.prompt_inputs.tolist() == [[5, 6, 0, 0], [0, 0, 0, 0]]  # all but the last token, padded to 4
    assert batch.prompt_lengths.tolist() == [2, 0]
    assert batch.row_prompt.tolist() == [0, 1, 0] and not batch.grouped
    grouped = pack_shared_prompt_rows(prompts, [completions[0], completions[2], completions[1], completions[1]])
    assert grouped.row_prompt.tolist() == [0, 0, 1, 1] and grouped.grouped and grouped.model_inputs[2] is None
    assert batch.inputs.tolist() == [[7, 1, 0, 0], [8, 3, 4, 0], [7, 0, 0, 0]]
    assert batch.targets.tolist() == [[1, 2, 0, 0], [3, 4, 9, 0], [2, 0, 0, 0]]
    assert batch.mask.tolist() == [[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    with pytest.raises(ValueError, match="no tokens"):
        pack_shared_prompt_rows([[]], [Completion(0, [1], [1])])



@pytest.mark.parametrize("kind", list(MODELS))
def test_keys_padded_to_a_multiple_give_the_same_logprobs_and_gradients(kind):
    """key_multiple (128 on CUDA, whose attention backward needs it) only adds masked prompt columns."""
    prompts, completions = rollouts(seed=1)
    by_hand = pack_shared_prompt_rows([[5, 6, 7], [8]], [Completion(0, [1, 2], [1, 1])], pad_multiple=4,
                                      key_multiple=16)
    assert by_hand.prompt_inputs.shape[1] + by_hand.inputs.shape[1] == 16 and by_hand.inputs.shape[1] == 4
    model = build(kind)
    rows = slice(0, 2 * GROUP)
    advantages = mx.array(np.random.default_rng(2).normal(size=2 * GROUP), dtype=mx.float32)
    results = []
    for key_multiple in (1, 128):
        batch = pack_shared_prompt_rows(prompts, completions[rows], pad_multiple=4, key_multiple=key_multiple)
        assert (batch.prompt_inputs.shape[1] + batch.inputs.shape[1]) % key_multiple == 0
        normalizers = loss_normalizers(completions[rows], [batch])
        logp = frozen_logprobs(model, [batch], 0.7)[0]
        results.append((np.array(logp), summed_loss_and_grads(model, [batch], [slice(0, 2 * GROUP)], advantages,
                                                              None, None, normalizers, False, loss_type="dapo",
                                                              beta=0.0, importance_sampling_level="token")))
    (logp_a, (loss_a, grads_a, _)), (logp_b, (loss_b, grads_b, _)) = results
    np.testing.assert_allclose(logp_b, logp_a, rtol=1e-5, atol=1e-5)
    assert loss_b == pytest.approx(loss_a, rel=1e-5, abs=1e-7)
    for name, value in grads_a.items():
        np.testing.assert_allclose(np.array(grads_b[name]), np.array(value), rtol=1e-4, atol=1e-6, err_msg=name)

def test_covered_model_types():
    assert all(supports_shared_prompt(build(kind)) for kind in MODELS)
    sliding = llama.Model(llama.ModelArgs(model_type="llama", hidden_size=32, num_hidden_layers=2,
                                          intermediate_size=64, num_attention_heads=4, rms_norm_eps=1e-5,
                                          vocab_size=VOCAB, layer_types=["sliding_attention", "full_attention"],
                                          sliding_window=4))
    assert not supports_shared_prompt(sliding)  # a rotating cache: the plain forward


@pytest.mark.parametrize("kind", list(MODELS))
def test_logprobs_equal_the_plain_forward(kind):
    model = build(kind)
    prompts, completions = rollouts()
    for micro_batch_size in (GROUP * 2, 4, len(completions)):  # whole groups; groups split; one micro-batch
        slices, plain = pack_micro_batches(prompts, completions, micro_batch_size, pad_multiple=4)
        _, shared = pack_micro_batches(prompts, completions, micro_batch_size, pad_multiple=4, share_prompts=True)
        assert all(isinstance(b, SharedPromptBatch) for b in shared)
        assert all(b.grouped for b in shared) == (micro_batch_size % GROUP == 0)  # both layouts run
        for rows, a, b, la, lb in zip(slices, plain, shared, frozen_logprobs(model, plain, 0.7),
                                      frozen_logprobs(model, shared, 0.7)):
            part = completions[rows]
            for want, got, mask_a, mask_b in zip(completion_logp(la, a, prompts, part),
                                                 completion_logp(lb, b, prompts, part),
                                                 completion_logp(a.mask, a, prompts, part),
                                                 completion_logp(b.mask, b, prompts, part)):
                np.testing.assert_array_equal(mask_a, mask_b)
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        assert loss_normalizers(completions, plain) == loss_normalizers(completions, shared)


def summed_loss_and_grads(model, batches, slices, advantages, old_logp, ref_logp, normalizers, use_compile, **loss):
    loss_and_grad = make_loss_and_grad(model, temperature=0.7, epsilon=0.2, epsilon_high=0.28,
                                       max_completion_length=8, use_compile=use_compile, **loss)
    norms = [mx.array(normalizers[k], dtype=mx.float32)
             for k in ("num_sequences_total", "num_tokens_total", "num_micro_batches")]
    total, grads, stats = 0.0, None, {}
    for i, (rows, batch) in enumerate(zip(slices, batches)):
        (mb_loss, mb_stats), mb_grads = loss_and_grad(
            batch.model_inputs, batch.targets, batch.mask, advantages[rows],
            None if old_logp is None else old_logp[i], None if ref_logp is None else ref_logp[i], *norms)
        grads = mb_grads if grads is None else tree_map(mx.add, grads, mb_grads)
        total = total + mb_loss
        stats = {k: stats.get(k, 0.0) + float(v) for k, v in mb_stats.items()}
    mx.eval(grads, total)
    return float(total), dict(tree_flatten(grads)), stats


@pytest.mark.parametrize("kind", ["nanochat", "nanochat_2026"])
@pytest.mark.parametrize("passes", ["on-policy", "old-policy and reference"])
def test_loss_and_gradients_equal_the_plain_forward(kind, passes):
    model = build(kind)
    prompts, completions = rollouts(seed=1)
    advantages = mx.array(np.random.default_rng(2).normal(size=len(completions)), dtype=mx.float32)
    old_model = perturbed(model, 0.3, seed=3) if passes != "on-policy" else None
    ref_model = perturbed(model, 0.05, seed=4) if passes != "on-policy" else None
    micro_batch_size = 2 * GROUP if passes == "on-policy" else 4  # whole groups (a broadcast); split groups
    slices, plain = pack_micro_batches(prompts, completions, micro_batch_size, mask_truncated=True, pad_multiple=4)
    _, shared = pack_micro_batches(prompts, completions, micro_batch_size, mask_truncated=True, pad_multiple=4,
                                   share_prompts=True)
    normalizers = loss_normalizers(completions, plain)
    for loss_type in LOSS_TYPES:
        for level in IMPORTANCE_SAMPLING_LEVELS:
            results = []
            for batches in (plain, shared):
                old = None if old_model is None else frozen_logprobs(old_model, batches, 0.7)
                ref = None if ref_model is None else frozen_logprobs(ref_model, batches, 0.7)
                use_compile = loss_type == "dapo"  # the trainer's default path, compiled, once per level
                results.append(summed_loss_and_grads(
                    model, batches, slices, advantages, old, ref, normalizers, use_compile, loss_type=loss_type,
                    beta=0.0 if ref is None else 0.04, importance_sampling_level=level))
            (loss_a, grads_a, stats_a), (loss_b, grads_b, stats_b) = results
            where = f"{kind} {loss_type} {level} {passes}"
            assert loss_b == pytest.approx(loss_a, rel=1e-5, abs=1e-7), where
            assert stats_b == pytest.approx(stats_a, rel=1e-5, abs=1e-6), where
            if passes != "on-policy" and "clip_region_sum" in stats_a:  # the clipped losses
                assert stats_a["clip_region_sum"] > 0, "the perturbed old policy should clip some ratios"
            assert grads_a.keys() == grads_b.keys()
            for name, want in grads_a.items():
                scale = float(mx.abs(want).max())
                assert scale > 0 or name.endswith("lambda"), f"{where}: no gradient reaches {name}"
                err = float(mx.abs(grads_b[name] - want).max())
                assert err <= 1e-5 * scale + 1e-9, f"{where}: {name} differs by {err:.3g} (max |grad| {scale:.3g})"


def test_a_bfloat16_forward_runs_and_stays_close():
    """The trainer's compute_dtype: the same numbers up to bfloat16 rounding."""
    model = build("nanochat_2026")
    model.set_dtype(mx.bfloat16)
    prompts, completions = rollouts(seed=5)
    _, plain = pack_micro_batches(prompts, completions, 6, pad_multiple=4)
    _, shared = pack_micro_batches(prompts, completions, 6, pad_multiple=4, share_prompts=True)
    for a, b, la, lb in zip(plain, shared, frozen_logprobs(model, plain, 1.0), frozen_logprobs(model, shared, 1.0)):
        sum_a = float(mx.where(a.mask > 0, la, 0.0).sum())
        sum_b = float(mx.where(b.mask > 0, lb, 0.0).sum())
        assert sum_b == pytest.approx(sum_a, rel=2e-2)


def test_lora_adapters_get_the_same_gradients():
    from mlx_grpo.config import GRPOConfig
    from mlx_grpo.training.lora import add_adapters, base_policy

    model = build("nanochat")
    add_adapters(model, GRPOConfig(train_type="lora", lora_rank=4))
    model.update(tree_map(lambda p: p + 0.01, model.trainable_parameters()))  # B starts at 0: make it non-zero
    assert supports_shared_prompt(model)
    prompts, completions = rollouts(seed=6)
    advantages = mx.array(np.linspace(-1, 1, len(completions)), dtype=mx.float32)
    slices, plain = pack_micro_batches(prompts, completions, 6, pad_multiple=4)
    _, shared = pack_micro_batches(prompts, completions, 6, pad_multiple=4, share_prompts=True)
    normalizers = loss_normalizers(completions, plain)
    results = [summed_loss_and_grads(model, batches, slices, advantages, None, None, normalizers, False,
                                     loss_type="grpo", beta=0.0, importance_sampling_level="token")
               for batches in (plain, shared)]
    for name, want in results[0][1].items():
        assert float(mx.abs(results[1][1][name] - want).max()) <= 1e-5 * float(mx.abs(want).max()), name
    # The reference of a LoRA run is the policy with its adapters off (no copy): the same sharing.
    reference = base_policy(model)
    for a, b, la, lb in zip(plain, shared, frozen_logprobs(reference, plain, 1.0),
                            frozen_logprobs(reference, shared, 1.0)):
        sum_a, sum_b = (float(mx.where(x.mask > 0, lp, 0.0).sum()) for x, lp in ((a, la), (b, lb)))
        assert sum_b == pytest.approx(sum_a, rel=1e-5)


def test_the_trainers_step_shares_prompts_and_takes_the_same_update(tiny_model_dir):
    """sample_rollouts + grpo_updates with share_prompt_forward on and off: quantized rollouts (old-policy
    log-probs from the quantized copy), a quantized reference, two iterations; the same numbers either way."""
    from mlx_grpo.config import GRPOConfig, validate
    from mlx_grpo.models import load_model
    from mlx_grpo.training.distributed import World
    from mlx_grpo.training.step import TrainState, build_step, grpo_updates, sample_rollouts

    prompts = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]
    runs = []
    for share in (False, True):
        cfg = validate(GRPOConfig(run_name="t", num_generations=3, max_new_tokens=5, max_completion_length=5,
                                  micro_batch_size=6, use_compile=False, pad_to_multiple_of=1, beta=0.05,
                                  num_iterations=2, rollout_quant_bits=8, rollout_quant_group_size=32,
                                  share_prompt_forward=share))
        model, _ = load_model(tiny_model_dir)
        setup = build_step(cfg, World(), model, total_updates=2, stop_token_ids=set())
        assert setup.share_prompts == share
        mx.random.seed(0)
        state = TrainState(rollouts_quantized=True)
        rollouts = sample_rollouts(setup, state, prompts)
        assert all(isinstance(b, SharedPromptBatch if share else PackedBatch) for b in rollouts.batches)
        assert rollouts.quantized and rollouts.old_logp is not None and rollouts.ref_logp is not None
        rewards = np.linspace(0.0, 1.0, len(rollouts.completions))
        runs.append(([c.tokens for c in rollouts.completions], grpo_updates(setup, state, rollouts, rewards)))
    (tokens_a, updates_a), (tokens_b, updates_b) = runs
    assert tokens_a == tokens_b
    for a, b in zip(updates_a, updates_b):
        assert b.result.loss == pytest.approx(a.result.loss, abs=1e-6)  # a sum of +-O(1) terms that nearly cancel
        assert b.result.grad_norm == pytest.approx(a.result.grad_norm, rel=1e-5)
        assert b.result.stats == pytest.approx(a.result.stats, rel=1e-5, abs=1e-6)



def test_grad_checkpoint_takes_the_plain_forward_and_says_so(tiny_model_dir, capsys):
    """Checkpointed blocks cannot take the shared forward's caches (they would keep every activation), so
    grad_checkpoint turns sharing off with one line, and the memory plan counts the plain forward."""
    import json
    from pathlib import Path

    from mlx_grpo.config import GRPOConfig, validate
    from mlx_grpo.models import load_model
    from mlx_grpo.training.distributed import World
    from mlx_grpo.training.memory import model_dims, plan_memory
    from mlx_grpo.training.step import build_step

    plans = []
    for checkpoint in (False, True):
        cfg = validate(GRPOConfig(run_name="t", num_generations=3, max_new_tokens=5, max_completion_length=5,
                                  micro_batch_size=6, use_compile=False, pad_to_multiple_of=1,
                                  grad_checkpoint=checkpoint))
        model, _ = load_model(tiny_model_dir)
        assert build_step(cfg, World(), model, total_updates=1, stop_token_ids=set()).share_prompts == (not checkpoint)
        dims = model_dims(json.loads((Path(tiny_model_dir) / "config.json").read_text()), cfg)
        plans.append(plan_memory(dims, cfg, available=0, source="test").phases["update"])
    assert "grad_checkpoint needs the plain forward" in capsys.readouterr().out
    plain = validate(GRPOConfig(run_name="t", num_generations=3, max_new_tokens=5, max_completion_length=5,
                                micro_batch_size=6, pad_to_multiple_of=1, share_prompt_forward=False,
                                grad_checkpoint=True))
    assert plans[1] == plan_memory(dims, plain, available=0, source="test").phases["update"]
