"""Custom CUDA kernels for MLX's CUDA backend, and the one switch that covers all three of them:

    decode.py     a nanochat layer's attention in a decode step (used by utils/nanochat/decoder.py)
    sampling.py   temperature + top-k sampling (utils/generation/sampling.py)
    logprobs.py   the loss head's log-probs and entropy, and their gradient (utils/training/loss.py)

Each caller asks available() and otherwise runs MLX's own ops for the same math (Metal, CPU, and
CUDA with the kernels off). MLX_GRPO_CUDA_KERNELS=0 in the environment, or set_enabled(False) from
code, turns all three off: to compare speeds, or to rule the kernels out when a result looks wrong.
Decide before the run: a compiled function keeps the choice it was traced with.
"""

import os

import mlx.core as mx

ENV_VAR = "MLX_GRPO_CUDA_KERNELS"
_ON_VALUES, _OFF_VALUES = ("1", "true", "on", "yes"), ("0", "false", "off", "no")
_enabled_in_code = True


class KernelSwitchError(ValueError):
    """MLX_GRPO_CUDA_KERNELS holds something other than on or off."""


def set_enabled(enabled: bool) -> None:
    """Turn the custom CUDA kernels on (the default: where they run) or off, for this process."""
    global _enabled_in_code
    _enabled_in_code = bool(enabled)


def enabled() -> bool:
    """False when turned off by set_enabled(False) or MLX_GRPO_CUDA_KERNELS=0 (unset: on)."""
    value = os.environ.get(ENV_VAR, "1").strip().lower()
    if value not in _ON_VALUES + _OFF_VALUES:
        raise KernelSwitchError(f"{ENV_VAR}={os.environ[ENV_VAR]!r} is not a switch: set it to 0 (custom CUDA "
                                f"kernels off) or 1 (on where they run, the default), or unset it")
    return _enabled_in_code and value in _ON_VALUES


def runs_on_cuda_gpu() -> bool:
    """True when MLX runs on its CUDA backend with the GPU as the default device."""
    cuda = getattr(mx, "cuda", None)
    return cuda is not None and cuda.is_available() and mx.default_device().type == mx.DeviceType.gpu


def available() -> bool:
    """Whether callers should use the custom kernels: switched on, and on MLX's CUDA backend's GPU."""
    return enabled() and runs_on_cuda_gpu()


def launch_bounds_header(threads: int, min_blocks: int = 1) -> str:
    """Header lines that give the kernel mx.fast.cuda_kernel generates __launch_bounds__(threads, min_blocks): MLX
    writes the kernel's signature itself, so the header redefines __global__ for the one kernel that follows it.
    The compiler then keeps registers within what `min_blocks` blocks of `threads` per SM allow."""
    return ('#undef __global__\n'
            f'#define __global__ __attribute__((global)) __launch_bounds__({int(threads)}, {int(min_blocks)})\n')
