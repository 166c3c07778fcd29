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
(Llama, Qwen) calls it with qk_norm=False (RoPE only) or, for Qwen3, whose q and k norms have weights and come
before RoPE, with those weights (pre_rope_norm): in the kernel they save the step two RMSNorm kernels and a
concatenation per layer.
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
// Two sums over the block's threads (one per head dim): each warp's, then the NW warps' through red_a and red_b.
template <int NW> __device__ inline void ck_block_sums(float& a, float& b, float* red_a, float* red_b) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  a = ck_warp_sum(a);
  b = ck_warp_sum(b);
  if (lane == 0) { red_a[warp] = a; red_b[warp] = b; }
  __syncthreads();
  a = 0.f;
  b = 0.f;
  for (int w = 0; w < NW; ++w) { a += red_a[w]; b += red_b[w]; }
}
// N consecutive elements of T held as loaded, in 16-byte words where N elements fill whole ones (then 16-byte
// aligned), so a load in flight costs registers for its bytes, not for N floats.
template <typename T, int N> struct CkRaw {
  static constexpr bool WORDS = (N * sizeof(T)) % 16 == 0;
  uint4 w[WORDS ? N * sizeof(T) / 16 : 1];
  T e[WORDS ? 1 : N];
};
template <typename T, int N> __device__ inline void ck_fetch(const T* p, CkRaw<T, N>& r) {
  if constexpr (CkRaw<T, N>::WORDS) {
#pragma unroll
    for (int c = 0; c < N * (int)sizeof(T) / 16; ++c) r.w[c] = reinterpret_cast<const uint4*>(p)[c];
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) r.e[k] = p[k];
  }
}
template <typename T, int N> __device__ inline void ck_unpack(const CkRaw<T, N>& r, float* out) {
  if constexpr (CkRaw<T, N>::WORDS) {
    constexpr int PER = 16 / sizeof(T);
#pragma unroll
    for (int c = 0; c < N / PER; ++c) {
      const T* e = reinterpret_cast<const T*>(&r.w[c]);
#pragma unroll
      for (int k = 0; k < PER; ++k) out[c * PER + k] = ck_float(e[k]);
    }
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = ck_float(r.e[k]);
  }
}
"""

# One block per (head, row) with one thread per head dimension. Template constants: H, KV (heads),
# HD (head dim), T (the cache dtype), QK_NORM (0: RoPE only; 1: nanochat's RMSNorm without weight after RoPE;
# 2: RMSNorm with the weights q_norm_w, k_norm_w before RoPE, as Qwen3); the QK norm's epsilon and the softmax
# scale are written into the source (templates take no floats). Buffer lengths are read from the shapes MLX passes, so one compiled
# kernel serves every prompt length and capacity (compiling is slow).
_SOURCE = r"""
  constexpr int HALF = HD / 2;
  constexpr int NW = HD / 32;   // warps per block
  // Keys are scored by groups of LPK lanes, each lane DPL of the head dims: a warp reads SPW keys at once, in
  // 16-byte loads, and sums a score in log2(LPK) shuffles. At head dims 64 and 128 a lane holds 8 dims (one
  // 16-byte word), not 16: fewer registers, so more blocks share an SM and hide each other's load latency, which
  // bounds this kernel more than its bytes do.
  constexpr int LPK = HD <= 16 ? 1 : HD <= 32 ? 2 : HD < 128 ? 8 : HD <= 256 ? 16 : 32;
  constexpr int DPL = HD / LPK;
  constexpr int SPW = 32 / LPK;  // key slots per warp
  constexpr int NS = NW * SPW;   // key slots per block
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

  __shared__ float q_s[HD], k_s[HD], v_s[HD], red_q[NW], red_k[NW], m_s[NS], l_s[NS];
  __shared__ float acc_s[NS][HD];

  // RoPE (rotate-half form, rounded to T as mx.fast.rope's output is), then the QK RMSNorm.
  const T* src = qkv + (size_t)row * WIDTH;
  const int i = d < HALF ? d : d - HALF;
  float sn, cs;
  sincosf((float)(plen + t) * inv_freq[i], &sn, &cs);
  float qa, qb, ka, kb;
  if (QK_NORM == 2) {
    // mx.fast.rms_norm with a weight, before RoPE: w * T(x * rsqrt(mean(x^2) + eps)), in T.
    const float xq = ck_float(src[head * HD + d]), xk = ck_float(src[(H + kvh) * HD + d]);
    float tq = xq * xq, tk = xk * xk;
    ck_block_sums<NW>(tq, tk, red_q, red_k);
    q_s[d] = ck_float(T(ck_float(q_norm_w[d]) * ck_float(T(xq * rsqrtf(tq / HD + EPS_)))));
    k_s[d] = ck_float(T(ck_float(k_norm_w[d]) * ck_float(T(xk * rsqrtf(tk / HD + EPS_)))));
    __syncthreads();
    qa = q_s[i]; qb = q_s[i + HALF]; ka = k_s[i]; kb = k_s[i + HALF];
    __syncthreads();  // q_s and k_s are written again below
  } else {
    qa = ck_float(src[head * HD + i]); qb = ck_float(src[head * HD + i + HALF]);
    ka = ck_float(src[(H + kvh) * HD + i]); kb = ck_float(src[(H + kvh) * HD + i + HALF]);
  }
  const float qr = ck_float(T(d < HALF ? qa * cs - qb * sn : qa * sn + qb * cs));
  const float kr = ck_float(T(d < HALF ? ka * cs - kb * sn : ka * sn + kb * cs));
  float qn = qr, kn = kr;
  if (QK_NORM == 1) {  // nanochat's RMSNorm without weight, after RoPE
    float sq = qr * qr, sk = kr * kr;
    ck_block_sums<NW>(sq, sk, red_q, red_k);
    qn = ck_float(T(qr * rsqrtf(sq / HD + EPS_)));
    kn = ck_float(T(kr * rsqrtf(sk / HD + EPS_)));
  }
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

  // Each key slot visits every NS-th key (the prompt's in the window, then the row's generated ones, then the
  // new one) with an online softmax; its lanes hold DPL dims of q and of the slot's output. The loop is bound by
  // memory latency and by instructions, so a pass takes two keys per slot (u and u + NS) with one softmax
  // correction for both, and loads the next pass's two (key, value) pairs before scoring this pass's.
  const int slot = warp * SPW + lane / LPK, sub = lane % LPK;
  float qv[DPL], acc[DPL], xa[DPL], xb[DPL];  // xa, xb: the pass's two keys, then values
  for (int e = 0; e < DPL; ++e) { qv[e] = q_s[sub * DPL + e]; acc[e] = 0.f; }
  float m = -__int_as_float(0x7f800000), l = 0.f;  // -inf
  const T* pk = prompt_k + ((size_t)p * KV + kvh) * LMAX * HD;
  const T* pv = prompt_v + ((size_t)p * KV + kvh) * LMAX * HD;
  const int p0 = max(first, 0), g0 = max(first - plen, 0);
  const int n_prompt = max(plen - p0, 0), n_read = n_prompt + max(t - g0, 0);
  // Key u's (key, value) rows, or nullptr for the new key (u == n_read) and past the end.
  auto locate = [&](int u, const T*& key, const T*& value) {
    key = value = nullptr;
    if (u < n_prompt) {
      key = pk + (size_t)(p0 + u) * HD;
      value = pv + (size_t)(p0 + u) * HD;
    } else if (u < n_read) {
      key = generated_kv + k_base + (size_t)(g0 + u - n_prompt) * HD;
      value = generated_kv + v_base + (size_t)(g0 + u - n_prompt) * HD;
    }
  };
  auto fetch = [&](int u, const T*& key, CkRaw<T, DPL>& key_raw, CkRaw<T, DPL>& value_raw) {
    const T* value;
    locate(u, key, value);
    if (key != nullptr) { ck_fetch<T, DPL>(key + sub * DPL, key_raw); ck_fetch<T, DPL>(value + sub * DPL, value_raw); }
  };
  // A key's dims as floats: loaded, or the new key's (also an idle slot's) from shared memory.
  auto unpack = [&](bool cached, const CkRaw<T, DPL>& raw, const float* shared, float* dims) {
    if (cached) ck_unpack<T, DPL>(raw, dims);
    else for (int e = 0; e < DPL; ++e) dims[e] = shared[sub * DPL + e];
  };
  const T *key_a, *key_b;
  CkRaw<T, DPL> ka_raw, va_raw, kb_raw, vb_raw;
  fetch(slot, key_a, ka_raw, va_raw);
  fetch(slot + NS, key_b, kb_raw, vb_raw);
  for (int base = warp * SPW; base <= n_read; base += 2 * NS) {  // whole warps per pass: the shuffles need them
    const int u = base + lane / LPK;
    const bool active_a = u <= n_read, active_b = u + NS <= n_read;
    const bool cached_a = key_a != nullptr, cached_b = key_b != nullptr;
    const CkRaw<T, DPL> this_ka = ka_raw, this_va = va_raw, this_kb = kb_raw, this_vb = vb_raw;
    fetch(u + 2 * NS, key_a, ka_raw, va_raw);
    fetch(u + 3 * NS, key_b, kb_raw, vb_raw);
    unpack(cached_a, this_ka, k_s, xa);
    unpack(cached_b, this_kb, k_s, xb);
    float sa = 0.f, sb = 0.f;
    for (int e = 0; e < DPL; ++e) { sa += qv[e] * xa[e]; sb += qv[e] * xb[e]; }
    for (int o = LPK / 2; o > 0; o >>= 1) {
      sa += __shfl_xor_sync(0xffffffffu, sa, o);
      sb += __shfl_xor_sync(0xffffffffu, sb, o);
    }
    if (active_a) {  // (active_b implies active_a)
      unpack(cached_a, this_va, v_s, xa);
      unpack(cached_b, this_vb, v_s, xb);
      const float m_new = fmaxf(m, active_b ? fmaxf(sa, sb) : sa);
      const float correction = exp2f(m - m_new), wa = exp2f(sa - m_new), wb = active_b ? exp2f(sb - m_new) : 0.f;
      l = l * correction + wa + wb;
      for (int e = 0; e < DPL; ++e) acc[e] = acc[e] * correction + wa * xa[e] + wb * xb[e];
      m = m_new;
    }
  }

  // Merge the slots' partial softmaxes (a slot that read no key has m = -inf and weighs 0).
  if (sub == 0) { m_s[slot] = m; l_s[slot] = l; }
  for (int e = 0; e < DPL; ++e) acc_s[slot][sub * DPL + e] = acc[e];
  __syncthreads();
  float m_all = m_s[0];
  for (int k = 1; k < NS; ++k) m_all = fmaxf(m_all, m_s[k]);
  float total = 0.f, o = 0.f;
  for (int k = 0; k < NS; ++k) {
    const float f = exp2f(m_s[k] - m_all);
    total += l_s[k] * f;
    o += acc_s[k][d] * f;
  }
  out[(size_t)row * H * HD + head * HD + d] = T(o / total);
"""

_INPUTS = ["qkv", "inv_freq", "step", "row_prompt", "prompt_len", "prompt_k", "prompt_v", "generated_kv", "window",
           "q_norm_w", "k_norm_w"]
NO_WINDOW = 1 << 30  # the window argument of a layer that reads every earlier key


def window_arg(window) -> int:
    """The kernel's window argument for a layer's window (None: every earlier key)."""
    return NO_WINDOW if window is None else int(window)


def supports_shape(n_heads: int, n_kv_heads: int, head_dim: int) -> bool:
    """The kernel's assumptions: whole warps per head, whole groups of query heads."""
    return head_dim % 32 == 0 and 32 <= head_dim <= 512 and n_heads % n_kv_heads == 0


def kernel_source(eps: float, scale: float, source: str | None = None) -> str:
    """The kernel body (this module's, or `source`) with the QK norm's epsilon and the softmax scale as float
    literals."""
    source = _SOURCE if source is None else source
    return source.replace("RMS_NORM_EPS", f"{float(eps)!r}f").replace("SOFTMAX_SCALE", f"{float(scale)!r}f")


def make_kernel(eps: float, scale: float, header: str | None = None, source: str | None = None):
    """The kernel for this epsilon and scale; header and source: another version's (bench/decode_kernel.py)."""
    header = _HEADER if header is None else header
    source = kernel_source(eps, scale, source)
    # The source's hash is in the name: MLX caches compiled kernels on disk by name and template values.
    name = "nanochat_decode_attention_" + hashlib.sha1((header + source).encode()).hexdigest()[:10]
    return mx.fast.cuda_kernel(name=name, input_names=_INPUTS, output_names=["out"], source=source, header=header)


@lru_cache(maxsize=None)
def _kernel(eps: float, scale: float):
    return make_kernel(eps, scale)


@lru_cache(maxsize=None)
def _unused_norm_weight(head_dim, dtype):
    """The weight inputs of a kernel that norms without weights (made once: a new array per call is a kernel)."""
    weight = mx.ones((head_dim,), dtype)
    mx.eval(weight)
    return weight


def decode_attention(qkv, inv_freq, step, row_prompt, prompt_len, prompt_k, prompt_v, generated_kv, window,
                     n_heads, n_kv_heads, head_dim, eps, scale, qk_norm=True, pre_rope_norm=None):
    """Attention output (rows, n_heads * head_dim) of one decode step; writes column step[0] of generated_kv.

    qkv: (rows, (n_heads + 2 n_kv_heads) head_dim), the step's q/k/v before RoPE and the QK norm.
    inv_freq: (head_dim / 2,) float32 RoPE angle per position. step: (1,) int32, the decode step t.
    row_prompt: (rows,) int32 prompt of each row. prompt_len: (prompts,) int32 cached prompt tokens.
    prompt_k, prompt_v: (prompts, n_kv_heads, prompt capacity, head_dim), each prompt's keys from column 0.
    generated_kv: (rows, 2, n_kv_heads, capacity, head_dim): keys then values of the generated tokens.
    window: (1,) int32, window_arg(w): the query at position p reads the keys at p-w..p.
    A row's token at step t sits at RoPE position prompt_len + t. eps: the QK RMSNorm's epsilon (nanochat's,
    after RoPE, no weight); qk_norm=False: RoPE only. pre_rope_norm: (q weight, k weight), each (head_dim,), for
    RMSNorms with weights before RoPE (Qwen3's; with qk_norm=False). scale: the softmax scale (1/sqrt(head_dim),
    times nanochat 2026's QK scale squared).
    """
    rows = qkv.shape[0]
    if pre_rope_norm is not None and qk_norm:
        raise ValueError("decode_attention: pre_rope_norm replaces the norm after RoPE; pass qk_norm=False with it")
    mode = 2 if pre_rope_norm is not None else int(bool(qk_norm))
    q_weight, k_weight = pre_rope_norm or (_unused_norm_weight(head_dim, qkv.dtype),) * 2
    template = [("T", qkv.dtype), ("H", n_heads), ("KV", n_kv_heads), ("HD", head_dim), ("QK_NORM", mode)]
    return _kernel(float(eps), float(scale))(
        inputs=[qkv, inv_freq, step, row_prompt, prompt_len, prompt_k, prompt_v, generated_kv, window, q_weight,
                k_weight],
        template=template, grid=(n_heads * head_dim, rows, 1), threadgroup=(head_dim, 1, 1),
        output_shapes=[(rows, n_heads * head_dim)], output_dtypes=[qkv.dtype])[0]
