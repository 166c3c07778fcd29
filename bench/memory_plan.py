"""The memory plan against measured peaks: the trainer's step on a random-weight model of a config.json.

    python bench/memory_plan.py --config configs/demo.toml --model-config demo/model/config.json   # CPU, seconds
    python bench/memory_plan.py --config configs/nanochat_grpo.toml --model-config configs/models/nanochat-d20.json
    python bench/memory_plan.py --config configs/nanochat_d32.toml --model-config configs/models/nanochat-d32.json
    python bench/memory_plan.py --config configs/nanochat_d32_lora.toml --model-config configs/models/nanochat-d32.json

Runs the plan's worst case: every prompt max_prompt_length random tokens, no stop tokens (every
completion the full generation limit), --steps steps of the trainer's step functions (the optimizer
state exists from the first update on), then one evaluation batch on the policy itself. Prints, per
phase, the plan and the measured peak (mx.get_peak_memory, reset per phase) and their ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_grpo.config import add_config_arguments, load_config
from mlx_grpo.generation.engine import generate_completions
from mlx_grpo.generation.sampling import make_rollout_sampler
from mlx_grpo.training.backend import current_backend, resolve_for_backend, resolve_headroom
from mlx_grpo.training.distributed import init_world
from mlx_grpo.training.lora import add_adapters, eval_policy
from mlx_grpo.training.memory import GB, lazy_model, model_dims, plan_memory, record_peak
from mlx_grpo.training.backend import generation_options
from mlx_grpo.training.step import TrainState, build_step, grpo_updates, sample_rollouts
from mlx_grpo.training.update import ensure_float32


def measure(cfg, model_config: dict, steps: int = 2, seed: int = 0, seconds: dict | None = None) -> tuple[dict, object]:
    """(phase -> measured peak bytes, the plan) for cfg on a random-weight model of model_config; `seconds`
    gets the last step's rollout and update seconds."""
    backend = current_backend()
    cfg = resolve_for_backend(cfg, backend)[0]
    plan = plan_memory(model_dims(model_config, cfg), cfg)
    cfg = resolve_headroom(cfg, backend, plan.phases["rollout"] - sum(plan.resident.values()))[0]
    mx.random.seed(seed)
    rng = np.random.default_rng(seed)
    model = lazy_model(model_config)
    if cfg.train_type != "full":
        add_adapters(model, cfg)
    ensure_float32(model, adapters_only=cfg.train_type != "full")
    mx.eval(model.parameters())
    vocab = model_config["vocab_size"]
    setup = build_step(cfg, init_world(), model, max(steps, 1), stop_token_ids=[])
    state = TrainState(rollouts_quantized=cfg.quantize_for_rollouts)
    peaks = {}
    for _ in range(steps):
        prompts = rng.integers(1, vocab, size=(cfg.effective_prompts_per_step, cfg.max_prompt_length)).tolist()
        rollouts = sample_rollouts(setup, state, prompts)
        updates = grpo_updates(setup, state, rollouts, rng.standard_normal(len(rollouts.completions)))
        if seconds is not None:
            seconds.update(rollout=rollouts.stats.seconds, update=sum(u.result.seconds for u in updates))
        for phase, value in rollouts.peaks.items():
            peaks[phase] = max(peaks.get(phase, 0), value)
        del rollouts
    rows = min(cfg.eval_batch_size, cfg.eval_samples or cfg.eval_batch_size)
    prompts = rng.integers(1, vocab, size=(rows, cfg.max_prompt_length)).tolist()
    mx.reset_peak_memory()
    generate_completions(eval_policy(model, getattr(mx, cfg.compute_dtype), cfg.merge_adapters_for_decoding),
                         prompts, group_size=1,
                         max_new_tokens=cfg.eval_max_new_tokens,
                         sampler=make_rollout_sampler(0.0), stop_token_ids=[], **generation_options(cfg))
    record_peak(peaks, "eval")
    return peaks, plan


def report(peaks: dict, plan) -> list[str]:
    lines = [f"{'phase':<12}{'plan GB':>10}{'measured GB':>14}{'plan/measured':>15}"]
    for phase, value in peaks.items():
        planned = plan.phases.get(phase)
        ratio = f"{planned / value:.3f}" if planned and value else "-"
        lines.append(f"{phase:<12}{(planned or 0) / GB:>10.4f}{value / GB:>14.4f}{ratio:>15}")
    return lines


def main(argv=None):
    parser = add_config_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--model-config", required=True, help="a model's config.json (weights are random)")
    parser.add_argument("--steps", type=int, default=2, help="steps measured (the first has no optimizer state yet)")
    parser.add_argument("--json", help="also write plan and measured peaks (GB) to this file")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.set)
    model_config = json.loads(Path(args.model_config).read_text(encoding="utf-8"))
    seconds = {}
    peaks, plan = measure(cfg, model_config, args.steps, seconds=seconds)
    print(f"{mx.default_device()}, {args.config} on {args.model_config}; last step: "
          + ", ".join(f"{phase} {value:.2f} s" for phase, value in seconds.items()))
    print("\n".join(report(peaks, plan)))
    if args.json:
        Path(args.json).write_text(json.dumps({"plan_gb": {k: v / GB for k, v in plan.phases.items()},
                                               "measured_gb": {k: v / GB for k, v in peaks.items()},
                                               "seconds": seconds}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
