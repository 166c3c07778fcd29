"""Token sampling for rollouts: one compiled kernel chain for greedy and temperature + top-k.

mlx-lm's top-k sampler partitions the whole vocabulary (argpartition) for every decode step: with
256 rows x 65,536 logits that costs more than the model's matmuls, so the common case
(temperature with top-k, no top-p/min-p) is done here without sorting the vocabulary: the k-th
largest logit of each row is found among the chunks with the largest maxima, and a Gumbel-max draw
picks among the logits at or above it. On MLX's CUDA backend the same draw is one kernel launch (utils/cuda_kernels/sampling.py).
Anything else (top-p, min-p) goes to mlx-lm's sampler.
"""

from dataclasses import dataclass
from functools import lru_cache

import mlx.core as mx
import numpy as np
from mlx_lm.sample_utils import make_sampler

from mlx_grpo import cuda_kernels
from mlx_grpo.cuda_kernels import sampling as cuda_sampling


def ordered_keys(x: mx.array) -> mx.array:
    """Unsigned keys that sort like the values of x (the sign-flip trick for IEEE floats):
    uint16 for bfloat16/float16 logits (half the bytes to scan), uint32 otherwise. A NaN sorts past
    +inf or -inf by its sign bit (mlx-lm's sampler has no better answer for NaN logits)."""
    x = x + 0.0  # -0.0 -> +0.0, so the two zeros tie as their values do
    if x.dtype in (mx.bfloat16, mx.float16):
        bits, unsigned, sign = x.view(mx.uint16), mx.uint16, 0x8000
    else:
        bits, unsigned, sign = x.astype(mx.float32).view(mx.uint32), mx.uint32, 0x80000000
    return mx.where(bits >= mx.array(sign, unsigned), ~bits, bits | mx.array(sign, unsigned))


def chunk_size(vocab: int, k: int) -> int:
    """kth_largest_keys' chunk length: a power of two near sqrt(vocab / k), so that the chunks' maxima and the k
    chosen chunks' keys are about equally many (both sqrt(vocab k): 2,048 and 1,600 at 65,536 x top-k 50, one
    block each for MLX's sorts)."""
    size = 1 << max(0, round(np.log2(np.sqrt(vocab / k))))
    return max(1, min(size, vocab // k))


def kth_largest_keys(keys: mx.array, k: int) -> mx.array:
    """Per row, the ordered key of the k-th largest value (exact), as a (rows, 1) array.

    The row is cut into chunks; the k chunks with the largest maxima hold every key above the k-th largest and
    at least k keys at or above it, so the k-th largest of their keys is the row's. A sort of each row's chunk
    maxima and one of the chosen chunks' keys: a handful of launches, where a bisection on the bits takes 3 a bit.
    """
    rows, vocab = keys.shape
    size = chunk_size(vocab, k)
    chunks = -(-vocab // size)
    if chunks * size != vocab:  # pad with the smallest key: the chosen chunks' maxima are real keys, so it never decides
        keys = mx.pad(keys, [(0, 0), (0, chunks * size - vocab)], constant_values=0)
    keys = keys.reshape(rows, chunks, size)
    chosen = mx.argpartition(keys.max(axis=-1), chunks - k, axis=-1)[:, chunks - k:]
    held = mx.take_along_axis(keys, chosen[..., None], axis=1).reshape(rows, k * size)
    return mx.sort(held, axis=-1)[:, -k, None]


def top_k_mask(logits: mx.array, k: int) -> mx.array:
    """True where a logit is among the row's k largest; ties with the k-th value are all kept
    (as Hugging Face's top-k warper does), so a row can keep slightly more than k."""
    keys = ordered_keys(logits)
    return keys >= kth_largest_keys(keys, k)


@lru_cache(maxsize=None)
def _compiled_top_k_sampler(temperature: float, top_k: int):
    def sample(logits):
        scaled = logits.astype(mx.float32) * (1.0 / temperature)
        if 0 < top_k < logits.shape[-1]:
            scaled = mx.where(top_k_mask(logits, top_k), scaled, -mx.inf)
        return mx.random.categorical(scaled, axis=-1).astype(mx.int32)

    # The RNG state is an input and output of the compiled graph, or every step would reuse one draw.
    return mx.compile(sample, inputs=[mx.random.state], outputs=[mx.random.state])


@lru_cache(maxsize=None)
def _compiled_greedy():
    return mx.compile(lambda logits: mx.argmax(logits, axis=-1).astype(mx.int32))


@lru_cache(maxsize=None)
def _mlx_lm_sampler(temperature, top_p, top_k, min_p):  # built once, not at every decode step
    return make_sampler(temp=temperature, top_p=top_p, top_k=top_k, min_p=min_p)


@dataclass(frozen=True)
class RolloutSampler:
    """How rollouts pick tokens: temperature 0 is greedy; top_k 0, top_p 1 and min_p 0 are off."""

    temperature: float
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0

    @property
    def fused(self) -> bool:
        """Greedy or temperature + top-k: sampled by the compiled path here, not by mlx-lm."""
        return self.temperature == 0 or (self.top_p >= 1.0 and self.min_p <= 0.0)

    def __call__(self, logits: mx.array) -> mx.array:
        """(rows, vocab) raw logits (not log-probs) -> (rows,) int32 token ids."""
        if self.temperature == 0:
            return _compiled_greedy()(logits)
        if self.fused:
            if cuda_kernels.available():  # the Philox key comes from MLX's RNG, so mx.random.seed still rules
                return cuda_sampling.sample_top_k(logits, self.temperature, self.top_k,
                                                 mx.random.randint(0, 2**31 - 1, (1,), dtype=mx.uint32))
            return _compiled_top_k_sampler(float(self.temperature), int(self.top_k))(logits)
        sampler = _mlx_lm_sampler(self.temperature, self.top_p, self.top_k, self.min_p)
        return sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True)).astype(mx.int32)


def make_rollout_sampler(temperature, top_p=1.0, top_k=0, min_p=0.0) -> RolloutSampler:
    return RolloutSampler(float(temperature), float(top_p), int(top_k), float(min_p))
