"""torch's CUDA profiler (CUPTI) for the benches that time MLX's kernels: it records every kernel the process
launches, MLX's included. Needs MLX's CUDA backend and a CUDA build of torch."""

import collections
import sys

from mlx_grpo import cuda_kernels


def start(script):
    """(torch, torch.profiler.profile, ProfilerActivity) with torch's CUDA context started; or exit with one line
    saying what `script` needs."""
    try:
        import torch
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        sys.exit(f"{script}: needs torch (its CUDA profiler reads the kernels); pip install torch")
    if not (cuda_kernels.runs_on_cuda_gpu() and torch.cuda.is_available()):
        sys.exit(f"{script}: needs MLX's CUDA backend and a CUDA build of torch on an NVIDIA GPU")
    torch.zeros(1, device="cuda")  # start torch's CUDA context before profiling
    return torch, profile, ProfilerActivity


def gpu_time_by_kernel(prof, torch):
    """{kernel name: [launches, device microseconds]} of a finished profile."""
    per_kernel = collections.defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[event.name][0] += 1
            per_kernel[event.name][1] += event.device_time_total
    return per_kernel
