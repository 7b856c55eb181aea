// effnn._C: fused Monarch (block-diagonal butterfly) forward and backward for CPU tensors.
//
// Semantics (the specification is the reference in effnn/ops/monarch.py):
//   x: (T, n_in), w1: (k, q, p), w2: (l, s, r), k*q == l*r, n_in <= k*p, n_out <= l*s
//   mid[t, kk*q + j]  = sum_pp w1[kk, j, pp] * x_pad[t, kk*p + pp]     (x zero-padded to k*p)
//   out[t, ss*l + ll] = sum_rr w2[ll, ss, rr] * mid[t, rr*l + ll]
//   y = out[:, :n_out] (+ bias)
//
// How: the tokens are cut into tiles of Tt (<= 128) tokens. Inside a tile everything is kept
// feature-major (features x tokens), where both Monarch permutations are plain row strides, so
// every block product is a small row-major GEMM addressed through leading dimensions:
//   midT[kk*q + j, :]  = w1[kk] (q x p) @ xT[kk*p : kk*p + p, :]
//   outT[ss*l + ll, :] = w2[ll] (s x r) @ midT[ll :: l, :]         (row stride l*LD)
// Only the tile's input and output are transposed (in cache, AVX2 when the CPU has it). The
// GEMMs run on the oneDNN brgemm micro-kernel that libtorch exports
// (at::native::cpublas::brgemm: JIT-compiled per shape and cached per thread; libtorch itself
// falls back to its BLAS gemm on CPUs without AVX2). Each at::parallel_for thread takes a
// contiguous share of the tiles; weight gradients are accumulated per thread and summed at the
// end in a fixed order (deterministic for a given number of threads).
// The forward can save the middle activation (save_mid, for training, as fly's implementation
// saves it), feature-major: mid_t (n_mid x T), mid_t[kk*q + j, t] = mid[t, kk*q + j], i.e. the
// tile's midT rows copied to columns [t0, t0 + tt). The backward reads it back instead of
// recomputing the first factor (it needs it for dW2 = sum_t dout2 (x) in2, where in2 is a row
// stride of mid_t) and still reads x (dW1). Extra memory: T * n_mid elements of x.dtype.
//
// dtypes: float32, and bfloat16 (converted to fp32 per tile; all products accumulate in fp32;
// weight gradients are accumulated in fp32 and rounded once at the end; mid_t is saved in
// bf16, rounded once, as a bf16 GEMM output would be).
//
// The private keyword argument _tile=<tokens> (tests, tuning; not part of the interface) fixes
// the tile size and uses every thread.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>


namespace {

using at::BFloat16;


inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Leading dimension of the tile buffers: n rounded up to 16 floats, plus 16, so that strided
// rows (stride l*LD) do not all fall into the same cache sets.
inline int64_t padded_ld(int64_t n) { return round_up(n, 16) + 16; }

// Row-major C (M x N, ldc) = A (M x K, lda) @ B (K x N, ldb)  (+= when accumulate).
inline void gemm_rm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                    int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!accumulate) {
      for (int64_t i = 0; i < M; ++i) std::memset(C + i * ldc, 0, sizeof(float) * N);
    }
    return;
  }
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C);
}

// The token-direction products in column chunks: brgemm runs best with N <= ~128.
constexpr int64_t kChunk = 128;
inline void gemm_rm_cols(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                         const float* B, int64_t ldb, float* C, int64_t ldc) {
  for (int64_t c0 = 0; c0 < N; c0 += kChunk) {
    gemm_rm(M, std::min(kChunk, N - c0), K, A, lda, B + c0, ldb, C + c0, ldc, false);
  }
}

// ---------------------------------------------------------------------------------------------
// In-cache transposes. dst[c * ldd + r] = src[r * lds + c] (+ add[r]) for r < rows, c < cols.
// x86-64: an AVX2 8x8 register transpose, selected at run time (the build itself targets the
// x86-64 baseline); elsewhere, and for ragged edges, a blocked scalar loop.

void transpose_scalar(const float* __restrict__ src, int64_t lds, float* __restrict__ dst,
                      int64_t ldd, int64_t rows, int64_t cols, const float* __restrict__ add) {
  constexpr int64_t B = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += B) {
    const int64_t r1 = std::min(rows, r0 + B);
    for (int64_t c0 = 0; c0 < cols; c0 += B) {
      const int64_t c1 = std::min(cols, c0 + B);
      for (int64_t c = c0; c < c1; ++c) {
        float* d = dst + c * ldd;
        if (add) {
          for (int64_t r = r0; r < r1; ++r) d[r] = src[r * lds + c] + add[r];
        } else {
          for (int64_t r = r0; r < r1; ++r) d[r] = src[r * lds + c];
        }
      }
    }
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define EFFNN_X86_DISPATCH 1
__attribute__((target("avx2,fma"))) void transpose_avx2(const float* __restrict__ src,
                                                        int64_t lds, float* __restrict__ dst,
                                                        int64_t ldd, int64_t rows, int64_t cols,
                                                        const float* __restrict__ add) {
  const int64_t R8 = rows / 8 * 8, C8 = cols / 8 * 8;
  for (int64_t r0 = 0; r0 < R8; r0 += 8) {
    const __m256 a = add ? _mm256_loadu_ps(add + r0) : _mm256_setzero_ps();
    const float* s = src + r0 * lds;
    for (int64_t c0 = 0; c0 < C8; c0 += 8) {
      __m256 v0 = _mm256_loadu_ps(s + 0 * lds + c0), v1 = _mm256_loadu_ps(s + 1 * lds + c0);
      __m256 v2 = _mm256_loadu_ps(s + 2 * lds + c0), v3 = _mm256_loadu_ps(s + 3 * lds + c0);
      __m256 v4 = _mm256_loadu_ps(s + 4 * lds + c0), v5 = _mm256_loadu_ps(s + 5 * lds + c0);
      __m256 v6 = _mm256_loadu_ps(s + 6 * lds + c0), v7 = _mm256_loadu_ps(s + 7 * lds + c0);
      __m256 t0 = _mm256_unpacklo_ps(v0, v1), t1 = _mm256_unpackhi_ps(v0, v1);
      __m256 t2 = _mm256_unpacklo_ps(v2, v3), t3 = _mm256_unpackhi_ps(v2, v3);
      __m256 t4 = _mm256_unpacklo_ps(v4, v5), t5 = _mm256_unpackhi_ps(v4, v5);
      __m256 t6 = _mm256_unpacklo_ps(v6, v7), t7 = _mm256_unpackhi_ps(v6, v7);
      __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
      __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
      __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
      __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
      float* d = dst + c0 * ldd + r0;
      _mm256_storeu_ps(d + 0 * ldd, _mm256_add_ps(_mm256_permute2f128_ps(u0, u4, 0x20), a));
      _mm256_storeu_ps(d + 1 * ldd, _mm256_add_ps(_mm256_permute2f128_ps(u1, u5, 0x20), a));
      _mm256_storeu_ps(d + 2 * ldd, _mm256_add_ps(_mm256_permute2f128_ps(u2, u6, 0x20), a));
      _mm256_storeu_ps(d + 3 * ldd, _mm256_add_ps(_mm256_permute2f128_ps(u3, u7, 0x20), a));
      _mm256_storeu_ps(d + 4 * ldd, _mm256_add_ps(_mm256_permute2f128_ps(u0, u4, 0x31), a));
      _mm256_storeu_ps(d + 5 * ldd, _mm256_add_ps(_mm256_permute2f128_ps(u1, u5, 0x31), a));
      _mm256_storeu_ps(d + 6 * ldd, _mm256_add_ps(_mm256_permute2f128_ps(u2, u6, 0x31), a));
      _mm256_storeu_ps(d + 7 * ldd, _mm256_add_ps(_mm256_permute2f128_ps(u3, u7, 0x31), a));
    }
  }
  // ragged edges
  if (C8 < cols) transpose_scalar(src + C8, lds, dst + C8 * ldd, ldd, R8, cols - C8, add);
  if (R8 < rows)
    transpose_scalar(src + R8 * lds, lds, dst + R8, ldd, rows - R8, cols, add ? add + R8 : nullptr);
}
#endif

using transpose_fn = void (*)(const float*, int64_t, float*, int64_t, int64_t, int64_t,
                              const float*);

transpose_fn pick_transpose() {
#ifdef EFFNN_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return transpose_avx2;
#endif
  return transpose_scalar;
}

inline void transpose(const float* src, int64_t lds, float* dst, int64_t ldd, int64_t rows,
                      int64_t cols, const float* add = nullptr) {
  static const transpose_fn fn = pick_transpose();
  if (rows > 0 && cols > 0) fn(src, lds, dst, ldd, rows, cols, add);
}

// Row-major C (M x N, ldc) += A (M x K, lda) @ Bt^T with Bt (N x K, ldb): the weight-gradient
// products (K = tokens). Bt is transposed into `work` (K x N, padded ld) and fed to brgemm;
// measured here, this beats MKL's sgemm with a transposed operand for every block size.
inline void gemm_abt_acc(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                         const float* Bt, int64_t ldb, float* C, int64_t ldc, float* work) {
  if (M <= 0 || N <= 0 || K <= 0) return;
  const int64_t ldw = padded_ld(N);
  transpose(Bt, ldb, work, ldw, N, K);
  gemm_rm(M, N, K, A, lda, work, ldw, C, ldc, true);
}

// contiguous bf16 <-> fp32 conversions (vectorised by the compiler)
inline void to_float(const BFloat16* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
inline void from_float(const float* src, BFloat16* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<BFloat16>(src[i]);
}

// fp32 token-major view of rows [t0, t0 + tt) of a (T x n) tensor: the tensor itself for fp32,
// a converted copy in `buf` for bf16.
template <typename scalar_t>
inline const float* rows_f32(const scalar_t* src, int64_t t0, int64_t tt, int64_t n, float* buf) {
  if constexpr (std::is_same<scalar_t, float>::value) {
    (void)tt;
    (void)buf;
    return src + t0 * n;
  } else {
    to_float(src + t0 * n, buf, tt * n);
    return buf;
  }
}

// (T x n) rows [t0, t0 + tt) = tileT^T (tileT: n x tt feature-major, ld LD) + add
template <typename scalar_t>
inline void store_rows(const float* tileT, int64_t LD, scalar_t* dst, int64_t t0, int64_t tt,
                       int64_t n, const float* add, float* buf) {
  if constexpr (std::is_same<scalar_t, float>::value) {
    (void)buf;
    transpose(tileT, LD, dst + t0 * n, n, n, tt, add);
  } else {
    transpose(tileT, LD, buf, n, n, tt, add);
    from_float(buf, dst + t0 * n, tt * n);
  }
}

struct Shape {
  int64_t T, n_in, n_out, k, q, p, l, s, r, n_mid;
  // valid input columns of block kk / valid output rows of block ll (padding / truncation)
  int64_t p_eff(int64_t kk) const { return std::clamp<int64_t>(n_in - kk * p, 0, p); }
  int64_t s_eff(int64_t ll) const {
    return n_out <= ll ? 0 : std::min<int64_t>(s, (n_out - ll + l - 1) / l);
  }
};

// Tokens per tile, measured on a 2-core Zen 4 (fwd+bwd, 4096 tokens): with blocks of 192 and
// more, 128 tokens (brgemm wants a wide N, and the weights are streamed once per tile: 32 tokens
// is 30% slower with 256x256 blocks); with smaller blocks, 32 tokens (the tile's buffers then
// stay in L2/L3: 5-8% faster than 128 with 64x64 and 128x128 blocks). Very wide layers get fewer
// tokens so that a thread's buffers stay within ~16 MB. At least one tile per thread used.
int64_t tile_tokens(const Shape& sh, int64_t nthreads, int64_t forced) {
  int64_t tt = forced;
  if (tt <= 0) {
    const int64_t bmax = std::max({sh.p, sh.q, sh.r, sh.s});
    const int64_t per_token = 2 * (sh.n_in + 2 * sh.n_mid + sh.n_out) * (int64_t)sizeof(float);
    tt = std::min<int64_t>(bmax >= 192 ? 128 : 32,
                           std::max<int64_t>(16, (int64_t(32) << 20) / per_token));
  }
  const int64_t per_thread = (sh.T + nthreads - 1) / nthreads;
  return std::max<int64_t>(1, std::min(tt, per_thread));
}

// Per-thread scratch, kept between calls (it is re-used for every tile and every call, so its
// pages are only faulted in once). Grows to the largest request; uninitialised.
float* thread_scratch(int64_t n) {
  thread_local std::unique_ptr<float[]> buf;
  thread_local int64_t cap = 0;
  if (cap < n) {
    buf.reset();
    buf.reset(new float[n]);
    cap = n;
  }
  return buf.get();
}

// Run f(slot, t0, tt) over all token tiles. Slot i (one thread of at::parallel_for) takes the
// i-th contiguous share of the tiles: a static split, so that for a given thread count the
// results (the order of the weight-gradient sums) are deterministic.
template <typename F>
void for_each_tile(int64_t T, int64_t Tt, int64_t nslots, const F& f) {
  const int64_t ntiles = (T + Tt - 1) / Tt;
  at::parallel_for(0, nslots, 1, [&](int64_t b, int64_t e) {
    for (int64_t slot = b; slot < e; ++slot) {
      for (int64_t tile = slot * ntiles / nslots; tile < (slot + 1) * ntiles / nslots; ++tile) {
        const int64_t t0 = tile * Tt;
        f(slot, t0, std::min(Tt, T - t0));
      }
    }
  });
}

// Plan of one call: tile size, buffer strides.
struct Plan {
  int64_t Tt, LD, nslots;
  // forced > 0 (the private _tile argument) fixes the tile size and uses every thread
  Plan(const Shape& sh, int64_t forced) {
    int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
    if (forced <= 0) {
      // small problems use fewer threads: about 2 MFLOP (~20 us) per thread at least
      const double flops = 2.0 * sh.T * (sh.k * sh.q * sh.p + sh.l * sh.s * sh.r);
      nthreads = std::clamp<int64_t>(static_cast<int64_t>(flops / 2e6), 1, nthreads);
    }
    Tt = tile_tokens(sh, nthreads, forced);
    LD = padded_ld(Tt);
    nslots = std::min<int64_t>(nthreads, (sh.T + Tt - 1) / Tt);
  }
};

// The token-direction products of a tile of tt tokens run over ttp >= tt columns: tt rounded
// up to 16 (so that ragged tails need few distinct JIT kernels), or tt itself when it is below
// 16 (small batches: no wasted work).
inline int64_t padded_width(int64_t tt, int64_t LD) {
  return tt < 16 ? tt : std::min(round_up(tt, 16), LD);
}

// Copy rows [t0, t0 + tt) of a token-major (T x n) tensor into a feature-major tile (n x ttp,
// ld LD); the columns [tt, ttp) are zeroed, so that products over the padded width are defined.
template <typename scalar_t>
inline void load_tileT(const scalar_t* src, int64_t t0, int64_t tt, int64_t ttp, int64_t n,
                       float* tileT, int64_t LD, float* buf) {
  transpose(rows_f32(src, t0, tt, n, buf), n, tileT, LD, tt, n);
  if (ttp > tt) {
    for (int64_t i = 0; i < n; ++i) std::memset(tileT + i * LD + tt, 0, sizeof(float) * (ttp - tt));
  }
}

// midT (n_mid x ttp) = blockdiag(w1) @ xT
inline void first_factor(const Shape& sh, const float* w1, const float* xT, float* midT,
                         int64_t LD, int64_t ttp) {
  for (int64_t kk = 0; kk < sh.k; ++kk) {
    gemm_rm_cols(sh.q, ttp, sh.p_eff(kk), w1 + kk * sh.q * sh.p, sh.p, xT + kk * sh.p * LD, LD,
                 midT + kk * sh.q * LD, LD);
  }
}

// memcpy with non-temporal stores (x86-64: SSE2, the baseline) for the aligned 16-byte pieces:
// mid_t is written in short pieces (a tile's tokens) of rows T apart and only read back by the
// backward, so ordinary stores would first read every line in (the lines are not in cache,
// and the stride defeats the prefetchers); write-combined streaming stores skip that
// (measured: 5-10% of a saving forward with 32x32 and 64x64 blocks). The caller fences
// (sfence) before the data is handed to another thread.
inline void copy_stream(void* dst, const void* src, int64_t bytes) {
#if defined(__x86_64__)
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  const int64_t head = std::min<int64_t>(bytes, (16 - (reinterpret_cast<uintptr_t>(d) & 15)) & 15);
  std::memcpy(d, s, head);
  int64_t i = head;
  for (; i + 16 <= bytes; i += 16) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i),
                     _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
  }
  std::memcpy(d + i, s + i, bytes - i);
#else
  std::memcpy(dst, src, bytes);
#endif
}

inline void stream_fence() {
#if defined(__x86_64__)
  _mm_sfence();
#endif
}

// Save the tile's middle activation: mid_t (n_mid x T, x.dtype) columns [t0, t0 + tt) = midT
// (n_mid x tt, ld LD); bf16: rounded once, as a bf16 GEMM output would be (staged in `buf`,
// tt elements).
template <typename scalar_t>
inline void save_mid_cols(const float* midT, int64_t LD, int64_t n_mid, scalar_t* mid_t, int64_t T,
                          int64_t t0, int64_t tt, float* buf) {
  for (int64_t i = 0; i < n_mid; ++i) {
    if constexpr (std::is_same<scalar_t, float>::value) {
      (void)buf;
      copy_stream(mid_t + i * T + t0, midT + i * LD, sizeof(float) * tt);
    } else {
      BFloat16* b = reinterpret_cast<BFloat16*>(buf);
      from_float(midT + i * LD, b, tt);
      copy_stream(mid_t + i * T + t0, b, sizeof(BFloat16) * tt);
    }
  }
  stream_fence();
}

inline void prefetch(const void* p) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p);
#elif defined(__x86_64__) || defined(_M_X64)
  _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0);
#else
  (void)p;
#endif
}

// The backward's copy of the tile's middle activation: midT (n_mid x tt, ld LD, fp32) = mid_t
// (n_mid x T, x.dtype) columns [t0, t0 + tt). The pieces are rows T apart, too far for the
// hardware prefetchers: each row prefetches the row 8 ahead (measured: the backward 3-8%
// faster than reading mid_t in place, with 32x32 to 1024x1024 blocks; 1-4% faster than the
// copy without prefetch).
template <typename scalar_t>
inline void load_mid_cols(const scalar_t* mid_t, int64_t T, int64_t t0, int64_t tt, int64_t n_mid,
                          float* midT, int64_t LD) {
  constexpr int64_t kAhead = 8;
  const int64_t bytes = tt * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t i = 0; i < n_mid; ++i) {
    if (i + kAhead < n_mid) {
      const char* pf = reinterpret_cast<const char*>(mid_t + (i + kAhead) * T + t0);
      for (int64_t o = 0; o < bytes; o += 64) prefetch(pf + o);
    }
    if constexpr (std::is_same<scalar_t, float>::value) {
      std::memcpy(midT + i * LD, mid_t + i * T + t0, bytes);
    } else {
      to_float(mid_t + i * T + t0, midT + i * LD, tt);
    }
  }
}

template <typename scalar_t>
void forward_impl(const Shape& sh, const scalar_t* x, const float* w1, const float* w2,
                  const float* bias, scalar_t* y, scalar_t* mid_t, int64_t forced) {
  constexpr bool conv = !std::is_same<scalar_t, float>::value;
  const Plan pl(sh, forced);
  const int64_t LD = pl.LD;
  // feature-major xT, midT, outT; bf16: a token-major fp32 tile for the conversions
  const int64_t need =
      (sh.n_in + sh.n_mid + sh.n_out) * LD + (conv ? pl.Tt * std::max(sh.n_in, sh.n_out) : 0);

  for_each_tile(sh.T, pl.Tt, pl.nslots, [&](int64_t, int64_t t0, int64_t tt) {
    float* xT = thread_scratch(need);
    float* midT = xT + sh.n_in * LD;
    float* outT = midT + sh.n_mid * LD;
    float* tmp = outT + sh.n_out * LD;
    const int64_t ttp = padded_width(tt, LD);
    load_tileT(x, t0, tt, ttp, sh.n_in, xT, LD, tmp);
    first_factor(sh, w1, xT, midT, LD, ttp);
    if (mid_t) save_mid_cols(midT, LD, sh.n_mid, mid_t, sh.T, t0, tt, tmp);
    for (int64_t ll = 0; ll < sh.l; ++ll) {
      gemm_rm_cols(sh.s_eff(ll), ttp, sh.r, w2 + ll * sh.s * sh.r, sh.r, midT + ll * LD,
                   sh.l * LD, outT + ll * LD, sh.l * LD);
    }
    store_rows(outT, LD, y, t0, tt, sh.n_out, bias, tmp);
  });
}

template <typename scalar_t>
void backward_impl(const Shape& sh, const scalar_t* g, const scalar_t* x, const scalar_t* mid_t,
                   const float* w1t, const float* w2t, scalar_t* dx, float* dw1, float* dw2,
                   int64_t forced) {
  constexpr bool conv = !std::is_same<scalar_t, float>::value;
  const Plan pl(sh, forced);
  const int64_t LD = pl.LD, nslots = pl.nslots;
  const int64_t nw1 = sh.k * sh.q * sh.p, nw2 = sh.l * sh.s * sh.r;
  // feature-major xT (re-used for dxT), dmidT, gT; the transposed operand of the
  // weight-gradient products (Tt x max(r, p)); bf16: a token-major fp32 tile; midT, the tile's
  // columns of mid_t (feature-major)
  const int64_t work = pl.Tt * padded_ld(std::max(sh.r, sh.p));
  const int64_t conv_tmp = conv ? pl.Tt * std::max(sh.n_in, sh.n_out) : 0;
  const int64_t need = (sh.n_in + 2 * sh.n_mid + sh.n_out) * LD + work + conv_tmp;
  // weight-gradient accumulators: slot 0 uses the outputs, the others a buffer each; each is
  // zeroed by its own thread before its first tile
  at::Tensor acc = at::empty({std::max<int64_t>(nslots - 1, 0), nw1 + nw2},
                             at::TensorOptions().dtype(at::kFloat));
  std::vector<char> started(nslots, 0);

  for_each_tile(sh.T, pl.Tt, nslots, [&](int64_t slot, int64_t t0, int64_t tt) {
    float* xT = thread_scratch(need);
    float* dmidT = xT + sh.n_in * LD;
    float* gT = dmidT + sh.n_mid * LD;
    float* wk = gT + sh.n_out * LD;
    float* tmp = wk + work;
    float* dW1 = slot == 0 ? dw1 : acc.data_ptr<float>() + (slot - 1) * (nw1 + nw2);
    float* dW2 = slot == 0 ? dw2 : dW1 + nw1;
    if (!started[slot]) {
      std::memset(dW1, 0, sizeof(float) * nw1);
      std::memset(dW2, 0, sizeof(float) * nw2);
      started[slot] = 1;
    }
    float* midT = tmp + conv_tmp;
    load_mid_cols(mid_t, sh.T, t0, tt, sh.n_mid, midT, LD);
    const int64_t ttp = padded_width(tt, LD);
    load_tileT(g, t0, tt, ttp, sh.n_out, gT, LD, tmp);
    for (int64_t ll = 0; ll < sh.l; ++ll) {
      const int64_t se = sh.s_eff(ll);
      const float* gTl = gT + ll * LD;  // rows ss*l + ll: (se x tt), ld l*LD
      // dW2[ll][:se] += gT_ll @ in2_ll, with in2_ll^T = midT rows rr*l + ll (r x tt), ld l*LD
      gemm_abt_acc(se, sh.r, tt, gTl, sh.l * LD, midT + ll * LD, sh.l * LD,
                   dW2 + ll * sh.s * sh.r, sh.r, wk);
      // dmidT rows rr*l + ll (r x ttp) = w2[ll]^T (r x se) @ gT_ll (se x ttp)
      gemm_rm_cols(sh.r, ttp, se, w2t + ll * sh.r * sh.s, sh.s, gTl, sh.l * LD,
                   dmidT + ll * LD, sh.l * LD);
    }
    load_tileT(x, t0, tt, ttp, sh.n_in, xT, LD, tmp);
    for (int64_t kk = 0; kk < sh.k; ++kk) {
      const int64_t pe = sh.p_eff(kk);
      if (pe <= 0) continue;
      const float* dm = dmidT + kk * sh.q * LD;
      float* xTk = xT + kk * sh.p * LD;  // (pe x tt)
      // dW1[kk][:, :pe] += dmidT_kk (q x tt) @ xT_kk^T (tt x pe)
      gemm_abt_acc(sh.q, pe, tt, dm, LD, xTk, LD, dW1 + kk * sh.q * sh.p, sh.p, wk);
      // dxT_kk (pe x ttp) = w1[kk]^T (pe x q) @ dmidT_kk (q x ttp), over xT_kk (now unused)
      if (dx) {
        gemm_rm_cols(pe, ttp, sh.q, w1t + kk * sh.p * sh.q, sh.q, dm, LD, xTk, LD);
      }
    }
    if (dx) store_rows(xT, LD, dx, t0, tt, sh.n_in, nullptr, tmp);
  });
  // sum the accumulators into the outputs
  if (!started[0]) {
    std::memset(dw1, 0, sizeof(float) * nw1);
    std::memset(dw2, 0, sizeof(float) * nw2);
  }
  bool others = false;
  for (int64_t sl = 1; sl < nslots; ++sl) others = others || started[sl];
  if (others) {
    const float* a0 = acc.data_ptr<float>();
    at::parallel_for(0, nw1 + nw2, 16384, [&](int64_t b, int64_t e) {
      for (int64_t sl = 1; sl < nslots; ++sl) {
        if (!started[sl]) continue;
        const float* a = a0 + (sl - 1) * (nw1 + nw2);
        for (int64_t i = b; i < std::min(e, nw1); ++i) dw1[i] += a[i];
        for (int64_t i = std::max(b, nw1); i < e; ++i) dw2[i - nw1] += a[i];
      }
    });
  }
}

Shape check_inputs(const char* fn, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
                   int64_t out_features) {
  TORCH_CHECK(x.device().is_cpu() && w1.device().is_cpu() && w2.device().is_cpu(), fn,
              ": effnn._C only handles CPU tensors, got x on ", x.device(), ", w1 on ",
              w1.device(), ", w2 on ", w2.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, fn,
              ": unsupported dtype ", x.scalar_type(),
              " (effnn._C supports torch.float32 and torch.bfloat16)");
  TORCH_CHECK(w1.scalar_type() == x.scalar_type() && w2.scalar_type() == x.scalar_type(), fn,
              ": x, w1 and w2 must have the same dtype, got x ", x.scalar_type(), ", w1 ",
              w1.scalar_type(), ", w2 ", w2.scalar_type());
  TORCH_CHECK(x.dim() == 2, fn, ": x must be 2-D (T, in_features), got shape ", x.sizes());
  TORCH_CHECK(w1.dim() == 3, fn, ": w1 must be 3-D (k, q, p), got shape ", w1.sizes());
  TORCH_CHECK(w2.dim() == 3, fn, ": w2 must be 3-D (l, s, r), got shape ", w2.sizes());
  TORCH_CHECK(x.is_contiguous() && w1.is_contiguous() && w2.is_contiguous(), fn,
              ": x, w1 and w2 must be contiguous (got x ", x.is_contiguous(), ", w1 ",
              w1.is_contiguous(), ", w2 ", w2.is_contiguous(), ")");
  Shape sh;
  sh.T = x.size(0);
  sh.n_in = x.size(1);
  sh.k = w1.size(0);
  sh.q = w1.size(1);
  sh.p = w1.size(2);
  sh.l = w2.size(0);
  sh.s = w2.size(1);
  sh.r = w2.size(2);
  sh.n_mid = sh.k * sh.q;
  sh.n_out = out_features;
  TORCH_CHECK(sh.k > 0 && sh.q > 0 && sh.p > 0 && sh.l > 0 && sh.s > 0 && sh.r > 0, fn,
              ": w1 ", w1.sizes(), " and w2 ", w2.sizes(), " must not have a zero-sized dimension");
  TORCH_CHECK(sh.k * sh.q == sh.l * sh.r, fn, ": w1 (k, q, p) = ", w1.sizes(),
              " and w2 (l, s, r) = ", w2.sizes(), " need k*q == l*r, got ", sh.k * sh.q, " != ",
              sh.l * sh.r);
  TORCH_CHECK(sh.n_in <= sh.k * sh.p, fn, ": in_features = x.size(1) = ", sh.n_in,
              " must be <= k*p = ", sh.k * sh.p);
  TORCH_CHECK(out_features >= 0 && out_features <= sh.l * sh.s, fn, ": out_features = ",
              out_features, " must be in [0, l*s = ", sh.l * sh.s, "]");
  return sh;
}

at::Tensor as_float(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat).contiguous();
}

void check_tile(const char* fn, int64_t tile) {
  TORCH_CHECK(tile >= 0, fn, ": _tile must be >= 0 (0: automatic), got ", tile);
}

std::tuple<at::Tensor, at::Tensor> monarch_forward(const at::Tensor& x, const at::Tensor& w1,
                                                   const at::Tensor& w2,
                                                   const c10::optional<at::Tensor>& bias,
                                                   int64_t out_features, bool save_mid,
                                                   int64_t tile) {
  at::NoGradGuard no_grad;
  const Shape sh = check_inputs("monarch_forward", x, w1, w2, out_features);
  check_tile("monarch_forward", tile);
  at::Tensor b32;
  if (bias.has_value() && bias->defined()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.device().is_cpu(), "monarch_forward: bias must be a CPU tensor, got ",
                b.device());
    TORCH_CHECK(b.dim() == 1 && b.size(0) == out_features,
                "monarch_forward: bias must have shape (out_features,) = (", out_features,
                ",), got ", b.sizes());
    TORCH_CHECK(b.scalar_type() == x.scalar_type(), "monarch_forward: bias dtype ",
                b.scalar_type(), " must match x dtype ", x.scalar_type());
    TORCH_CHECK(b.is_contiguous(), "monarch_forward: bias must be contiguous");
    b32 = as_float(b);
  }
  at::Tensor y = at::empty({sh.T, out_features}, x.options());
  at::Tensor mid_t = save_mid ? at::empty({sh.n_mid, sh.T}, x.options())
                              : at::empty({0}, x.options());
  if (sh.T == 0 || (out_features == 0 && !save_mid)) return {y, mid_t};
  const at::Tensor w1f = as_float(w1), w2f = as_float(w2);
  const float* bp = b32.defined() ? b32.data_ptr<float>() : nullptr;
  if (x.scalar_type() == at::kFloat) {
    forward_impl<float>(sh, x.data_ptr<float>(), w1f.data_ptr<float>(), w2f.data_ptr<float>(), bp,
                        y.data_ptr<float>(), save_mid ? mid_t.data_ptr<float>() : nullptr, tile);
  } else {
    forward_impl<BFloat16>(sh, x.data_ptr<BFloat16>(), w1f.data_ptr<float>(),
                           w2f.data_ptr<float>(), bp, y.data_ptr<BFloat16>(),
                           save_mid ? mid_t.data_ptr<BFloat16>() : nullptr, tile);
  }
  return {y, mid_t};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> monarch_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mid_t, const at::Tensor& w1,
    const at::Tensor& w2, bool need_input_grad, int64_t tile) {
  at::NoGradGuard no_grad;
  TORCH_CHECK(grad_out.dim() == 2,
              "monarch_backward: grad_out must be 2-D (T, out_features), got shape ",
              grad_out.sizes());
  const Shape sh = check_inputs("monarch_backward", x, w1, w2, grad_out.size(1));
  check_tile("monarch_backward", tile);
  TORCH_CHECK(grad_out.device().is_cpu(), "monarch_backward: grad_out must be a CPU tensor, got ",
              grad_out.device());
  TORCH_CHECK(grad_out.size(0) == sh.T, "monarch_backward: grad_out has ", grad_out.size(0),
              " rows but x has ", sh.T);
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), "monarch_backward: grad_out dtype ",
              grad_out.scalar_type(), " must match x dtype ", x.scalar_type());
  TORCH_CHECK(grad_out.is_contiguous(), "monarch_backward: grad_out must be contiguous");
  TORCH_CHECK(mid_t.defined(), "monarch_backward: mid_t is undefined; pass the middle activation "
              "returned by monarch_forward(..., save_mid=True)");
  TORCH_CHECK(mid_t.device().is_cpu(), "monarch_backward: mid_t must be a CPU tensor, got ",
              mid_t.device());
  TORCH_CHECK(mid_t.scalar_type() == x.scalar_type(), "monarch_backward: mid_t dtype ",
              mid_t.scalar_type(), " must match x dtype ", x.scalar_type());
  TORCH_CHECK(mid_t.dim() == 2 && mid_t.size(0) == sh.n_mid && mid_t.size(1) == sh.T,
              "monarch_backward: mid_t must have shape (k*q, T) = (", sh.n_mid, ", ", sh.T,
              ") (the middle activation saved by monarch_forward(..., save_mid=True)), got ",
              mid_t.sizes());
  TORCH_CHECK(mid_t.is_contiguous(), "monarch_backward: mid_t must be contiguous (feature-major "
              "(k*q, T) as monarch_forward returns it), got strides ", mid_t.strides());

  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor dx = need_input_grad ? at::empty({sh.T, sh.n_in}, x.options())
                                  : at::empty({0}, x.options());
  at::Tensor dw1, dw2;
  if (sh.T == 0) {
    dw1 = at::zeros(w1.sizes(), f32);
    dw2 = at::zeros(w2.sizes(), f32);
  } else {
    dw1 = at::empty(w1.sizes(), f32);
    dw2 = at::empty(w2.sizes(), f32);
    const at::Tensor w1f = as_float(w1), w2f = as_float(w2);
    const at::Tensor w1t = w1f.transpose(1, 2).contiguous();  // (k, p, q)
    const at::Tensor w2t = w2f.transpose(1, 2).contiguous();  // (l, r, s)
    if (x.scalar_type() == at::kFloat) {
      backward_impl<float>(sh, grad_out.data_ptr<float>(), x.data_ptr<float>(),
                           mid_t.data_ptr<float>(), w1t.data_ptr<float>(), w2t.data_ptr<float>(),
                           need_input_grad ? dx.data_ptr<float>() : nullptr,
                           dw1.data_ptr<float>(), dw2.data_ptr<float>(), tile);
    } else {
      backward_impl<BFloat16>(sh, grad_out.data_ptr<BFloat16>(), x.data_ptr<BFloat16>(),
                              mid_t.data_ptr<BFloat16>(), w1t.data_ptr<float>(),
                              w2t.data_ptr<float>(),
                              need_input_grad ? dx.data_ptr<BFloat16>() : nullptr,
                              dw1.data_ptr<float>(), dw2.data_ptr<float>(), tile);
    }
  }
  if (x.scalar_type() != at::kFloat) {
    dw1 = dw1.to(x.scalar_type());
    dw2 = dw2.to(x.scalar_type());
  }
  return {dx, dw1, dw2};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "effnn's optional compiled CPU kernels: fused Monarch forward and backward";
  m.def("monarch_forward", &monarch_forward,
        "(y, mid_t): y = Monarch(x; w1, w2)[:, :out_features] (+ bias). CPU, float32/bfloat16, "
        "contiguous x (T, in_features), w1 (k, q, p), w2 (l, s, r). With save_mid, mid_t is the "
        "middle activation for monarch_backward, feature-major (k*q, T) in x.dtype; without, an "
        "empty (0,) tensor. _tile is private (tests).",
        py::arg("x"), py::arg("w1"), py::arg("w2"), py::arg("bias"), py::arg("out_features"),
        py::arg("save_mid"), py::kw_only(), py::arg("_tile") = 0);
  m.def("monarch_backward", &monarch_backward,
        "(dx, dw1, dw2) for grad_out (T, out_features), from x and the mid_t saved by "
        "monarch_forward(..., save_mid=True); dx is an empty (0,) tensor when need_input_grad is "
        "False; the bias gradient is left to the caller. _tile is private (tests).",
        py::arg("grad_out"), py::arg("x"), py::arg("mid_t"), py::arg("w1"), py::arg("w2"),
        py::arg("need_input_grad"), py::kw_only(), py::arg("_tile") = 0);
}
