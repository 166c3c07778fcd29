"""One CUDA kernel for a nanochat layer's attention in a decode step (MLX's CUDA backend only).

On MLX's CUDA backend every kernel launch has a fixed cost however little the kernel does, and the
decode step's attention part would take six kernels per layer (RoPE, QK norm, two cache writes, the
padding mask, attention), with the prompt's keys copied to and read from every row of its group.
This kernel does it in one: RoPE and the QK norm of the row's new q and k, attention over the
prompt's keys (stored once per prompt, read by the group's rows together, so mostly from L2), the
row's own generated keys and the new key, and it writes the new key and value into the row's cache.
Rows carry their prompt's length, so there is no left padding and no mask. A sliding window (nanochat's
2026 layers: a query at p reads the keys p-w..p) starts both key loops at the window's first position.

The cache write is in place: `generated_kv` is an input that MLX treats as read-only, and the kernel
writes column `step` of it (every other column it only reads). MLX would otherwise copy the whole
buffer each step (a slice update of a buffer still in use by the step before is not done in place
when the device runs ahead of the host). This is sound because these buffers belong to one decoder,
are touched only by this kernel (and by `filter`'s gather, a later graph on the same stream), and
step t + 1's kernel depends on step t's through the sampled tokens.

Elsewhere (Metal, CPU) utils/nanochat/decoder.py keeps MLX's fused attention. utils/generation/llama_decoder.py
(Llama, Qwen) calls it with qk_norm=False: those models norm q and k (Qwen3) before RoPE, in their projection.
"""

import hashlib
from functools import lru_cache

import mlx.core as mx

_HEADER = r"""
template <typename V> __device__ inline float ck_float(V x) { return static_cast<float>(x); }
__device__ inline float ck_warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
"""

# One block per (head, row) with one thread per head dimension. Template constants: H, KV (heads),
# HD (head dim), T (the cache dtype), QK_NORM (false: RoPE only, for models whose QK norm, if any, comes
# before RoPE and is applied by the caller); the QK norm's epsilon and the softmax scale are written into the
# source (templates take no floats). Buffer lengths are read from the shapes MLX passes, so one compiled
# kernel serves every prompt length and capacity (compiling is slow).
_SOURCE = r"""
  constexpr int HALF = HD / 2;
  constexpr int NW = HD / 32;   // warps per block
  constexpr int EPL = HD / 32;  // head dims per lane when a warp scores one key
  constexpr int GROUP = H / KV;
  constexpr int WIDTH = (H + 2 * KV) * HD;
  constexpr float EPS_ = RMS_NORM_EPS;
  constexpr float SCALE_ = SOFTMAX_SCALE;
  const int head = blockIdx.x, row = blockIdx.y, d = threadIdx.x;
  const int lane = d & 31, warp = d >> 5, kvh = head / GROUP;
  const size_t LMAX = prompt_k_shape[2], GCAP = generated_kv_shape[3];
  const int t = step[0];
  const int p = row_prompt[row];
  const int plen = prompt_len[p];
  const int w = window[0];  // keys at positions >= plen + t - w are read
  const int first = plen + t - w;  // may be negative: no prompt key falls outside

  __shared__ float q_s[HD], k_s[HD], v_s[HD], red_q[NW], red_k[NW], m_s[NW], l_s[NW];
  __shared__ float acc_s[NW][HD];

  // RoPE (rotate-half form, rounded to T as mx.fast.rope's output is), then the QK RMSNorm.
  const T* src = qkv + (size_t)row * WIDTH;
  const int i = d < HALF ? d : d - HALF;
  float sn, cs;
  sincosf((float)(plen + t) * inv_freq[i], &sn, &cs);
  const float qa = ck_float(src[head * HD + i]), qb = ck_float(src[head * HD + i + HALF]);
  const float ka = ck_float(src[(H + kvh) * HD + i]), kb = ck_float(src[(H + kvh) * HD + i + HALF]);
  const float qr = ck_float(T(d < HALF ? qa * cs - qb * sn : qa * sn + qb * cs));
  const float kr = ck_float(T(d < HALF ? ka * cs - kb * sn : ka * sn + kb * cs));
  const float sq_w = ck_warp_sum(qr * qr), sk_w = ck_warp_sum(kr * kr);
  if (lane == 0) { red_q[warp] = sq_w; red_k[warp] = sk_w; }
  __syncthreads();
  float sq = 0.f, sk = 0.f;
  for (int w = 0; w < NW; ++w) { sq += red_q[w]; sk += red_k[w]; }
  const float qn = QK_NORM ? ck_float(T(qr * rsqrtf(sq / HD + EPS_))) : qr;
  const float kn = QK_NORM ? ck_float(T(kr * rsqrtf(sk / HD + EPS_))) : kr;
  const float vn = ck_float(src[(H + KV + kvh) * HD + d]);
  q_s[d] = qn * (SCALE_ * 1.4426950408889634f);  // softmax scale and log2(e): exp2 below
  k_s[d] = kn;
  v_s[d] = vn;

  // The new key and value go to column t of the row's cache (see the module docstring).
  const size_t k_base = (((size_t)row * 2) * KV + kvh) * GCAP * HD;
  const size_t v_base = (((size_t)row * 2 + 1) * KV + kvh) * GCAP * HD;
  if (head % GROUP == 0) {
    T* cache = const_cast<T*>(generated_kv);
    cache[k_base + (size_t)t * HD + d] = T(kn);
    cache[v_base + (size_t)t * HD + d] = T(vn);
  }
  __syncthreads();

  // Each warp scores every NW-th key with an online softmax; lanes hold EPL dims of q and of the output.
  float qv[EPL], acc[EPL];
  for (int e = 0; e < EPL; ++e) { qv[e] = q_s[lane * EPL + e]; acc[e] = 0.f; }
  float m = -__int_as_float(0x7f800000), l = 0.f;  // -inf
  auto visit = [&](const T* key, const T* value) {
    float s = 0.f;
    for (int e = 0; e < EPL; ++e) s += qv[e] * ck_float(key[lane * EPL + e]);
    s = ck_warp_sum(s);
    const float m_new = fmaxf(m, s);
    const float correction = exp2f(m - m_new), weight = exp2f(s - m_new);
    l = l * correction + weight;
    for (int e = 0; e < EPL; ++e) acc[e] = acc[e] * correction + weight * ck_float(value[lane * EPL + e]);
    m = m_new;
  };
  const T* pk = prompt_k + ((size_t)p * KV + kvh) * LMAX * HD;
  const T* pv = prompt_v + ((size_t)p * KV + kvh) * LMAX * HD;
#pragma unroll 4
  for (int j = max(first, 0) + warp; j < plen; j += NW) visit(pk + (size_t)j * HD, pv + (size_t)j * HD);
#pragma unroll 4
  for (int j = max(first - plen, 0) + warp; j < t; j += NW)
    visit(generated_kv + k_base + (size_t)j * HD, generated_kv + v_base + (size_t)j * HD);
  if (warp == NW - 1) {  // the new token attends to itself
    float s = 0.f;
    for (int e = 0; e < EPL; ++e) s += qv[e] * k_s[lane * EPL + e];
    s = ck_warp_sum(s);
    const float m_new = fmaxf(m, s);
    const float correction = exp2f(m - m_new), weight = exp2f(s - m_new);
    l = l * correction + weight;
    for (int e = 0; e < EPL; ++e) acc[e] = acc[e] * correction + weight * v_s[lane * EPL + e];
    m = m_new;
  }

  // Merge the warps' partial softmaxes.
  if (lane == 0) { m_s[warp] = m; l_s[warp] = l; }
  for (int e = 0; e < EPL; ++e) acc_s[warp][lane * EPL + e] = acc[e];
  __syncthreads();
  float m_all = m_s[0];
  for (int w = 1; w < NW; ++w) m_all = fmaxf(m_all, m_s[w]);
  float total = 0.f, o = 0.f;
  for (int w = 0; w < NW; ++w) {
    const float f = exp2f(m_s[w] - m_all);
    total += l_s[w] * f;
    o += acc_s[w][d] * f;
  }
  out[(size_t)row * H * HD + head * HD + d] = T(o / total);
"""

_INPUTS = ["qkv", "inv_freq", "step", "row_prompt", "prompt_len", "prompt_k", "prompt_v", "generated_kv", "window"]
NO_WINDOW = 1 << 30  # the window argument of a layer that reads every earlier key


def window_arg(window) -> int:
    """The kernel's window argument for a layer's window (None: every earlier key)."""
    return NO_WINDOW if window is None else int(window)


def supports_shape(n_heads: int, n_kv_heads: int, head_dim: int) -> bool:
    """The kernel's assumptions: whole warps per head, whole groups of query heads."""
    return head_dim % 32 == 0 and 32 <= head_dim <= 1024 and n_heads % n_kv_heads == 0


def kernel_source(eps: float, scale: float) -> str:
    """The kernel body with the QK norm's epsilon and the softmax scale as float literals."""
    return _SOURCE.replace("RMS_NORM_EPS", f"{float(eps)!r}f").replace("SOFTMAX_SCALE", f"{float(scale)!r}f")


@lru_cache(maxsize=None)
def _kernel(eps: float, scale: float):
    source = kernel_source(eps, scale)
    # The source's hash is in the name: MLX caches compiled kernels on disk by name and template values.
    name = "nanochat_decode_attention_" + hashlib.sha1((_HEADER + source).encode()).hexdigest()[:10]
    return mx.fast.cuda_kernel(name=name, input_names=_INPUTS, output_names=["out"], source=source, header=_HEADER)


def decode_attention(qkv, inv_freq, step, row_prompt, prompt_len, prompt_k, prompt_v, generated_kv, window,
                     n_heads, n_kv_heads, head_dim, eps, scale, qk_norm=True):
    """Attention output (rows, n_heads * head_dim) of one decode step; writes column step[0] of generated_kv.

    qkv: (rows, (n_heads + 2 n_kv_heads) head_dim), the step's q/k/v before RoPE and the QK norm.
    inv_freq: (head_dim / 2,) float32 RoPE angle per position. step: (1,) int32, the decode step t.
    row_prompt: (rows,) int32 prompt of each row. prompt_len: (prompts,) int32 cached prompt tokens.
    prompt_k, prompt_v: (prompts, n_kv_heads, prompt capacity, head_dim), each prompt's keys from column 0.
    generated_kv: (rows, 2, n_kv_heads, capacity, head_dim): keys then values of the generated tokens.
    window: (1,) int32, window_arg(w): the query at position p reads the keys at p-w..p.
    A row's token at step t sits at RoPE position prompt_len + t. eps: the QK RMSNorm's epsilon (nanochat's,
    after RoPE, no weight); qk_norm=False: RoPE only. scale: the softmax scale (1/sqrt(head_dim), times
    nanochat 2026's QK scale squared).
    """
    rows = qkv.shape[0]
    template = [("T", qkv.dtype), ("H", n_heads), ("KV", n_kv_heads), ("HD", head_dim), ("QK_NORM", bool(qk_norm))]
    return _kernel(float(eps), float(scale))(
        inputs=[qkv, inv_freq, step, row_prompt, prompt_len, prompt_k, prompt_v, generated_kv, window],
        template=template, grid=(n_heads * head_dim, rows, 1), threadgroup=(head_dim, 1, 1),
        output_shapes=[(rows, n_heads * head_dim)], output_dtypes=[qkv.dtype])[0]
