"""Keys whose best value depends on the backend (CUDA, Metal, CPU): "auto" (None) is chosen here, once, and printed.

    cfg, notes = resolve_for_backend(cfg, current_backend())             # before the memory plan
    cfg, notes = resolve_kv_buffers(cfg, plan_for)                      # with the memory plan
    cfg, notes = resolve_headroom(cfg, current_backend(), plan)          # after it
"""

from __future__ import annotations

import dataclasses

import mlx.core as mx

from mlx_grpo.generation.engine import ROLLOUT_HEADROOM
from mlx_grpo.nanochat.decoder import ALTERNATE_BUFFERS, PREFILL_ALIGN

# Measured on an H100 with MLX's CUDA backend (BENCHMARKS.md): a compiled loss is retraced and CUDA's
# attention re-planned for every new shape, so a few reused widths beat exact ones (d20 update 1.40 s ->
# 0.96 s at 64), and the rollout allocates fastest with 15% of the memory limit free of cached buffers.
CUDA_PAD_TO_MULTIPLE_OF = 64
CUDA_PREFILL_ALIGN = PREFILL_ALIGN
CUDA_ROLLOUT_HEADROOM = ROLLOUT_HEADROOM
# Metal and the CPU plan no kernels per shape, so padding only adds work (configs/demo.toml on a CPU: 30%
# slower at 64); the buffer cache is the machine's RAM, so the rollout frees from it what it will allocate.
OTHER_PAD_TO_MULTIPLE_OF = 1
OTHER_PREFILL_ALIGN = 1
BACKEND_KEYS = ("pad_to_multiple_of", "prefill_align", "rollout_headroom", "rollout_kv_buffers")


def current_backend() -> str:
    """metal | cuda | cpu: where MLX runs arrays by default."""
    if mx.default_device() == mx.cpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    return "cuda" if cuda is not None and cuda.is_available() else "cpu"


def resolve_for_backend(cfg, backend: str):
    """(cfg with pad_to_multiple_of and prefill_align chosen where "auto", one note line per choice)."""
    cuda = backend == "cuda"
    chosen = {}
    if cfg.pad_to_multiple_of is None:
        chosen["pad_to_multiple_of"] = CUDA_PAD_TO_MULTIPLE_OF if cuda else OTHER_PAD_TO_MULTIPLE_OF
    if cfg.prefill_align is None:
        chosen["prefill_align"] = CUDA_PREFILL_ALIGN if cuda else OTHER_PREFILL_ALIGN
    why = "fewer shapes to compile and plan" if cuda else "padding only adds work here"
    notes = [f"[auto] {key} = {value} ({backend}: {why})" for key, value in chosen.items()]
    return dataclasses.replace(cfg, **chosen), notes


def resolve_kv_buffers(cfg, plan_for=None):
    """(cfg with rollout_kv_buffers chosen where "auto", its note lines): the decoders' two buffers where the
    memory plan fits with them (or there is no plan), else one. plan_for(cfg) -> MemoryPlan, or None: no plan."""
    if cfg.rollout_kv_buffers is not None:
        return cfg, []
    chosen = dataclasses.replace(cfg, rollout_kv_buffers=ALTERNATE_BUFFERS)
    plan = plan_for(chosen) if plan_for is not None else None
    if plan is None or plan.fits:
        why = "no memory plan" if plan is None else "the memory plan fits with them"
        why = f"no decode step copies a whole KV cache; {why}"
    else:
        chosen = dataclasses.replace(cfg, rollout_kv_buffers=1)
        why = (f"with {ALTERNATE_BUFFERS} the plan's {plan.peak_phase} would take {plan.peak / 1e9:.2f} GB, more "
               "than this machine can use")
    return chosen, [f"[auto] rollout_kv_buffers = {chosen.rollout_kv_buffers} ({why})"]


def resolve_headroom(cfg, backend: str, rollout_bytes: int | None = None):
    """(cfg with rollout_headroom chosen where "auto", its note lines). rollout_bytes: what the memory plan
    says the rollout allocates beyond what is resident (None: no plan)."""
    if cfg.rollout_headroom is not None:
        return cfg, []
    if backend == "cuda" or not rollout_bytes:
        headroom, why = CUDA_ROLLOUT_HEADROOM, "measured on CUDA" if backend == "cuda" else "no memory plan"
    else:
        limit = mx.get_memory_limit()
        headroom = min(0.9, round(rollout_bytes / limit, 4)) if limit else CUDA_ROLLOUT_HEADROOM
        why = f"what the plan says the rollout allocates, {rollout_bytes / 1e9:.2f} GB"
    return dataclasses.replace(cfg, rollout_headroom=headroom), [f"[auto] rollout_headroom = {headroom} ({backend}: "
                                                                 f"{why})"]


def generation_options(cfg) -> dict:
    """The backend keys generate_completions takes (rollouts and evaluation)."""
    return {"prefill_align": cfg.prefill_align, "headroom": cfg.rollout_headroom, "kv_buffers": cfg.rollout_kv_buffers}
