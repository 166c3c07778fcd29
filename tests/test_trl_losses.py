"""TRL's newer loss types (cispo, sapo, luspo, vespo, delta), the rollout importance-sampling correction,
TRL's refusals and warnings, and the metrics TRL names: against numbers worked out by hand (in the comments)."""

import math

import mlx.core as mx
import numpy as np
import pytest
from test_grpo_loss import ADV, LOGP, MASK, OLD, TOTALS, close

from mlx_grpo.config import ConfigError, GRPOConfig, config_warnings, validate
from mlx_grpo.training.loss import finalize_stats, grpo_loss
from mlx_grpo.training.rollout_correction import importance_sampling_weights, sampling_metrics

# The tiny batch of tests/test_grpo_loss.py:
#   mask = [[1, 1, 1], [1, 1, 0]] (|o_1| = 3, |o_2| = 2, 5 tokens), A = [+1, -1]
#   ratios r = [[1.0, 1.5, 0.5], [1.1, 0.7, (pad)]], logp = old + log r:
#   logp seq 1 = (-1, -2 + ln 1.5, -0.5 + ln 0.5) = (-1, -1.5945349, -1.1931472)
#   logp seq 2 = (-0.3 + ln 1.1, -1.2 + ln 0.7) = (-0.2046898, -1.5566749)


def loss_of(logp, old=OLD, adv=ADV, mask=MASK, **kw):
    args = dict(loss_type="dapo", epsilon=0.2, beta=0.0, **TOTALS)
    args.update(kw)
    return grpo_loss(logp, old, None, adv, mask, **args)


def grad_of(logp=LOGP, **kw):
    return mx.grad(lambda lp: loss_of(lp, **kw)[0])(logp)


# ------------------------------------------------------------------------------------------------
# Loss types


def test_cispo_weights_logp_by_the_capped_ratio():
    # epsilon_high 1.2 is CISPO's eps_max: w = stop_gradient(min(r, 1.2)) = [[1, 1.2, 0.5], [1.1, 0.7]]
    # l = -w A logp: seq 1: 1 * 1 + 1.2 * 1.5945349 + 0.5 * 1.1931472 = 3.5100155
    #                seq 2: -(1.1 * 0.2046898 + 0.7 * 1.5566749) = -1.3148312 ; over 5 tokens: 2.1951843 / 5
    loss, stats = loss_of(LOGP, loss_type="cispo", epsilon_high=1.2)
    close(loss, 0.43903684)
    # d loss / d logp = -w A / 5 (no gradient through w): [[-0.2, -0.24, -0.1], [0.22, 0.14, 0]]
    close(grad_of(loss_type="cispo", epsilon_high=1.2), [[-0.2, -0.24, -0.1], [0.22, 0.14, 0.0]])
    # cispo_clip_ratio: r > 1.2 with A > 0: the 1.5 token, 1 of 5
    metrics = finalize_stats(stats)
    close(metrics["cispo_clip_ratio"], 0.2)
    assert "clip_ratio/region_mean" not in metrics  # TRL logs the clip ratios for the clipped losses only


def test_sapo_soft_gate_value_and_on_policy_gradient():
    # l = -(4 / tau) sigmoid(tau (r - 1)) A, tau = 1 for A > 0, 1.05 otherwise; grpo's aggregation
    # seq 1 (tau 1): 4 (sigmoid(0) + sigmoid(0.5) + sigmoid(-0.5)) = 4 * 1.5 = 6 -> mean -6 / 3 = -2
    # seq 2 (tau 1.05): (4 / 1.05) (sigmoid(0.105) + sigmoid(-0.315)) = 2.0046701 + 1.6072182 -> mean 1.8059441
    # loss (-2 + 1.8059441) / 2 = -0.0970279
    loss, _ = loss_of(LOGP, loss_type="sapo")
    close(loss, -0.0970279)
    # on-policy (r = 1): d/dr (4 / tau) sigmoid(tau (r - 1)) = 4 sigmoid'(0) = 1, so the gradient is
    # grpo's REINFORCE one: -A / (|o_i| N) = seq 1 -1 / 6, seq 2 +1 / 4
    close(grad_of(old=None, loss_type="sapo"), [[-1 / 6] * 3, [0.25, 0.25, 0.0]])


def test_luspo_scales_each_sequence_loss_by_its_length():
    # sequence level, epsilon 0.15 (tests/test_grpo_loss.py's GSPO case): l_1 = -e^0.1 = -1.1051709, l_2 = 0.85
    # luspo = mean_i(l_i |o_i|) = (3 * -1.1051709 + 2 * 0.85) / 2 = -0.8077564
    logp = OLD + mx.array([[0.3, -0.1, 0.1], [0.2, -0.6, 99.0]])
    loss, stats = loss_of(logp, loss_type="luspo", epsilon=0.15, importance_sampling_level="sequence")
    close(loss, -0.8077564)
    close(finalize_stats(stats)["clip_ratio/low_mean"], 0.5)  # seq 2 below 0.85 with A < 0


def test_vespo_gamma_weights_and_gradient():
    # w_i = prod_t r_t: seq 1 1 * 1.5 * 0.5 = 0.75, seq 2 1.1 * 0.7 = 0.77
    # phi = exp(lam + k ln w - lam w): seq 1 (A >= 0: k 2, lam 3): exp(3 + 2 ln 0.75 - 2.25) = 1.1908125
    #                                   seq 2 (A < 0: k 3, lam 2):  exp(2 + 3 ln 0.77 - 1.54) = 0.7231820
    # l = -phi A logp, over 5 tokens: d loss / d logp = -phi A / 5 = seq 1 -0.2381625, seq 2 +0.1446364
    loss, stats = loss_of(LOGP, loss_type="vespo")
    close(grad_of(loss_type="vespo"), [[-0.2381625] * 3, [0.1446364, 0.1446364, 0.0]])
    close(finalize_stats(stats)["vespo/phi_seq_mean"], (1.1908125 + 0.7231820) / 2)
    # loss: -(1.1908125 * sum(logp_1) - 0.7231820 * sum(logp_2)) / 5, sums -3.7876821 and -1.7613647
    close(loss, -(1.1908125 * -3.7876821 - 0.7231820 * -1.7613647) / 5)


def test_vespo_puts_the_rollout_weights_into_w_and_not_onto_the_loss():
    # is weights [[1, 2, 1], [0.5, 1, pad]]: w_1 = 0.75 * 2 = 1.5, w_2 = 0.77 * 0.5 = 0.385
    # phi_1 = exp(3 + 2 ln 1.5 - 4.5) = 0.5020429, phi_2 = exp(2 + 3 ln 0.385 - 0.77) = 0.1952380
    weights = mx.array([[1.0, 2.0, 1.0], [0.5, 1.0, 1.0]])
    close(grad_of(loss_type="vespo", is_weights=weights), [[-0.5020429 / 5] * 3, [0.1952380 / 5] * 2 + [0.0]])


def test_delta_caps_the_unclipped_ratio_two_sided():
    # one token, A = -1, epsilon 0.2: r = 1.5 is not clipped by PPO (l = -min(-1.5, -1.2) = 1.5, grad 1.5);
    # delta 1.4 caps it: l = -min(-1.4, -1.2) = 1.4 with no gradient; r = 1.3 < delta keeps l = 1.3, grad 1.3
    def one(ratio, **kw):
        old, mask, adv = mx.array([[0.0]]), mx.array([[1]]), mx.array([-1.0])
        fn = lambda lp: loss_of(lp, old=old, adv=adv, mask=mask, num_tokens_total=1, **kw)[0]
        loss, grad = mx.value_and_grad(fn)(mx.log(mx.array([[ratio]])))
        return loss.item(), grad.item()

    assert one(1.5) == pytest.approx((1.5, 1.5), abs=1e-5)
    assert one(1.5, delta=1.4) == pytest.approx((1.4, 0.0), abs=1e-5)
    assert one(1.3, delta=1.4) == pytest.approx((1.3, 1.3), abs=1e-5)


def test_is_weights_multiply_the_policy_loss_of_clipped_losses():
    # per-token clipped losses (test_grpo_loss.py): [[-1.0, -1.2, -0.5], [1.1, 0.8]]
    # weights [[1, 2, 0], [0.5, 1, pad]]: [[-1, -2.4, 0], [0.55, 0.8]] -> dapo sum -2.05 / 5 = -0.41
    weights = mx.array([[1.0, 2.0, 0.0], [0.5, 1.0, 7.0]])
    close(loss_of(LOGP, is_weights=weights)[0], -0.41)
    # a sequence-level weight [B, 1] broadcasts to its tokens: [[2], [1]] -> (-5.4 + 1.9) / 5 = -0.7
    close(loss_of(LOGP, is_weights=mx.array([[2.0], [1.0]]))[0], -0.7)


def test_metrics_average_the_micro_batches_means_as_trl_logs_them():
    # entropies, micro-batch 1 = row 1 (3 tokens: 1, 2, 3 -> mean 2), micro-batch 2 = row 2 (4, 5 -> mean 4.5)
    # TRL: the mean of the micro-batch means (2 + 4.5) / 2 = 3.25 (pooled over the 5 tokens it would be 3)
    entropy = mx.array([[1.0, 2.0, 3.0], [4.0, 5.0, 99.0]])
    parts = [loss_of(LOGP[s], old=OLD[s], adv=ADV[s], mask=MASK[s], entropy=entropy[s])[1]
             for s in (slice(0, 1), slice(1, 2))]
    summed = {key: parts[0][key] + parts[1][key] for key in parts[0]}
    close(finalize_stats(summed)["entropy"], 3.25)
    # clip ratios: row 1 (A > 0): high r 1.5 -> 1/3, low 0 ; row 2 (A < 0): low r 0.7 -> 1/2, high 0
    metrics = finalize_stats(summed)
    close(metrics["clip_ratio/high_mean"], (1 / 3 + 0) / 2)
    close(metrics["clip_ratio/low_mean"], (0 + 1 / 2) / 2)


# ------------------------------------------------------------------------------------------------
# Rollout importance sampling (training/rollout_correction.py)
#
# trained - rollout log-probs, mask [[1, 1, 1], [1, 1, 0]]:
#   [[ln 2, -ln 4, ln 5], [ln 0.5, ln 3, (pad 9)]] -> token ratios [[2, 0.25, 5], [0.5, 3, (1)]]
#   sequence ratios: exp(ln 2 - ln 4 + ln 5) = 2.5 ; exp(ln 0.5 + ln 3) = 1.5
ROLLOUT = mx.array([[-1.0, -0.5, -2.0], [-0.2, -1.5, -0.3]])
TRAINED = ROLLOUT + mx.array([[math.log(2), -math.log(4), math.log(5)], [math.log(0.5), math.log(3), 9.0]])


@pytest.mark.parametrize("mode, low, high, expected", [
    # truncate to [0.3, 3]: [[2, 0.3, 3], [0.5, 3, 1]]
    ("token_truncate", 0.3, 3.0, [[2, 0.3, 3], [0.5, 3, 1]]),
    # only an upper cap (TRL's default clip_min None): [[2, 0.25, 3], [0.5, 3, 1]]
    ("token_truncate", None, 3.0, [[2, 0.25, 3], [0.5, 3, 1]]),
    # mask outside [0.3, 3]: 0.25 and 5 -> 0 ; 3 stays (the bounds are kept)
    ("token_mask", 0.3, 3.0, [[2, 0, 0], [0.5, 3, 1]]),
    # sequences: 2.5, 1.5 ; truncate at 2 -> 2, 1.5 ; mask above 2 -> 0, 1.5
    ("sequence_truncate", None, 2.0, [[2], [1.5]]),
    ("sequence_mask", None, 2.0, [[0], [1.5]]),
])
def test_importance_sampling_weights_by_mode(mode, low, high, expected):
    close(importance_sampling_weights(TRAINED, ROLLOUT, MASK, mode, low, high), expected)


def test_sampling_metrics_as_trl_logs_them():
    # |trained - rollout| on mask tokens: ln 2, ln 4, ln 5, ln 2, ln 3 -> mean (0.6931 + 1.3863 + 1.6094
    # + 0.6931 + 1.0986) / 5 = 1.0961, max ln 5 = 1.6094
    # token_truncate (None, 3): ratios on mask tokens 2, 0.25, 3, 0.5, 3 -> min 0.25, mean 8.75 / 5, max 3
    weights = [importance_sampling_weights(TRAINED, ROLLOUT, MASK, "token_truncate", None, 3.0)]
    m = sampling_metrics([TRAINED], [ROLLOUT], weights, [MASK], "token_truncate")
    close(m["sampling/sampling_logp_difference/mean"], (2 * math.log(2) + math.log(4) + math.log(5) + math.log(3)) / 5)
    close(m["sampling/sampling_logp_difference/max"], math.log(5))
    close([m["sampling/importance_sampling_ratio/" + k] for k in ("min", "mean", "max")], [0.25, 1.75, 3.0])
    # sequence_mask (None, 2): one ratio per sequence, 0 and 1.5 -> min 0, mean 0.75, max 1.5
    weights = [importance_sampling_weights(TRAINED, ROLLOUT, MASK, "sequence_mask", None, 2.0)]
    m = sampling_metrics([TRAINED], [ROLLOUT], weights, [MASK], "sequence_mask")
    close([m["sampling/importance_sampling_ratio/" + k] for k in ("min", "mean", "max")], [0.0, 0.75, 1.5])


# ------------------------------------------------------------------------------------------------
# TRL's refusals (ConfigError before any model loads) and warnings


@pytest.mark.parametrize("settings, message", [
    (dict(vllm_importance_sampling_clip_min=3.0, vllm_importance_sampling_clip_max=2.0), "must be below"),
    (dict(vllm_importance_sampling_clip_max=None), "needs vllm_importance_sampling_clip_min or"),
    (dict(loss_type="vespo", vllm_importance_sampling_mode="sequence_mask"), "token-level importance weights"),
    (dict(vllm_importance_sampling_mode="token"), "vllm_importance_sampling_mode must be one of"),
    (dict(delta=0.9), "delta caps the ratio"),
    (dict(loss_type="ppo"), "loss_type must be one of"),
])
def test_trl_refusals_are_one_line_config_errors(settings, message):
    with pytest.raises(ConfigError, match=message) as error:
        validate(GRPOConfig(run_name="t", **settings))
    assert "\n" not in str(error.value)


def test_what_trl_warns_about_runs_with_a_one_line_warning():
    assert config_warnings(validate(GRPOConfig(run_name="t"))) == []
    for settings, words in [(dict(loss_type="luspo"), "luspo"),
                            (dict(loss_type="vespo", importance_sampling_level="sequence"), "vespo"),
                            (dict(loss_type="dapo", importance_sampling_level="sequence"), "GSPO")]:
        warnings = config_warnings(validate(GRPOConfig(run_name="t", **settings)))
        assert len(warnings) == 1 and words in warnings[0] and "\n" not in warnings[0]
    assert config_warnings(validate(GRPOConfig(run_name="t", loss_type="grpo", importance_sampling_level="sequence"))) == []


# ------------------------------------------------------------------------------------------------
# Masks, the KL's bias correction and the entropy bonus (issue 20, item 3)
#
# per-token clipped losses of the tiny batch (dapo over 5 tokens): [[-1.0, -1.2, -0.5], [1.1, 0.8]]
ENTROPY = mx.array([[1.0, 2.0, 3.0], [4.0, 5.0, 99.0]])  # the padding slot's 99 never counts


@pytest.mark.parametrize("top, kept", [
    # quantile 1 - top of the mask tokens' entropies 1..5 (n = 5, position q * 4, linear interpolation):
    (0.5, [[0, 0, 1], [1, 1, 0]]),  # q 0.5: position 2 -> 3 ; keep 3, 4, 5
    (0.2, [[0, 0, 0], [0, 1, 0]]),  # q 0.8: position 3.2 -> 4 + 0.2 * (5 - 4) = 4.2 ; keep 5
    (0.0, [[0, 0, 0], [0, 1, 0]]),  # q 1: position 4 -> 5 ; keep the highest only
    (0.9, [[0, 1, 1], [1, 1, 0]]),  # q 0.1: position 0.4 -> 1.4 ; keep 2, 3, 4, 5
])
def test_top_entropy_quantile_keeps_the_high_entropy_tokens(top, kept):
    from mlx_grpo.training.loss import high_entropy_mask

    close(high_entropy_mask(ENTROPY, MASK, 1.0 - top), kept, atol=0)
    # the loss keeps those tokens' losses, still over the 5 tokens: top 0.5 -> (-0.5 + 1.1 + 0.8) / 5 = 0.28
    if top == 0.5:
        close(loss_of(LOGP, entropy=ENTROPY, top_entropy_quantile=0.5)[0], 0.28)


def test_off_policy_mask_drops_negative_sequences_far_from_the_sampler():
    # sampling - logp: seq 1 mean 1.0 (A > 0: kept whatever), seq 2 mean 0.9 (A < 0)
    sampling = LOGP + mx.array([[1.0, 1.0, 1.0], [0.9, 0.9, 50.0]])
    # threshold 0.5: seq 2 dropped -> -2.7 / 5 = -0.54 ; threshold 1: kept -> (-2.7 + 1.9) / 5 = -0.16
    loss, stats = loss_of(LOGP, sampling_logp=sampling, off_policy_mask_threshold=0.5)
    close(loss, -0.54)
    close(finalize_stats(stats)["off_policy_mask/kept"], 0.5)
    close(loss_of(LOGP, sampling_logp=sampling, off_policy_mask_threshold=1.0)[0], -0.16)
    # without sampling log-probs the mask compares with old_logp: on-policy the KL is 0, nothing dropped
    close(loss_of(LOGP, old=None, off_policy_mask_threshold=0.01)[0], loss_of(LOGP, old=None)[0])


def test_bias_corrected_kl_is_weighted_by_the_ratio():
    # one token, A = 0: r = exp(logp - old) = 2, d = ref - logp = ln 2, k3 = 2 - ln 2 - 1 = 0.3068528
    # corrected k3 * r = 0.6137056 ; beta 0.1 over 1 token: 0.0613706
    # d/dlogp (k3 r) = (1 - e^d) r + k3 r = -2 + 0.6137056 = -1.3862944 ; times beta: -0.1386294
    logp, old, ref = mx.array([[-1.0]]), mx.array([[-1.0 - math.log(2)]]), mx.array([[-1.0 + math.log(2)]])
    fn = lambda lp: grpo_loss(lp, old, ref, mx.array([0.0]), mx.array([[1]]), loss_type="dapo", beta=0.1,
                              num_tokens_total=1, use_bias_correction_kl=True)
    loss, grad = mx.value_and_grad(lambda lp: fn(lp)[0])(logp)
    close(loss, 0.0613706)
    close(grad, [[-0.1386294]])
    close(finalize_stats(fn(logp)[1])["kl"], 0.6137056)


def test_entropy_bonus_is_the_mean_entropy_for_every_loss_type():
    # A = 0 leaves only the bonus: -c H, H = mean over mask tokens (1 + 2 + 3 + 4 + 5) / 5 = 3, c = 0.1 -> -0.3
    zero = mx.array([0.0, 0.0])
    for loss_type in ("dapo", "grpo", "bnpo"):
        close(loss_of(LOGP, adv=zero, loss_type=loss_type, entropy=ENTROPY, entropy_coef=0.1)[0], -0.3)
    # grpo with 2 micro-batches: this one's token mean / 2 -> -0.15; dapo over 10 batch tokens: -1.5 / 10
    close(loss_of(LOGP, adv=zero, loss_type="grpo", entropy=ENTROPY, entropy_coef=0.1, num_micro_batches=2)[0], -0.15)
    close(loss_of(LOGP, adv=zero, entropy=ENTROPY, entropy_coef=0.1, num_tokens_total=10)[0], -0.15)
    # with top_entropy_quantile 0.5 the bonus is over the kept tokens 3, 4, 5: mean 4 -> -0.4
    close(loss_of(LOGP, adv=zero, loss_type="grpo", entropy=ENTROPY, entropy_coef=0.1, top_entropy_quantile=0.5)[0],
          -0.4)
    # gradient with respect to each token's entropy: -c / 5 on mask tokens (dapo)
    grad = mx.grad(lambda h: loss_of(LOGP, adv=zero, entropy=h, entropy_coef=0.1)[0])(ENTROPY)
    close(grad, [[-0.02] * 3, [-0.02, -0.02, 0.0]])
    _, stats = loss_of(LOGP, entropy=ENTROPY, entropy_coef=0.1)
    close(finalize_stats(stats)["policy_loss"], -0.16)  # the dapo loss without the bonus


def test_entropy_gradient_matches_minus_sum_p_log_p():
    from mlx_grpo.training.loss import token_logprobs_and_entropy

    logits = mx.array(np.random.default_rng(0).normal(size=(2, 3, 7)).astype(np.float32))
    targets = mx.array([[0, 3, 6], [2, 2, 5]])
    ours = mx.grad(lambda x: token_logprobs_and_entropy(x, targets, 0.8, entropy_gradient=True)[1].sum())(logits)
    textbook = mx.grad(lambda x: -(mx.softmax(x / 0.8, axis=-1) * (x / 0.8 - mx.logsumexp(x / 0.8, axis=-1, keepdims=True))).sum())(logits)
    close(ours, textbook, atol=1e-5)
    # and without it, the entropy is a metric: no gradient
    plain = mx.grad(lambda x: token_logprobs_and_entropy(x, targets, 0.8)[1].sum())(logits)
    assert mx.all(plain == 0).item()


def test_new_options_trace_under_compile():
    # the trainer compiles its step: the quantile, the masks and the new losses must trace (no host syncs)
    def fn(lp, old, ent, sampling):
        return loss_of(lp, old=old, entropy=ent, sampling_logp=sampling, top_entropy_quantile=0.5,
                       off_policy_mask_threshold=1.0, entropy_coef=0.1, loss_type="vespo")[0]

    sampling = LOGP + 0.9
    close(mx.compile(fn)(LOGP, OLD, ENTROPY, sampling), fn(LOGP, OLD, ENTROPY, sampling), atol=1e-6)


def test_item_3_keys_are_checked_before_any_model_loads():
    for settings, message in [(dict(top_entropy_quantile=1.5), "top_entropy_quantile must be in"),
                              (dict(off_policy_mask_threshold=0.0), "off_policy_mask_threshold must be > 0")]:
        with pytest.raises(ConfigError, match=message):
            validate(GRPOConfig(run_name="t", **settings))
    warnings = config_warnings(validate(GRPOConfig(run_name="t", use_bias_correction_kl=True)))
    assert len(warnings) == 1 and "beta = 0" in warnings[0]


def test_a_step_with_every_new_option_runs(tiny_model_dir):
    from test_trainer import PROMPTS, tiny_step

    from mlx_grpo.training.step import TrainState, grpo_updates, sample_rollouts

    setup = tiny_step(tiny_model_dir, loss_type="sapo", top_entropy_quantile=0.5, entropy_coef=0.01,
                      off_policy_mask_threshold=0.5, beta=0.05, use_bias_correction_kl=True, num_iterations=2)
    rollouts = sample_rollouts(setup, TrainState(rollouts_quantized=True), PROMPTS)
    updates = grpo_updates(setup, TrainState(), rollouts, [1.0, 0.0, 0.0, 1.0])
    assert all(u.result.applied and math.isfinite(u.result.loss) for u in updates)
    setup = tiny_step(tiny_model_dir, multi_objective_aggregation="normalize_then_sum")
    rollouts = sample_rollouts(setup, TrainState(), PROMPTS)
    parts = np.array([[1, 0], [0, 2], [1, 1], [1, 3]], dtype=np.float32)
    with pytest.raises(ValueError, match="needs reward_parts"):
        grpo_updates(setup, TrainState(), rollouts, parts.sum(axis=1))
    assert grpo_updates(setup, TrainState(), rollouts, parts.sum(axis=1), reward_parts=parts)[0].result.applied


def test_normalize_then_sum_advantages_by_hand():
    from mlx_grpo.training.distributed import World, normalize_then_sum_across

    # two reward functions, weights (1, 0.5), two groups of 2:
    #   f1 = [1, 0 | 1, 1], f2 = [0, 2 | 1, 3]
    # group 1: f1 mean 0.5, std sqrt(0.5) -> +-0.5 / (0.7071068 + 1e-4) = +-0.7070068
    #          f2 mean 1, std sqrt(2)     -> -+1 / (1.4142136 + 1e-4)   = -+0.7070568
    # group 2: f1 std 0 -> 0, 0 ; f2 mean 2, std sqrt(2) -> -0.7070568, +0.7070568
    # sums f1 + 0.5 f2: [0.3534784, -0.3534784, -0.3535284, 0.3535284]
    # batch mean 0, std (ddof 1) sqrt((2 * 0.3534784^2 + 2 * 0.3535284^2) / 3) = 0.4081906
    # advantages sum / (0.4081906 + 1e-4): [0.8657521, -0.8657521, -0.8658745, 0.8658745]
    parts = np.array([[1, 0], [0, 2], [1, 1], [1, 3]], dtype=np.float32)
    close(normalize_then_sum_across(World(), parts, [1.0, 0.5], 2), [0.8657521, -0.8657521, -0.8658745, 0.8658745])
    warnings = config_warnings(validate(GRPOConfig(run_name="t", multi_objective_aggregation="normalize_then_sum",
                                                   scale_rewards="none")))
    assert len(warnings) == 1 and "scale_rewards" in warnings[0]


def test_clip_ratio_low_min_and_high_max_per_sequence():
    # per-sequence clip shares of the tiny batch: seq 1 (A > 0) high 1/3 (r 1.5), low 0 ;
    # seq 2 (A < 0) low 1/2 (r 0.7), high 0 -> low_min = min(0, 1/2) = 0, high_max = max(1/3, 0) = 1/3
    metrics = finalize_stats(loss_of(LOGP)[1])
    close(metrics["clip_ratio/low_min"], 0.0)
    close(metrics["clip_ratio/high_max"], 1 / 3)
    # seq 2 alone: low_min 1/2 ; a row without tokens does not count (TRL's nanmin)
    metrics = finalize_stats(loss_of(LOGP, mask=mx.array([[0, 0, 0], [1, 1, 0]]))[1])
    close(metrics["clip_ratio/low_min"], 0.5)
