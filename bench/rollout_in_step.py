"""The step's rollouts (sample_rollouts) against the same rollout called directly, in one process, before and after
GRPO updates and at other buffer-cache headrooms: whether the step bench's rollout rate is lost to the step's own
work (the copy, packing, the update's freed buffers) or to the machine.

    python bench/rollout_in_step.py --depth 20 --compile --micro-batch-size 64 --no-cuda-kernels
    python bench/rollout_in_step.py --depth 2 --prompts 2 --group 2 --new-tokens 8 --micro-batch-size 4   # CPU smoke

Takes grpo_step.py's flags (the model, the shape, the step's config). Prints, per rollout, the prefill and
generation seconds, generated tok/s and MLX's active and cached memory; main returns (label, tok/s) per rollout.
"""

import dataclasses
import sys

import grpo_step
import mlx.core as mx
import model_families as families
import numpy as np

import mlx_grpo.cuda_kernels as cuda_kernels
from mlx_grpo.generation.engine import generate_completions
from mlx_grpo.training.backend import generation_options
from mlx_grpo.training.distributed import init_world
from mlx_grpo.training.step import TrainState, build_step, grpo_updates, rollout_policy, sample_rollouts

GIB = 1 << 30


def main(argv=None):
    args = grpo_step.parse_args(argv)
    cuda_kernels.set_enabled(not args.no_cuda_kernels)
    try:
        return measure(args)
    finally:
        cuda_kernels.set_enabled(True)  # the default back


def measure(args):
    cfg = grpo_step.step_config(args)
    mx.random.seed(0)
    model = families.BUILDERS[args.family](args)
    setup = build_step(cfg, init_world(), model, total_updates=20, stop_token_ids=set())
    state = TrainState(rollouts_quantized=False)
    rng, reward_rng = np.random.default_rng(0), np.random.default_rng(1)
    lengths = rng.integers(int(args.prompt_len * 0.8), int(args.prompt_len * 1.2) + 1, size=args.prompts)
    prompts = [rng.integers(0, model.args.vocab_size - 9, size=n).tolist() for n in lengths]

    rates = []

    def show(label, stats, rollout_s=None):
        rates.append((label, stats.generated_tokens / stats.seconds))
        extra = f" rollout_s {rollout_s:.3f}" if rollout_s is not None else ""
        print(f"{label:<46} prefill {stats.prefill_seconds:.3f} generate {stats.seconds:.3f} "
              f"tok/s {rates[-1][1]:9,.0f}{extra} | active "
              f"{mx.get_active_memory() / GIB:.1f} cached {mx.get_cache_memory() / GIB:.1f} GiB", flush=True)

    def direct(label, times):  # generate_completions on the step's rollout copy, as rollout_alternation.py calls it
        policy = rollout_policy(setup, False)
        for _ in range(times):
            _, stats = generate_completions(
                policy, prompts, group_size=args.group, max_new_tokens=args.new_tokens, sampler=setup.sampler,
                stop_token_ids=set(), **generation_options(setup.cfg))
            show(label, stats)

    def in_step(label, times, update=True):
        for _ in range(times):
            rollouts = sample_rollouts(setup, state, prompts)
            show(label, rollouts.stats, rollouts.seconds["rollout"])
            if update:
                grpo_updates(setup, state, rollouts, reward_rng.random(len(rollouts.completions)))
                mx.synchronize()

    print(f"rollout_headroom {setup.cfg.rollout_headroom}, prefill_align {setup.cfg.prefill_align}, "
          f"{mx.default_device()}")
    direct("direct (the first compiles)", 1)
    direct("direct, no update yet", 2)
    in_step("sample_rollouts, no update yet", 2, update=False)
    in_step("sample_rollouts then an update (the first compiles)", 1)
    in_step("sample_rollouts then an update", 3)
    resolved = setup.cfg
    for headroom in (0.30, 0.45):
        setup.cfg = dataclasses.replace(setup.cfg, rollout_headroom=headroom)
        in_step(f"sample_rollouts then an update, headroom {headroom}", 2)
    setup.cfg = resolved
    direct("direct, after the updates", 2)
    mx.clear_cache()
    in_step("sample_rollouts after mx.clear_cache()", 2, update=False)
    return rates


if __name__ == "__main__":
    main(sys.argv[1:])
