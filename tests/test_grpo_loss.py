"""GRPO loss math against numbers worked out by hand (the arithmetic is in the comments)."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_grpo.training.loss import (
    advantages_from_stats,
    batch_reward_std,
    batch_std_from_sums,
    finalize_stats,
    frac_reward_zero_std,
    group_advantages,
    group_reward_stats,
    grpo_loss,
    token_logprobs,
    token_logprobs_and_entropy,
)

LN2 = math.log(2.0)


def close(a, b, atol=1e-5):
    np.testing.assert_allclose(np.array(a, dtype=np.float64), np.array(b, dtype=np.float64), atol=atol, rtol=0)


# ------------------------------------------------------------------------------------------------
# Advantages
#
# rewards, two groups of 3: [1, 2, 3 | 2, 2, 2]
# group 1: mean 2, deviations (-1, 0, 1), var (1 + 0 + 1) / (3 - 1) = 1, std 1
# group 2: mean 2, deviations (0, 0, 0), std 0  -> no signal, advantage 0 whatever the scaling
# batch:   mean 12 / 6 = 2, squared deviations 1+0+1+0+0+0 = 2, var 2 / 5 = 0.4, std sqrt(0.4)
REWARDS = [1.0, 2.0, 3.0, 2.0, 2.0, 2.0]


def test_advantages_group_scaling():
    adv = group_advantages(mx.array(REWARDS), 3, "group")
    d = 1.0 + 1e-4  # std 1 + eps
    close(adv, [-1 / d, 0, 1 / d, 0, 0, 0], atol=1e-7)


def test_advantages_batch_scaling():
    adv = group_advantages(mx.array(REWARDS), 3, "batch")
    d = math.sqrt(0.4) + 1e-4  # 0.632555...
    close(adv, [-1 / d, 0, 1 / d, 0, 0, 0], atol=1e-6)
    close(batch_reward_std(mx.array(REWARDS)), math.sqrt(0.4), atol=1e-7)


def test_advantages_no_scaling():
    adv = group_advantages(mx.array(REWARDS), 3, "none")
    close(adv, [-1, 0, 1, 0, 0, 0], atol=0)


def test_advantages_groups_of_two():
    # [0, 2 | 5, 5]: group 1 mean 1, var ((-1)^2 + 1^2) / (2 - 1) = 2, std sqrt(2); group 2 std 0
    adv = group_advantages([0.0, 2.0, 5.0, 5.0], 2, "group")
    d = math.sqrt(2.0) + 1e-4
    close(adv, [-1 / d, 1 / d, 0, 0], atol=1e-7)


def test_group_stats_and_zero_std_fraction():
    means, stds = group_reward_stats(mx.array(REWARDS), 3)
    close(means, [2, 2], atol=1e-7)
    close(stds, [1, 0], atol=1e-7)
    assert frac_reward_zero_std(stds) == 0.5  # one group of two has all-equal rewards


def test_advantages_from_precomputed_stats():
    # The same numbers via the multi-process path: stats computed elsewhere, batch std from sums.
    # count 6, sum 12, sum of squares 1 + 4 + 9 + 4 + 4 + 4 = 26
    # var = (26 - 12^2 / 6) / (6 - 1) = (26 - 24) / 5 = 0.4
    std = batch_std_from_sums(6, 12.0, 26.0)
    assert std == pytest.approx(math.sqrt(0.4), abs=1e-12)
    adv = advantages_from_stats(mx.array(REWARDS), mx.array([2.0, 2.0]), "batch", batch_std=std)
    d = math.sqrt(0.4) + 1e-4
    close(adv, [-1 / d, 0, 1 / d, 0, 0, 0], atol=1e-6)
    adv = advantages_from_stats(mx.array(REWARDS), [2.0, 2.0], "group", group_stds=[1.0, 0.0])
    close(adv, group_advantages(mx.array(REWARDS), 3, "group"), atol=0)
    with pytest.raises(ValueError, match="group_stds"):
        advantages_from_stats(mx.array(REWARDS), [2.0, 2.0], "group")


def test_advantages_bad_input():
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        group_advantages(mx.array([1.0, 2.0]), 1, "group")
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(mx.array(REWARDS), 4, "group")
    with pytest.raises(ValueError, match="group, batch, none"):
        group_advantages(mx.array(REWARDS), 3, "std")
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(mx.array([1.0, float("nan")]), 2, "group")
    with pytest.raises(ValueError, match="count >= 2"):
        batch_std_from_sums(1, 1.0, 1.0)


# ------------------------------------------------------------------------------------------------
# Log-probs and entropy


def test_token_logprobs_by_hand():
    # logits (0, ln 2, ln 3): softmax = (1, 2, 3) / 6, so log p(id 2) = ln(3/6) = ln 0.5
    # temperature 0.5 doubles the logits: exp -> (1, 4, 9) / 14, so log p(id 1) = ln(4/14)
    logits = mx.array([[[0.0, LN2, math.log(3.0)]]])
    close(token_logprobs(logits, mx.array([[2]])), [[math.log(0.5)]], atol=1e-6)
    close(token_logprobs(logits, mx.array([[1]]), temperature=0.5), [[math.log(4 / 14)]], atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_token_logprobs_matches_log_softmax(temperature, dtype):
    rng = np.random.default_rng(0)
    logits = mx.array(rng.normal(size=(2, 3, 11)) * 4).astype(dtype)
    targets = mx.array(rng.integers(0, 11, size=(2, 3)))
    got = token_logprobs(logits, targets, temperature)
    assert got.dtype == mx.float32 and got.shape == (2, 3)
    # direct float64 computation from the same (possibly bf16-rounded) logits
    x = np.array(logits.astype(mx.float32), dtype=np.float64) / temperature
    log_softmax = x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)
    want = np.take_along_axis(log_softmax, np.array(targets)[..., None], axis=-1)[..., 0]
    close(got, want, atol=1e-5)


def test_token_logprobs_gradient_matches_log_softmax():
    rng = np.random.default_rng(1)
    logits = mx.array(rng.normal(size=(1, 2, 6)).astype(np.float32))
    targets = mx.array([[3, 0]])
    g_ours = mx.grad(lambda x: token_logprobs(x, targets, 0.8).sum())(logits)
    g_ref = mx.grad(
        lambda x: mx.take_along_axis(mx.log(mx.softmax(x / 0.8, axis=-1)), targets[..., None], -1).sum()
    )(logits)
    close(g_ours, g_ref, atol=1e-5)


def test_token_entropy():
    def entropy(logits, temperature=1.0):
        return token_logprobs_and_entropy(logits, mx.zeros(logits.shape[:-1], dtype=mx.int32), temperature)[1]

    # uniform over V = 8: H = ln 8, at any temperature
    zeros = mx.zeros((1, 2, 8))
    close(entropy(zeros), [[math.log(8)] * 2], atol=1e-6)
    close(entropy(zeros, 0.3), [[math.log(8)] * 2], atol=1e-6)
    # logits (0, ln 3): p = (1/4, 3/4), H = -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.5623351...
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    close(entropy(mx.array([[[0.0, math.log(3.0)]]])), [[h]], atol=1e-6)
    # temperature 0.5 doubles the logits (0, ln 3) -> (0, ln 9): p = (1/10, 9/10)
    h = -(0.1 * math.log(0.1) + 0.9 * math.log(0.9))
    close(entropy(mx.array([[[0.0, math.log(3.0)]]]), 0.5), [[h]], atol=1e-6)
    # metrics only: no gradient flows
    g = mx.grad(lambda x: entropy(x).sum())(mx.array([[[0.0, 1.0, 2.0]]]))
    close(g, [[[0, 0, 0]]], atol=0)


def test_logprobs_and_entropy_in_one_pass_match_separate():
    rng = np.random.default_rng(2)
    logits = mx.array(rng.normal(size=(2, 3, 7)).astype(np.float32))
    targets = mx.array(rng.integers(0, 7, size=(2, 3)))
    logp, ent = token_logprobs_and_entropy(logits, targets, 0.9)
    close(logp, token_logprobs(logits, targets, 0.9), atol=1e-6)
    probs = np.array(mx.softmax(logits / 0.9, axis=-1), dtype=np.float64)
    close(ent, -(probs * np.log(probs)).sum(-1), atol=1e-6)  # -sum p log p, the textbook form
    # gradient comes from the log-probs only
    g_pair = mx.grad(lambda x: sum(a.sum() for a in token_logprobs_and_entropy(x, targets, 0.9)))(logits)
    g_logp = mx.grad(lambda x: token_logprobs(x, targets, 0.9).sum())(logits)
    close(g_pair, g_logp, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# The loss on one tiny batch
#
# 2 completions, 3 token slots, the last slot of completion 2 is padding:
#   mask = [[1, 1, 1], [1, 1, 0]]   |o_1| = 3, |o_2| = 2, 5 tokens
#   A = [+1, -1], epsilon = epsilon_high = 0.2 (clip range [0.8, 1.2])
#   ratios r = [[1.0, 1.5, 0.5], [1.1, 0.7, (pad)]]
# per-token loss l = -min(r A, clip(r) A):
#   seq 1 (A = +1): -min(1.0, 1.0) = -1.0 ; -min(1.5, 1.2) = -1.2 ; -min(0.5, 0.8) = -0.5  -> sum -2.7
#   seq 2 (A = -1): max(1.1, 1.1) = 1.1 ; max(0.7, 0.8) = 0.8                               -> sum  1.9
# grpo    (N = 2):        (-2.7 / 3 + 1.9 / 2) / 2 = (-0.9 + 0.95) / 2 = 0.025
# bnpo    (1 micro-batch): (-2.7 + 1.9) / 5 = -0.16
# dr_grpo (N = 2, L = 4):  -0.8 / (2 * 4) = -0.1
# dapo    (5 tokens):      -0.8 / 5 = -0.16
# clip stats over the 5 tokens: low (r < 0.8, A < 0): r = 0.7 -> 1 ; high (r > 1.2, A > 0): r = 1.5 -> 1
# ratio mean (1.0 + 1.5 + 0.5 + 1.1 + 0.7) / 5 = 4.8 / 5 = 0.96

MASK = mx.array([[1, 1, 1], [1, 1, 0]])
ADV = mx.array([1.0, -1.0])
OLD = mx.array([[-1.0, -2.0, -0.5], [-0.3, -1.2, -0.7]])
RATIOS = [[1.0, 1.5, 0.5], [1.1, 0.7, 1.0]]
LOGP = OLD + mx.log(mx.array(RATIOS))
TOTALS = dict(max_completion_length=4, num_sequences_total=2, num_tokens_total=5, num_micro_batches=1)


def loss_of(logp, old=OLD, ref=None, adv=ADV, mask=MASK, **kw):
    args = dict(loss_type="dapo", epsilon=0.2, beta=0.0, **TOTALS)
    args.update(kw)
    return grpo_loss(logp, old, ref, adv, mask, **args)


@pytest.mark.parametrize(
    "loss_type, expected", [("grpo", 0.025), ("bnpo", -0.16), ("dr_grpo", -0.1), ("dapo", -0.16)]
)
def test_every_loss_type_on_tiny_batch(loss_type, expected):
    loss, stats = loss_of(LOGP, loss_type=loss_type)
    close(loss, expected)
    metrics = finalize_stats(stats)
    close(metrics["clip_ratio/low_mean"], 1 / 5)
    close(metrics["clip_ratio/high_mean"], 1 / 5)
    close(metrics["clip_ratio/region_mean"], 2 / 5)
    close(metrics["importance_ratio/mean"], 0.96)
    assert "kl" not in metrics  # no reference log-probs given


def test_dapo_uses_token_count_of_whole_batch():
    # the same micro-batch inside a generation batch of 8 tokens: -0.8 / 8 = -0.1
    loss, _ = loss_of(LOGP, loss_type="dapo", num_tokens_total=8)
    close(loss, -0.1)


def test_bnpo_divides_by_micro_batches():
    # two micro-batches: each contributes its token mean / 2 -> -0.16 / 2 = -0.08
    loss, _ = loss_of(LOGP, loss_type="bnpo", num_micro_batches=2)
    close(loss, -0.08)


def single_token(ratio, adv, **kw):
    """Loss and d loss / d logp for one token with the given ratio (dapo over 1 token = the token loss)."""
    old = mx.array([[0.0]])
    logp = mx.log(mx.array([[ratio]]))
    fn = lambda lp: loss_of(lp, old=old, adv=mx.array([adv]), mask=mx.array([[1]]), num_tokens_total=1, **kw)[0]
    loss, grad = mx.value_and_grad(fn)(logp)
    _, stats = loss_of(logp, old=old, adv=mx.array([adv]), mask=mx.array([[1]]), num_tokens_total=1, **kw)
    return loss.item(), grad.item(), finalize_stats(stats)


def test_asymmetric_clipping_epsilon_high():
    # epsilon 0.2, epsilon_high 0.28 -> clip range [0.8, 1.28]
    # r = 1.25, A = +1: inside the range now (with symmetric 0.2 it would be clipped to 1.2)
    loss, grad, _ = single_token(1.25, 1.0, epsilon_high=0.28)
    assert loss == pytest.approx(-1.25, abs=1e-6)
    assert grad == pytest.approx(-1.25, abs=1e-6)  # d(-r)/d logp = -r
    loss, grad, _ = single_token(1.25, 1.0)
    assert loss == pytest.approx(-1.2, abs=1e-6) and grad == 0.0
    # r = 1.5 > 1.28, A = +1: clipped, -min(1.5, 1.28) = -1.28, no gradient, counted as high clip
    loss, grad, m = single_token(1.5, 1.0, epsilon_high=0.28)
    assert loss == pytest.approx(-1.28, abs=1e-6) and grad == 0.0
    assert m["clip_ratio/high_mean"] == 1.0 and m["clip_ratio/low_mean"] == 0.0
    # r = 1.5, A = -1: not clipped, -min(-1.5, -1.28) = 1.5, gradient d(r)/d logp = r = 1.5
    loss, grad, m = single_token(1.5, -1.0, epsilon_high=0.28)
    assert loss == pytest.approx(1.5, abs=1e-6) and grad == pytest.approx(1.5, abs=1e-5)
    assert m["clip_ratio/region_mean"] == 0.0
    # low side, r = 0.75 < 0.8: A = -1 clipped (-min(-0.75, -0.8) = 0.8), A = +1 not (-0.75)
    loss, grad, m = single_token(0.75, -1.0, epsilon_high=0.28)
    assert loss == pytest.approx(0.8, abs=1e-6) and grad == 0.0 and m["clip_ratio/low_mean"] == 1.0
    loss, grad, m = single_token(0.75, 1.0, epsilon_high=0.28)
    assert loss == pytest.approx(-0.75, abs=1e-6) and grad == pytest.approx(-0.75, abs=1e-6)
    assert m["clip_ratio/region_mean"] == 0.0


def test_k3_kl_value_and_gradient():
    # one completion, 2 tokens, A = 0 so only the KL term is left; ref - logp = d = (ln 2, -ln 2)
    # k3 = e^d - d - 1: (2 - ln2 - 1) + (1/2 + ln2 - 1) = 0.3068528 + 0.1931472 = 0.5 in total
    # dapo over 2 tokens, beta 0.1: 0.1 * 0.5 / 2 = 0.025 ; kl metric 0.5 / 2 = 0.25
    # d k3 / d logp = -e^d + 1 = (-1, +0.5), times beta / 2 tokens = (-0.05, 0.025)
    logp = mx.array([[-1.0, -2.0]])
    ref = logp + mx.array([[LN2, -LN2]])
    kw = dict(ref=ref, adv=mx.array([0.0]), mask=mx.array([[1, 1]]), beta=0.1, num_tokens_total=2)
    loss, stats = loss_of(logp, old=None, **kw)
    close(loss, 0.025)
    close(finalize_stats(stats)["kl"], 0.25)
    grad = mx.grad(lambda lp: loss_of(lp, old=None, **kw)[0])(logp)
    close(grad, [[-0.05, 0.025]])
    # ref == logp -> KL is exactly 0
    kw["ref"] = logp
    loss, stats = loss_of(logp, old=None, **kw)
    assert loss.item() == 0.0 and finalize_stats(stats)["kl"] == 0.0


def test_beta_needs_reference():
    with pytest.raises(ValueError, match="ref_logp"):
        loss_of(LOGP, beta=0.04)


def test_gspo_sequence_ratio():
    # log ratios: seq 1 (0.3, -0.1, 0.1) -> mean 0.1 -> r_1 = e^0.1 = 1.1051709
    #             seq 2 (0.2, -0.6, pad = 99, ignored) -> mean -0.4 / 2 = -0.2 -> r_2 = e^-0.2 = 0.8187308
    # epsilon 0.15 -> [0.85, 1.15]: r_1 inside, A = +1 -> l_1 = -1.1051709 on each of its tokens
    #                               r_2 < 0.85, A = -1 -> clipped, l_2 = -min(-0.8187, -0.85) = 0.85
    # grpo: (3 * l_1 / 3 + 2 * l_2 / 2) / 2 = (-1.1051709 + 0.85) / 2 = -0.12758545
    # dapo: (3 * l_1 + 2 * l_2) / 5 = (-3.3155128 + 1.7) / 5 = -0.32310256
    # clip stats per sequence: low 1 of 2, high 0; ratio mean (1.1051709 + 0.8187308) / 2 = 0.96195085
    log_ratio = mx.array([[0.3, -0.1, 0.1], [0.2, -0.6, 99.0]])
    logp = OLD + log_ratio
    kw = dict(epsilon=0.15, importance_sampling_level="sequence")
    loss, stats = loss_of(logp, loss_type="grpo", **kw)
    close(loss, -0.12758545)
    loss, stats = loss_of(logp, loss_type="dapo", **kw)
    close(loss, -0.32310256)
    m = finalize_stats(stats)
    close(m["clip_ratio/low_mean"], 0.5)
    close(m["clip_ratio/high_mean"], 0.0)
    close(m["clip_ratio/region_mean"], 0.5)
    close(m["importance_ratio/mean"], 0.96195085)
    assert stats["num_ratio_units"].item() == 2  # sequences, not tokens


def test_gspo_gradient_on_policy():
    # on-policy l_i = -A_i exp(mean_t(logp - sg(logp))): d l_i / d logp_t = -A_i / |o_i| on its tokens;
    # grpo averages each sequence's (identical) token losses, so d loss / d logp_t = -A_i / (|o_i| N)
    # seq 1: -1 / (3 * 2) = -1/6 ; seq 2: +1 / (2 * 2) = 0.25 ; pad 0
    fn = lambda lp: loss_of(lp, old=None, loss_type="grpo", importance_sampling_level="sequence")[0]
    close(mx.grad(fn)(LOGP), [[-1 / 6, -1 / 6, -1 / 6], [0.25, 0.25, 0.0]])


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_masked_tokens_change_nothing(loss_type, level):
    # the padding slot [1, 2] gets wild values (a log ratio of +100 would overflow exp in float32)
    ref = OLD - 0.3
    kw = dict(loss_type=loss_type, importance_sampling_level=level, beta=0.05)

    def run(logp, old, ref):
        fn = lambda lp: loss_of(lp, old=old, ref=ref, **kw)[0]
        return mx.value_and_grad(fn)(logp)

    pad = mx.array([[0, 0, 0], [0, 0, 1]]).astype(mx.bool_)
    loss_a, grad_a = run(LOGP, OLD, ref)
    loss_b, grad_b = run(mx.where(pad, 50.0, LOGP), mx.where(pad, -50.0, OLD), mx.where(pad, 1e4, ref))
    assert math.isfinite(loss_b.item())
    close(loss_a, loss_b, atol=0)
    close(grad_a, grad_b, atol=0)
    assert grad_a[1, 2].item() == 0.0


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_micro_batch_losses_sum_to_batch_loss(loss_type, level):
    # 4 completions (2 groups of 2), 3 slots; split into two micro-batches of 2
    logp = mx.array([[-1.0, -0.5, -2.0], [-0.2, -0.9, -1.1], [-1.5, -0.4, -0.8], [-0.6, -0.7, -3.0]])
    old = logp + mx.array([[0.1, -0.3, 0.05], [0.2, 0.0, -0.1], [-0.25, 0.15, 0.3], [0.0, 0.1, -0.4]])
    ref = logp - 0.2
    adv = mx.array([0.7, -0.7, 1.2, -1.2])
    mask = mx.array([[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0]])  # last row: a truncated, masked completion
    totals = dict(max_completion_length=3, num_sequences_total=4, num_tokens_total=6, num_micro_batches=2)
    kw = dict(loss_type=loss_type, importance_sampling_level=level, epsilon=0.2, beta=0.04, **totals)
    whole, whole_stats = grpo_loss(logp, old, ref, adv, mask, **kw)
    parts = [grpo_loss(logp[s], old[s], ref[s], adv[s], mask[s], **kw) for s in (slice(0, 2), slice(2, 4))]
    close(parts[0][0] + parts[1][0], whole, atol=1e-6)
    summed = {key: parts[0][1][key] + parts[1][1][key] for key in parts[0][1]}
    for key, value in whole_stats.items():
        if not key.startswith("mean/") and key != "micro_batches":  # per-micro-batch means do not add up
            close(summed[key], value, atol=1e-6)


def test_bnpo_micro_batches_average_token_means():
    # bnpo is per micro-batch: the summed loss is the mean of the micro-batches' token means (TRL)
    logp = mx.array([[-1.0, -0.5], [-0.2, -0.9]])
    adv = mx.array([1.0, -3.0])
    mask = mx.array([[1, 1], [1, 0]])
    # on-policy, r = 1: l = -A per token. micro-batch 1: (-1 - 1) / 2 = -1 ; micro-batch 2: 3 / 1 = 3
    # summed loss with num_micro_batches 2: (-1 + 3) / 2 = 1
    parts = [
        grpo_loss(logp[i : i + 1], None, None, adv[i : i + 1], mask[i : i + 1], loss_type="bnpo", num_micro_batches=2)[0]
        for i in range(2)
    ]
    close(parts[0] + parts[1], 1.0)


@pytest.mark.parametrize(
    "loss_type, expected_grad, expected_loss",
    [
        # grad = -A * mask / normalizer, A = (0.5, -2)
        # grpo: normalizer |o_i| * N: seq 1 -0.5 / (3 * 2) = -1/12, seq 2 2 / (2 * 2) = 0.5
        #       loss -(0.5 * 3 / 3 - 2 * 2 / 2) / 2 = -(0.5 - 2) / 2 = 0.75
        ("grpo", [[-1 / 12] * 3, [0.5, 0.5, 0]], 0.75),
        # bnpo / dapo: normalizer 5 tokens: -0.5 / 5 = -0.1, 2 / 5 = 0.4 ; loss -(1.5 - 4) / 5 = 0.5
        ("bnpo", [[-0.1] * 3, [0.4, 0.4, 0]], 0.5),
        ("dapo", [[-0.1] * 3, [0.4, 0.4, 0]], 0.5),
        # dr_grpo: normalizer N * L = 8: -0.5 / 8 = -0.0625, 2 / 8 = 0.25 ; loss 2.5 / 8 = 0.3125
        ("dr_grpo", [[-0.0625] * 3, [0.25, 0.25, 0]], 0.3125),
    ],
)
def test_on_policy_gradient_is_reinforce(loss_type, expected_grad, expected_loss):
    # old = stop_gradient(logp): r = 1 and d r / d logp = 1, so d l / d logp = -A (REINFORCE)
    adv = mx.array([0.5, -2.0])
    fn = lambda lp: loss_of(lp, old=None, adv=adv, loss_type=loss_type)[0]
    loss, grad = mx.value_and_grad(fn)(LOGP)
    close(grad, expected_grad)
    close(loss, expected_loss)


def test_bad_arguments_name_valid_values():
    with pytest.raises(ValueError, match="grpo, bnpo, dr_grpo, dapo"):
        loss_of(LOGP, loss_type="ppo")
    with pytest.raises(ValueError, match="token, sequence"):
        loss_of(LOGP, importance_sampling_level="group")
    with pytest.raises(ValueError, match="num_tokens_total"):
        grpo_loss(LOGP, OLD, None, ADV, MASK, loss_type="dapo")
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(LOGP, OLD, None, ADV, MASK, loss_type="dr_grpo", num_sequences_total=2)
    with pytest.raises(ValueError, match="advantages"):
        loss_of(LOGP, adv=mx.array([1.0, 2.0, 3.0]))


def test_works_under_compile():
    # the trainer may mx.compile its step; the loss must trace (no host syncs on array values)
    fn = mx.compile(lambda lp, old, adv: loss_of(lp, old=old, adv=adv, loss_type="grpo")[0])
    close(fn(LOGP, OLD, ADV), 0.025)


def test_entropy_stat_is_masked_token_mean():
    # entropies of the 5 mask tokens: 1 + 2 + 3 + 4 + 5 = 15 -> mean 3 (the padding slot's 99 is ignored)
    entropy = mx.array([[1.0, 2.0, 3.0], [4.0, 5.0, 99.0]])
    _, stats = loss_of(LOGP, entropy=entropy)
    close(finalize_stats(stats)["entropy"], 3.0)


def test_all_masked_batch_gives_zero_loss():
    # every completion truncated and masked: no tokens anywhere, loss 0 (not NaN) for every type
    mask = mx.zeros((2, 3))
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        loss, stats = loss_of(LOGP, mask=mask, loss_type=loss_type, num_tokens_total=0)
        assert loss.item() == 0.0
        assert finalize_stats(stats)["clip_ratio/region_mean"] == 0.0
