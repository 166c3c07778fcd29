"""Temperature + top-k sampling in one CUDA kernel launch (MLX's CUDA backend only).

On MLX's CUDA backend every kernel launch has a fixed cost, and mlx_grpo.generation.sampling's
compiled path needs about ten kernels per decode step (keys, chunk maxima, two sorts, a gather, the draw).
This kernel does the whole draw for a (rows, vocab) batch of logits in one launch, one thread block per row:

1. the row's exact k-th largest logit by radix select on the ordered unsigned keys of
   mlx_grpo.generation.sampling.ordered_keys (16-bit keys for bfloat16/float16: 2 passes of 8-bit digits;
   32-bit keys for float32: 4 passes), one 256-bin histogram per warp in shared memory;
2. a Gumbel-max draw over the logits >= that value: argmax of logit / T + gumbel(u), with u from
   Philox-4x32-10 keyed by (seed, row, index), ties to the lowest index.

Same distribution as mlx_grpo.generation.sampling: softmax(logits / T) over the logits at or above the row's
k-th largest (ties all kept, -0.0 == +0.0), top_k 0 or >= vocab meaning no restriction.
NaN logits differ on purpose: they never take a top-k place and are never drawn (a row of only NaN
gives token 0); mlx_grpo.generation.sampling sorts them by their sign bit.
"""

import hashlib
from functools import lru_cache

import mlx.core as mx

from mlx_grpo import cuda_kernels

_SUPPORTED_DTYPES = (mx.bfloat16, mx.float16, mx.float32)
_PHILOX_KEY_HI = 0x5EED0C0D  # second Philox key word (the first is the caller's seed)

_HEADER = r"""
namespace cuda_topk_sampling {

// Bits of one logit, its value and its ordered key, per logit type (keys as mlx_grpo.generation.sampling).
template <typename T> struct Traits;
template <> struct Traits<__nv_bfloat16> {
  static constexpr int BITS = 16;
  static constexpr uint32_t INF_BITS = 0x7F80u;
  __device__ static float to_float(uint32_t b) { return __uint_as_float(b << 16); }
};
template <> struct Traits<__half> {
  static constexpr int BITS = 16;
  static constexpr uint32_t INF_BITS = 0x7C00u;
  __device__ static float to_float(uint32_t b) { return __half2float(__ushort_as_half((unsigned short)b)); }
};
template <> struct Traits<float> {
  static constexpr int BITS = 32;
  static constexpr uint32_t INF_BITS = 0x7F800000u;
  __device__ static float to_float(uint32_t b) { return __uint_as_float(b); }
};

// Unsigned key that sorts like the value: flip all bits of negatives, set the sign of the rest.
// -0.0 keys as +0.0; NaN keys as 0, below -inf, so it never takes a top-k place.
template <typename T>
__device__ __forceinline__ uint32_t ordered_key(uint32_t b) {
  constexpr int BITS = Traits<T>::BITS;
  constexpr uint32_t SIGN = 1u << (BITS - 1);
  constexpr uint32_t ALL = BITS == 32 ? 0xFFFFFFFFu : (1u << BITS) - 1u;
  if ((b & (SIGN - 1u)) > Traits<T>::INF_BITS) return 0u;
  if (b == SIGN) b = 0u;
  return (b & SIGN) ? (~b & ALL) : (b | SIGN);
}

// VEC logits' bits from x[start:start + n] (n <= VEC), one 16-byte load when aligned and full.
template <typename T, int VEC>
__device__ __forceinline__ void load_bits(const T* x, int start, int n, bool aligned, uint32_t (&b)[VEC]) {
  if (aligned && n == VEC) {
    uint4 w = *reinterpret_cast<const uint4*>(x + start);
    uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      if constexpr (Traits<T>::BITS == 16) {
        b[j] = (words[j >> 1] >> ((j & 1) * 16)) & 0xFFFFu;
      } else {
        b[j] = words[j];
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      if constexpr (Traits<T>::BITS == 16) {
        b[j] = j < n ? (uint32_t)reinterpret_cast<const unsigned short*>(x)[start + j] : 0u;
      } else {
        b[j] = j < n ? reinterpret_cast<const uint32_t*>(x)[start + j] : 0u;
      }
    }
  }
}

// Philox-4x32-10 (Random123's constants and round order).
__device__ __forceinline__ uint4 philox4x32_10(uint4 c, uint32_t k0, uint32_t k1) {
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    uint32_t hi0 = __umulhi(0xD2511F53u, c.x), lo0 = 0xD2511F53u * c.x;
    uint32_t hi1 = __umulhi(0xCD9E8D57u, c.z), lo1 = 0xCD9E8D57u * c.z;
    c = make_uint4(hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0);
  }
  return c;
}

// Gumbel noise from 32 random bits: u = (top 23 bits + 0.5) / 2^23, exact and strictly in (0, 1).
__device__ __forceinline__ float gumbel(uint32_t r) {
  float u = __fadd_rn(__fmul_rn((float)(r >> 9), 0x1p-23f), 0x1p-24f);
  return -logf(-logf(u));
}

// Keeps the larger score, or the lower index on equal scores (NaN never wins).
__device__ __forceinline__ void keep_best(float& best, int& best_i, float s, int i) {
  if (s > best || (s == best && i < best_i)) {
    best = s;
    best_i = i;
  }
}

}  // namespace cuda_topk_sampling
"""

# Template constants: T (logit type), VOCAB, TOP_K (0 = no restriction), BLOCK (threads per row).
_SOURCE = r"""
  namespace ts = cuda_topk_sampling;
  constexpr int VEC = 16 / sizeof(T);
  constexpr int CHUNKS = (VOCAB + VEC - 1) / VEC;
  constexpr int WARPS = BLOCK / 32;
  constexpr bool RESTRICT = TOP_K > 0 && TOP_K < VOCAB;
  static_assert(BLOCK % 32 == 0 && BLOCK <= 1024, "BLOCK must be a multiple of 32, at most 1024");

  __shared__ uint32_t hist[RESTRICT ? WARPS : 1][256];
  __shared__ uint32_t totals[256];
  __shared__ uint32_t chosen_bin, count_above;
  __shared__ float warp_best[WARPS];
  __shared__ int warp_best_i[WARPS];

  const int row = blockIdx.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const T* x = logits + (size_t)row * VOCAB;
  const bool aligned = VOCAB % VEC == 0 && reinterpret_cast<uintptr_t>(logits) % 16 == 0;

  // Calls f(first index, bits[VEC], count) for each of this thread's chunks of VEC logits, with
  // UNROLL 16-byte loads in flight at once, so their memory latencies overlap.
  constexpr int UNROLL = 4;
  auto for_each_chunk = [&](auto&& f) {
#pragma unroll 1
    for (int c0 = 0; c0 < CHUNKS; c0 += BLOCK * UNROLL) {
      uint32_t b[UNROLL][VEC];
      int start[UNROLL], n[UNROLL];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        start[u] = (c0 + u * BLOCK + tid) * VEC;
        n[u] = max(0, min(VEC, VOCAB - start[u]));
      }
      if (aligned && (c0 + BLOCK * UNROLL) * VEC <= VOCAB) {
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) ts::load_bits<T, VEC>(x, start[u], VEC, true, b[u]);
      } else {
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) ts::load_bits<T, VEC>(x, start[u], n[u], aligned, b[u]);
      }
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) f(start[u], b[u], n[u]);
    }
  };

  // 1. Radix select: the ordered key of the row's TOP_K-th largest logit, 8 bits per pass.
  uint32_t threshold = 0;
  if constexpr (RESTRICT) {
    uint32_t prefix = 0, prefix_mask = 0, k_left = TOP_K;
#pragma unroll 1
    for (int shift = ts::Traits<T>::BITS - 8; shift >= 0; shift -= 8) {
      for (int i = tid; i < WARPS * 256; i += BLOCK) (&hist[0][0])[i] = 0;
      __syncthreads();
      for_each_chunk([&](int start, const uint32_t (&b)[VEC], int n) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const uint32_t key = ts::ordered_key<T>(b[j]);
          if (j < n && (key & prefix_mask) == prefix) {
            atomicAdd(&hist[warp][(key >> shift) & 255u], 1u);  // one histogram per warp
          }
        }
      });
      __syncthreads();
      for (int bin = tid; bin < 256; bin += BLOCK) {
        uint32_t total = 0;
        for (int w = 0; w < WARPS; ++w) total += hist[w][bin];
        totals[bin] = total;
      }
      __syncthreads();
      if (warp == 0) {  // the bin holding the k_left-th largest: above < k_left <= above + count
        uint32_t counts[8], lane_total = 0;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          counts[j] = totals[lane * 8 + j];
          lane_total += counts[j];
        }
        uint32_t suffix = lane_total;  // keys in this lane's bins and every higher lane's
#pragma unroll
        for (int offset = 1; offset < 32; offset <<= 1) {
          const uint32_t other = __shfl_down_sync(0xFFFFFFFFu, suffix, offset);
          if (lane + offset < 32) suffix += other;
        }
        uint32_t above = suffix - lane_total;
#pragma unroll
        for (int j = 7; j >= 0; --j) {
          if (above < k_left && k_left <= above + counts[j]) {
            chosen_bin = lane * 8 + j;
            count_above = above;
          }
          above += counts[j];
        }
      }
      __syncthreads();
      prefix |= chosen_bin << shift;
      prefix_mask |= 255u << shift;
      k_left -= count_above;
    }
    threshold = prefix;
  }

  // 2. Gumbel-max over the kept logits; element i takes word i % 4 of Philox((i / 4, row), seed).
  const float inv_t = inv_temperature[0];
  const uint32_t key0 = seed[0];
  const float neg_inf = __int_as_float(0xFF800000);
  float best = neg_inf;
  int best_i = 0x7FFFFFFF;
  for_each_chunk([&](int start, const uint32_t (&b)[VEC], int n) {
#pragma unroll
    for (int g = 0; g < VEC; g += 4) {
      bool kept[4], any_kept = false;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        kept[j] = g + j < n && (!RESTRICT || ts::ordered_key<T>(b[g + j]) >= threshold);
        any_kept |= kept[j];
      }
      if (any_kept) {
        const uint4 r4 = ts::philox4x32_10(make_uint4((uint32_t)(start + g) >> 2, (uint32_t)row, 0u, 0u),
                                           key0, PHILOX_KEY_HI);
        const uint32_t r[4] = {r4.x, r4.y, r4.z, r4.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (kept[j]) {
            const float scaled = __fmul_rn(ts::Traits<T>::to_float(b[g + j]), inv_t);
            ts::keep_best(best, best_i, __fadd_rn(scaled, ts::gumbel(r[j])), start + g + j);
          }
        }
      }
    }
  });
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float other = __shfl_down_sync(0xFFFFFFFFu, best, offset);
    const int other_i = __shfl_down_sync(0xFFFFFFFFu, best_i, offset);
    ts::keep_best(best, best_i, other, other_i);
  }
  if (lane == 0) {
    warp_best[warp] = best;
    warp_best_i[warp] = best_i;
  }
  __syncthreads();
  if (warp == 0) {
    best = lane < WARPS ? warp_best[lane] : neg_inf;
    best_i = lane < WARPS ? warp_best_i[lane] : 0x7FFFFFFF;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      const float other = __shfl_down_sync(0xFFFFFFFFu, best, offset);
      const int other_i = __shfl_down_sync(0xFFFFFFFFu, best_i, offset);
      ts::keep_best(best, best_i, other, other_i);
    }
    if (lane == 0) token[row] = best_i == 0x7FFFFFFF ? 0 : best_i;  // only NaN in the row: token 0
  }
""".replace("PHILOX_KEY_HI", f"0x{_PHILOX_KEY_HI:08X}u")

_INPUT_NAMES = ["logits", "seed", "inv_temperature"]
_OUTPUT_NAMES = ["token"]


def _block_size(rows: int) -> int:
    # One block per row: up to the RL shape's 256 rows, 512 threads keep more of each row's loads in flight
    # (BENCHMARKS.md compares 256, 512 and 1024 there); with more rows, smaller blocks let more rows run at once.
    return 512 if rows <= 256 else 256


def _template(dtype, vocab: int, top_k: int, block: int) -> list:
    restricted_k = top_k if 0 < top_k < vocab else 0
    return [("T", dtype), ("VOCAB", vocab), ("TOP_K", restricted_k), ("BLOCK", block)]


@lru_cache(maxsize=None)
def _kernel(block: int):
    # __launch_bounds__(block): without it the compiler may take more registers than a block of 1024 threads has.
    header = cuda_kernels.launch_bounds_header(block) + _HEADER
    # The source's hash is in the name: MLX caches compiled kernels on disk by name and template values.
    name = "topk_sample_" + hashlib.sha1((header + _SOURCE).encode()).hexdigest()[:8]
    return mx.fast.cuda_kernel(name=name, input_names=_INPUT_NAMES, output_names=_OUTPUT_NAMES, source=_SOURCE,
                               header=header)


@lru_cache(maxsize=64)
def _inverse_temperature(temperature: float) -> mx.array:
    # float32(1 / T), as mlx_grpo.generation.sampling scales by 1.0 / temperature in float32.
    return mx.array([1.0 / temperature], dtype=mx.float32)


def _check_inputs(logits, temperature, top_k, seed) -> None:
    if not isinstance(logits, mx.array) or logits.ndim != 2:
        shape = getattr(logits, "shape", type(logits).__name__)
        raise ValueError(f"logits must be a (rows, vocab) mx.array, got {shape}; reshape to 2-D first")
    if logits.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"logits dtype {logits.dtype} is not supported; cast to bfloat16, float16 or float32")
    if not 0 < logits.shape[1] <= 2**30:
        raise ValueError(f"vocab size {logits.shape[1]} must be between 1 and 2**30")
    if not (isinstance(temperature, (int, float)) and 0 < temperature < float("inf")):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}; use argmax for greedy")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
    if not isinstance(seed, mx.array) or seed.shape != (1,) or seed.dtype != mx.uint32:
        shape = getattr(seed, "shape", type(seed).__name__)
        raise ValueError(f"seed must be a (1,) uint32 mx.array (e.g. mx.array([step], dtype=mx.uint32)), got {shape}")


def sample_top_k(logits: mx.array, temperature: float, top_k: int, seed: mx.array) -> mx.array:
    """(rows, vocab) logits -> (rows,) int32 tokens drawn from softmax(logits / temperature) over
    each row's top_k largest logits (ties kept; top_k 0 or >= vocab: all). One kernel launch.

    seed: (1,) uint32 array, a new value per call: the Philox key, so equal seeds give equal draws
    for equal logits, and distinct seeds (a step counter will do) give independent ones."""
    _check_inputs(logits, temperature, top_k, seed)
    if not cuda_kernels.runs_on_cuda_gpu():
        raise ValueError("cuda_sampling needs MLX's CUDA backend with the GPU as default device; "
                         "use mlx_grpo.generation.sampling elsewhere")
    rows, vocab = logits.shape
    if rows == 0:
        return mx.zeros((0,), dtype=mx.int32)
    block = _block_size(rows)
    return _kernel(block)(
        inputs=[logits, seed, _inverse_temperature(float(temperature))],
        template=_template(logits.dtype, vocab, int(top_k), block),
        grid=(rows * block, 1, 1),
        threadgroup=(block, 1, 1),
        output_shapes=[(rows,)],
        output_dtypes=[mx.int32],
    )[0]
