"""Per-token log-probs and entropy of a batch of logits in one CUDA kernel, and their gradient in
another (MLX's CUDA backend only).

The loss head of a GRPO update (mlx_grpo.training.loss.token_logprobs_and_entropy) upcasts the
[tokens, vocab] logits to float32, takes a logsumexp, gathers the targets and sums p * x for the
entropy, then runs the softmax's backward in float32 and casts back: several passes over a float32
copy of the logits (gigabytes per d20 micro-batch), bound by memory traffic. Here the forward reads
the logits once (an online softmax per row: running max, sum of exp, sum of exp * x) and the backward
reads them once and writes the gradient once, in the logits' dtype. Same numbers as the MLX ops to
float32 rounding (expf is the fast hardware one); elsewhere (Metal, CPU) grpo_loss keeps its MLX ops.

The entropy is a metric: it carries no gradient (as in grpo_loss). A target outside [0, vocab)
gives a NaN log-prob (the trainer's finiteness check then skips the update) rather than a read out
of bounds.
"""

import hashlib
from functools import lru_cache

import mlx.core as mx

SUPPORTED_DTYPES = (mx.bfloat16, mx.float16, mx.float32)
BLOCK = 256  # threads per row

_HEADER = r"""
namespace cuda_logprobs {

__device__ __forceinline__ float neg_inf() { return -__int_as_float(0x7f800000); }

// A row's softmax so far: running max m, s = sum exp(x - m), t = sum exp(x - m) * x.
struct Softmax { float m, s, t; };

__device__ __forceinline__ void add(Softmax& a, float x) {
  if (x > a.m) {
    const float c = __expf(a.m - x);
    a.s = a.s * c + 1.f;
    a.t = a.t * c + x;
    a.m = x;
  } else if (a.m > neg_inf() || x != x) {  // x = -inf into an empty softmax adds nothing; NaN spreads
    const float e = __expf(x - a.m);
    a.s += e;
    a.t += e * x;
  }
}

__device__ __forceinline__ Softmax merge(const Softmax& a, const Softmax& b) {
  const float m = fmaxf(a.m, b.m);
  if (m == neg_inf()) return {m, a.s + b.s, a.t + b.t};  // both empty (or NaN sums, kept)
  const float ca = __expf(a.m - m), cb = __expf(b.m - m);
  return {m, a.s * ca + b.s * cb, a.t * ca + b.t * cb};
}

}  // namespace cuda_logprobs
"""

# One block per row (token). Template constants: T (logits dtype), V (vocab), BLOCK (threads).
_FORWARD = r"""
  using namespace cuda_logprobs;
  constexpr int VEC = 16 / sizeof(T);  // logits per 16-byte load
  const size_t row = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const T* x = logits + row * V;
  const float scale = inv_temp[0];
  Softmax acc = {neg_inf(), 0.f, 0.f};
  if constexpr (V % VEC == 0) {
    for (int i = threadIdx.x * VEC; i < V; i += BLOCK * VEC) {
      const uint4 w = *reinterpret_cast<const uint4*>(x + i);
      const T* v = reinterpret_cast<const T*>(&w);
#pragma unroll
      for (int j = 0; j < VEC; ++j) add(acc, static_cast<float>(v[j]) * scale);
    }
  } else {
    for (int i = threadIdx.x; i < V; i += BLOCK) add(acc, static_cast<float>(x[i]) * scale);
  }
  for (int o = 16; o > 0; o >>= 1) {
    const Softmax other = {__shfl_xor_sync(0xffffffffu, acc.m, o), __shfl_xor_sync(0xffffffffu, acc.s, o),
                           __shfl_xor_sync(0xffffffffu, acc.t, o)};
    acc = merge(acc, other);
  }
  __shared__ Softmax partial[BLOCK / 32];
  if (lane == 0) partial[warp] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    Softmax total = partial[0];
    for (int w = 1; w < BLOCK / 32; ++w) total = merge(total, partial[w]);
    const float row_lse = total.m + logf(total.s);
    const int target = targets[row];
    const float chosen = (target >= 0 && target < V) ? static_cast<float>(x[target]) * scale
                                                     : __int_as_float(0x7fc00000);  // NaN
    logp[row] = chosen - row_lse;
    entropy[row] = row_lse - total.t / total.s;
    lse[row] = row_lse;
  }
"""

# d logp / d x_v = (onehot(v == target) - softmax(x / T)_v) / T, times the row's cotangent.
_BACKWARD = r"""
  constexpr int VEC = 16 / sizeof(T);
  const size_t row = blockIdx.x;
  const T* x = logits + row * V;
  T* out = grad + row * V;
  const float scale = inv_temp[0];
  const float g = cotangent[row] * scale;
  const float row_lse = lse[row];
  const int target = targets[row];
  if constexpr (V % VEC == 0) {
    for (int i = threadIdx.x * VEC; i < V; i += BLOCK * VEC) {
      const uint4 w = *reinterpret_cast<const uint4*>(x + i);
      const T* v = reinterpret_cast<const T*>(&w);
      alignas(16) T r[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float p = __expf(static_cast<float>(v[j]) * scale - row_lse);
        r[j] = static_cast<T>((i + j == target ? g : 0.f) - g * p);
      }
      *reinterpret_cast<uint4*>(out + i) = *reinterpret_cast<const uint4*>(r);
    }
  } else {
    for (int i = threadIdx.x; i < V; i += BLOCK) {
      const float p = __expf(static_cast<float>(x[i]) * scale - row_lse);
      out[i] = static_cast<T>((i == target ? g : 0.f) - g * p);
    }
  }
"""

_FORWARD_INPUTS, _FORWARD_OUTPUTS = ["logits", "targets", "inv_temp"], ["logp", "entropy", "lse"]
_BACKWARD_INPUTS, _BACKWARD_OUTPUTS = ["logits", "targets", "inv_temp", "lse", "cotangent"], ["grad"]
_DIGEST = hashlib.sha1((_HEADER + _FORWARD + _BACKWARD).encode()).hexdigest()[:10]
_FORWARD_NAME, _BACKWARD_NAME = f"token_logprobs_forward_{_DIGEST}", f"token_logprobs_backward_{_DIGEST}"


@lru_cache(maxsize=None)
def _forward_kernel():
    return mx.fast.cuda_kernel(name=_FORWARD_NAME, input_names=_FORWARD_INPUTS, output_names=_FORWARD_OUTPUTS,
                               source=_FORWARD, header=_HEADER)


@lru_cache(maxsize=None)
def _backward_kernel():
    return mx.fast.cuda_kernel(name=_BACKWARD_NAME, input_names=_BACKWARD_INPUTS, output_names=_BACKWARD_OUTPUTS,
                               source=_BACKWARD, header=_HEADER)


def _template(dtype, vocab):
    return [("T", dtype), ("V", vocab), ("BLOCK", BLOCK)]


@mx.custom_function
def _logprobs_entropy_lse(logits, targets, inv_temp):
    rows, vocab = logits.shape
    return tuple(_forward_kernel()(
        inputs=[logits, targets, inv_temp], template=_template(logits.dtype, vocab), grid=(rows * BLOCK, 1, 1),
        threadgroup=(BLOCK, 1, 1), output_shapes=[(rows,)] * 3, output_dtypes=[mx.float32] * 3))


@_logprobs_entropy_lse.vjp
def _logprobs_entropy_lse_vjp(primals, cotangents, outputs):
    logits, targets, inv_temp = primals
    rows, vocab = logits.shape
    cotangent = cotangents[0] if cotangents[0] is not None else mx.zeros((rows,), mx.float32)
    grad = _backward_kernel()(
        inputs=[logits, targets, inv_temp, outputs[2], cotangent.astype(mx.float32)],
        template=_template(logits.dtype, vocab), grid=(rows * BLOCK, 1, 1), threadgroup=(BLOCK, 1, 1),
        output_shapes=[logits.shape], output_dtypes=[logits.dtype])[0]
    return grad, mx.zeros_like(targets), mx.zeros_like(inv_temp)


def token_logprobs_and_entropy(logits: mx.array, targets: mx.array, temperature: float = 1.0):
    """(log softmax(logits / T)[target], entropy of softmax(logits / T)), float32, shaped like targets.

    logits [..., V] in bfloat16, float16 or float32; targets [...] ids in [0, V). Differentiable in
    the log-probs (the gradient comes in the logits' dtype); the entropy has no gradient.
    """
    if logits.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"cuda_logprobs takes {SUPPORTED_DTYPES} logits, got {logits.dtype}")
    vocab = logits.shape[-1]
    inv_temp = mx.array([1.0 / temperature], dtype=mx.float32)
    logp, entropy, _ = _logprobs_entropy_lse(logits.reshape(-1, vocab), targets.reshape(-1).astype(mx.int32),
                                             inv_temp)
    return logp.reshape(targets.shape), mx.stop_gradient(entropy.reshape(targets.shape))
