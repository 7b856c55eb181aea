// effnn._C: fused window attention with sptr's contextual relative position encoding (SphereFormer's
// radial windows and cubic windows), forward and backward, for CUDA tensors. The same two ops as
// csrc/window_attention_cpu.cpp (effnn_ext::window_attention_forward / window_attention_backward,
// same schemas and semantics; the specification is window_attention_ref in
// effnn/ops/radial_window.py), registered here for the CUDA dispatch key.
//
// Semantics, as in the CPU file: window w holds the points order[starts[w] : starts[w+1]]; q, k, v
// are read in place through `order`; codes (N, A) and r (N,) are in window order. Per head, with q
// multiplied by `scale`:
//   s[i, j] = q_i . k_j + sum_a q_i . Tq[a, idx_a(i, j)] + k_j . Tk[a, idx_a(i, j)]
//   out_i   = sum_j p[i, j] (v_j + sum_a Tv[a, idx_a(i, j)]),  p = softmax_j s,  lse_i = log sum_j exp s
//   linear axes a < A:      idx_a = c[i, a] - c[j, a] + L - 1
//   exponential split (A = 2, axis 2): idx = clamp(split(r_i - r_j) + L, 0, 2L-1), in r's dtype.
//
// The table terms are never formed per pair as head_dim vectors. Each point gets a small table of
// "slots": for a linear axis a the L values indexed by the OTHER point's code m (the pair's row is
// then c - m + L - 1 for a query, m - c + L - 1 for a key), and for the exponential axis the 2L
// values indexed by the table row itself. So S = 3L slots (cubic) or 4L (radial) per point, and
//   query slots   QT[i, (a, m)] = q_i . Tq[a, c_ia - m + L - 1],   QT[i, (2, row)] = q_i . Tq[2, row]
//   key slots     KT[j, (a, m)] = k_j . Tk[a, m - c_ja + L - 1],   KT[j, (2, row)] = k_j . Tk[2, row]
// A pair reads QT[i, (a, c_ja)] + KT[j, (a, c_ia)] per axis (the exponential axis: the slot of its
// row on both sides), and the value term accumulates the attention mass in a per-query histogram
// over the same slots, H[i, (a, c_ja)] += p_ij, turned into sum_slot H[i, slot] Tv[row] once per
// query. (This is the reference's Qrow / Krow / one-hot formulation, per point instead of per chunk.)
//
// How (flash style, one CUDA thread per owned point; all sums in at::opmath_type: fp32 for
// fp16/bf16/fp32, fp64 for fp64):
//   forward    one block per (query tile of a window, head); the block's threads own one query
//              each; the window's keys stream through shared memory kStep at a time; online
//              softmax: running max, sum, output row and slot histogram rescaled when the max grows.
//   backward   (1) dq: one block per (query tile, head), keys streamed, probabilities recomputed
//              from the saved lse; also the query-side histograms of ds (-> dTq) and p (-> dTv).
//              (2) dk, dv: one block per (key tile, head), queries streamed; the key-side
//              histogram of ds (-> dTk). Each output row is written by the one thread (or block)
//              that owns it and summed in a fixed order: no atomics.
//              (3) table gradients from the per-point histograms (kept in an (N, heads, S)
//              scratch per table): each block sums a fixed range of points in order into its own
//              partial, then the partials are summed in order. Deterministic: same input, same bits.
// The window order, tiles and bounds are checked and prepared on the device with ATen ops; the
// value checks cost one copy of a few numbers to the host (the CPU file checks the same values).
//
// With EFFNN_CUDA_EMULATE this file compiles as plain C++ for CPU tensors, one OS thread per CUDA
// thread and a barrier for __syncthreads (tests/kernels/window_attention_cuda_emulation.cpp
// supplies those): the tests check the kernels against the reference that way where there is no
// GPU, as where this was written (see docs/sphereformer.md, "CUDA kernel").

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <utility>
#include <vector>

#ifndef EFFNN_CUDA_EMULATE
// c10/cuda only: ATen/cuda/CUDAContext.h needs the cuSPARSE/cuBLAS headers, which a bare toolkit
// (nvcc and the runtime) lacks.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#define EFFNN_HD __host__ __device__ __forceinline__
#define EFFNN_D __device__ __forceinline__
#endif

namespace {

// Points streamed per step (keys in the forward and dq kernels, queries in the dk/dv kernel).
constexpr int kStep = 32;
// Table-gradient kernel: threads per block, points staged per step, points per block (one partial
// sum each), head_dim columns per block (bounds its shared memory).
constexpr int kGradThreads = 256;
constexpr int kGradStage = 32;
constexpr int64_t kGradPoints = 512;
constexpr int kGradCols = 16;

#ifndef EFFNN_CUDA_EMULATE
EFFNN_D unsigned char* block_smem() {
  extern __shared__ __align__(16) unsigned char smem[];
  return smem;
}
EFFNN_D int float_bits(float x) { return __float_as_int(x); }
EFFNN_D long long double_bits(double x) { return __double_as_longlong(x); }
#endif

EFFNN_HD int imin(int a, int b) { return a < b ? a : b; }
EFFNN_HD int imax(int a, int b) { return a > b ? a : b; }
// Row strides of the per-thread shared rows: odd, so that the threads of a warp, each reading its
// own row at the same column, hit different banks.
EFFNN_HD int odd(int x) { return x | 1; }

EFFNN_D float dev_exp(float x) { return expf(x); }
EFFNN_D double dev_exp(double x) { return exp(x); }
EFFNN_D float dev_log(float x) { return logf(x); }
EFFNN_D double dev_log(double x) { return log(x); }

// exponential_split(rel, a) + L, clamped to [0, 2L-1], in the arithmetic of the reference (the
// exponent and first mantissa bit of (|rel| + 2a) / a; IEEE division, as nvcc compiles `/` without
// --use_fast_math).
EFFNN_D int exp_row(float rel, float two_a, float a, int L) {
  const float x = (fabsf(rel) + two_a) / a;
  int b = (float_bits(x) >> 22) - 256;
  if (rel < 0) b = ~b;
  return imin(imax(b + L, 0), 2 * L - 1);
}
EFFNN_D int exp_row(double rel, double two_a, double a, int L) {
  const double x = (fabs(rel) + two_a) / a;
  long long b = (double_bits(x) >> 51) - 2048;
  if (rel < 0) b = ~b;
  b += L;
  return static_cast<int>(b < 0 ? 0 : (b > 2 * L - 1 ? 2 * L - 1 : b));
}

// Rows of an (N, h, d) tensor with any point and head strides (the dim stride is 1).
template <typename scalar_t>
struct Rows {
  const scalar_t* p;
  int64_t sn, sh;
  EFFNN_D const scalar_t* at(int64_t row, int hh) const { return p + row * sn + hh * sh; }
};

template <typename scalar_t, typename acc_t>
struct Params {
  Rows<scalar_t> q, k, v;
  const int64_t* order;       // (N,) window order -> the caller's row
  const int64_t* starts;      // (W + 1,) window offsets in window order
  const int64_t* tile_window; // (tiles,) the window of each tile
  const int64_t* tile_first;  // (tiles,) the tile's first point, counted from the window's start
  const int32_t* codes;       // (N, A) in window order
  const float* r32;           // (N,) range in window order, when the coordinates are float32
  const double* r64;          // (N,) the same, when they are float64
  const acc_t *tq, *tk, *tv;  // (h, 3, R, d)
  int h, d, L, R, A, S;       // S: slots per point (0 without tables)
  bool rel, exp;
  acc_t scale;                // multiplies q
  float a32, two_a32;
  double a64, two_a64;
};

// The exponential-split coordinate of window-order point `pos` (float32 values are exact as double).
template <typename P_t>
EFFNN_D double r_at(const P_t& P, int64_t pos) {
  return P.r32 ? static_cast<double>(P.r32[pos]) : P.r64[pos];
}

// The table row of the pair (query at ri, key at rj) on the exponential axis, in r's dtype.
template <typename P_t>
EFFNN_D int pair_exp_row(const P_t& P, double ri, double rj) {
  if (P.r32) return exp_row(static_cast<float>(ri) - static_cast<float>(rj), P.two_a32, P.a32, P.L);
  return exp_row(ri - rj, P.two_a64, P.a64, P.L);
}

// The slots of the pair (query i with codes ci, key j with codes cj) per axis (always 3 with
// tables: 3 linear axes, or 2 and the exponential one): qs in the query's slot tables (indexed by
// the key's code), ks in the key's (indexed by the query's code).
template <typename P_t>
EFFNN_D void pair_slots(const P_t& P, const int32_t* ci, const int32_t* cj, double ri, double rj,
                        int* qs, int* ks) {
  qs[0] = cj[0];
  ks[0] = ci[0];
  qs[1] = P.L + cj[1];
  ks[1] = P.L + ci[1];
  if (P.exp) {
    qs[2] = ks[2] = 2 * P.L + pair_exp_row(P, ri, rj);
  } else {
    qs[2] = 2 * P.L + cj[2];
    ks[2] = 2 * P.L + ci[2];
  }
}

// The row of table T (h, 3, R, d) that slot `slot` of a point with codes c stands for, as a query
// (row = c - m + L - 1) or as a key (row = m - c + L - 1).
template <typename acc_t, typename P_t>
EFFNN_D const acc_t* slot_row(const P_t& P, const acc_t* T, int hh, int slot, const int32_t* c,
                              bool as_query) {
  int axis, row;
  if (slot < P.A * P.L) {
    axis = slot / P.L;
    const int m = slot - axis * P.L;
    row = as_query ? c[axis] - m + P.L - 1 : m - c[axis] + P.L - 1;
  } else {
    axis = 2;
    row = slot - P.A * P.L;
  }
  return T + (static_cast<int64_t>(hh * 3 + axis) * P.R + row) * P.d;
}

// The inverse for the table gradients: the slot of a point with codes c that stands for (axis,
// row), or -1 when the point reaches no pair at that row.
template <typename P_t>
EFFNN_D int row_slot(const P_t& P, int axis, int row, const int32_t* c, bool as_query) {
  if (axis >= P.A) return P.A * P.L + row;  // the exponential axis: every row is a slot
  const int m = as_query ? c[axis] - row + P.L - 1 : row + c[axis] - P.L + 1;
  return (m >= 0 && m < P.L) ? axis * P.L + m : -1;
}

template <typename acc_t>
EFFNN_D acc_t dot(const acc_t* a, const acc_t* b, int d) {
  acc_t s = 0;
  for (int dd = 0; dd < d; ++dd) s += a[dd] * b[dd];
  return s;
}

// Shared memory, carved in a fixed order; the host runs the same carving from address 0 for the size.
struct Carve {
  uintptr_t base;
  size_t off = 0;
  template <typename T>
  EFFNN_HD T* take(int64_t count) {
    off = (off + 15) & ~static_cast<size_t>(15);
    T* p = reinterpret_cast<T*>(base + off);
    off += static_cast<size_t>(count) * sizeof(T);
    return p;
  }
};

// Per-point data of a streamed step of kStep points: rows (kStep, d), codes, coordinates, slots.
template <typename acc_t>
struct StepSmem {
  acc_t *x, *y, *T1, *T2;  // two rows (K, V or Q, dO) and two slot tables per point
  int32_t* c;
  double* r;
  EFFNN_HD void carve(Carve& cv, int d, int S, int A, bool two_tables) {
    x = cv.take<acc_t>(kStep * d);
    y = cv.take<acc_t>(kStep * d);
    T1 = cv.take<acc_t>(kStep * S);
    T2 = cv.take<acc_t>(two_tables ? kStep * S : 0);
    c = cv.take<int32_t>(kStep * A);
    r = cv.take<double>(kStep);
  }
};

// Per-thread rows of the owned points (nt of them): up to three head_dim rows and four slot rows.
template <typename acc_t>
struct OwnSmem {
  acc_t *x[3], *t[4];
  int32_t* c;
  double* r;
  EFFNN_HD void carve(Carve& cv, int nt, int d, int S, int A, int rows, int tables) {
    for (int k = 0; k < 3; ++k) x[k] = cv.take<acc_t>(k < rows ? nt * odd(d) : 0);
    for (int k = 0; k < 4; ++k) t[k] = cv.take<acc_t>(k < tables ? nt * odd(S) : 0);
    c = cv.take<int32_t>(nt * A);
    r = cv.take<double>(nt);
  }
};

// Stage kStep points (window positions pos0 ..) of a head: rows a (scaled by fa) and b, codes,
// coordinates. All threads take part.
template <typename scalar_t, typename acc_t>
EFFNN_D void stage_step(const Params<scalar_t, acc_t>& P, StepSmem<acc_t>& st, int64_t pos0,
                        int count, int hh, const Rows<scalar_t>& a, acc_t fa,
                        const Rows<scalar_t>& b) {
  const int d = P.d, A = P.A;
  for (int e = threadIdx.x; e < count * d; e += blockDim.x) {
    const int j = e / d, dd = e - j * d;
    const int64_t row = P.order[pos0 + j];
    st.x[e] = fa * static_cast<acc_t>(a.at(row, hh)[dd]);
    st.y[e] = static_cast<acc_t>(b.at(row, hh)[dd]);
  }
  if (P.rel) {
    for (int e = threadIdx.x; e < count * A; e += blockDim.x) st.c[e] = P.codes[pos0 * A + e];
  }
  if (P.exp) {
    for (int j = threadIdx.x; j < count; j += blockDim.x) st.r[j] = r_at(P, pos0 + j);
  }
}

// out[i, slot] = x_i . T[row of the slot] for the `count` points of rows x (stride xs) with codes c
// (stride A); as_query picks the row formula. All threads take part.
template <typename acc_t, typename P_t>
EFFNN_D void slot_products(const P_t& P, int hh, const acc_t* T, bool as_query, const acc_t* x,
                           int xs, const int32_t* c, int count, acc_t* out, int os) {
  const int S = P.S;
  for (int e = threadIdx.x; e < count * S; e += blockDim.x) {
    const int i = e / S, slot = e - i * S;
    out[i * os + slot] = dot(x + i * xs, slot_row(P, T, hh, slot, c + i * P.A, as_query), P.d);
  }
}

// The points a block owns: tile blockIdx.x of a window (nt threads, one point each).
struct Tile {
  int64_t s0, n, base;  // window start, window size, window position of the first owned point
  int count;            // owned points (<= blockDim.x)
};
template <typename P_t>
EFFNN_D Tile tile_of(const P_t& P) {
  Tile t;
  const int64_t w = P.tile_window[blockIdx.x];
  t.s0 = P.starts[w];
  t.n = P.starts[w + 1] - t.s0;
  t.base = t.s0 + P.tile_first[blockIdx.x];
  const int64_t left = t.n - P.tile_first[blockIdx.x];
  t.count = static_cast<int>(left < blockDim.x ? left : blockDim.x);
  return t;
}

// Stage the owned points' rows (x[0] = a * fa, x[1] = b when given), codes and coordinates.
template <typename scalar_t, typename acc_t>
EFFNN_D void stage_own(const Params<scalar_t, acc_t>& P, OwnSmem<acc_t>& own, const Tile& t,
                       int hh, const Rows<scalar_t>& a, acc_t fa, const Rows<scalar_t>* b) {
  const int d = P.d, ds = odd(d), A = P.A;
  for (int e = threadIdx.x; e < t.count * d; e += blockDim.x) {
    const int i = e / d, dd = e - i * d;
    const int64_t row = P.order[t.base + i];
    own.x[0][i * ds + dd] = fa * static_cast<acc_t>(a.at(row, hh)[dd]);
    if (b) own.x[1][i * ds + dd] = static_cast<acc_t>(b->at(row, hh)[dd]);
  }
  if (P.rel) {
    for (int e = threadIdx.x; e < t.count * A; e += blockDim.x) own.c[e] = P.codes[t.base * A + e];
  }
  if (P.exp) {
    for (int i = threadIdx.x; i < t.count; i += blockDim.x) own.r[i] = r_at(P, t.base + i);
  }
}

template <typename acc_t>
EFFNN_HD size_t forward_smem(int nt, int d, int S, int A, Carve cv) {
  OwnSmem<acc_t> own;
  own.carve(cv, nt, d, S, A, 2, S ? 2 : 0);  // Q, O; QT, H
  StepSmem<acc_t> st;
  st.carve(cv, d, S, A, false);  // K, V; KT
  cv.take<acc_t>(nt * (kStep + 1));  // scores
  cv.take<acc_t>(nt);                // 1 / row sum
  return cv.off;
}

template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(const Params<scalar_t, acc_t> P, scalar_t* out, acc_t* lse) {
  const int hh = blockIdx.y, i = threadIdx.x, d = P.d, ds = odd(d), S = P.S, ss = odd(S);
  Carve cv{reinterpret_cast<uintptr_t>(block_smem())};
  OwnSmem<acc_t> own;
  own.carve(cv, blockDim.x, d, S, P.A, 2, S ? 2 : 0);
  StepSmem<acc_t> st;
  st.carve(cv, d, S, P.A, false);
  acc_t* sc = cv.take<acc_t>(blockDim.x * (kStep + 1)) + i * (kStep + 1);
  acc_t* inv_l = cv.take<acc_t>(blockDim.x);
  acc_t *Q = own.x[0], *O = own.x[1], *QT = own.t[0], *H = own.t[1];

  const Tile t = tile_of(P);
  const bool active = i < t.count;
  stage_own(P, own, t, hh, P.q, P.scale, static_cast<const Rows<scalar_t>*>(nullptr));
  for (int e = threadIdx.x; e < t.count * d; e += blockDim.x) O[(e / d) * ds + e % d] = 0;
  for (int e = threadIdx.x; e < t.count * S; e += blockDim.x) H[(e / S) * ss + e % S] = 0;
  __syncthreads();
  if (P.rel) slot_products(P, hh, P.tq, true, Q, ds, own.c, t.count, QT, ss);

  acc_t m = -INFINITY, l = 0;  // running max and sum of exp(s - m) of query i
  for (int64_t k0 = 0; k0 < t.n; k0 += kStep) {
    const int nk = static_cast<int>(t.n - k0 < kStep ? t.n - k0 : kStep);
    __syncthreads();  // the previous step's keys are read no more (and QT is complete)
    stage_step(P, st, t.s0 + k0, nk, hh, P.k, acc_t(1), P.v);
    __syncthreads();
    if (P.rel) {
      slot_products(P, hh, P.tk, false, st.x, d, st.c, nk, st.T1, S);
      __syncthreads();
    }
    if (!active) continue;
    const acc_t* qi = Q + i * ds;
    acc_t mt = m;
    for (int j = 0; j < nk; ++j) {
      acc_t s = dot(qi, st.x + j * d, d);
      if (P.rel) {
        int qs[3], ks[3];
        pair_slots(P, own.c + i * P.A, st.c + j * P.A, own.r[i], st.r[j], qs, ks);
        for (int x = 0; x < 3; ++x) s += QT[i * ss + qs[x]] + st.T1[j * S + ks[x]];
      }
      sc[j] = s;
      mt = s > mt ? s : mt;
    }
    const acc_t alpha = dev_exp(m - mt);  // 0 at the first step (m = -inf)
    l *= alpha;
    if (alpha != acc_t(1)) {
      for (int dd = 0; dd < d; ++dd) O[i * ds + dd] *= alpha;
      for (int slot = 0; slot < S; ++slot) H[i * ss + slot] *= alpha;
    }
    for (int j = 0; j < nk; ++j) {
      const acc_t p = dev_exp(sc[j] - mt);
      l += p;
      const acc_t* vj = st.y + j * d;
      for (int dd = 0; dd < d; ++dd) O[i * ds + dd] += p * vj[dd];
      if (P.rel) {
        int qs[3], ks[3];
        pair_slots(P, own.c + i * P.A, st.c + j * P.A, own.r[i], st.r[j], qs, ks);
        for (int x = 0; x < 3; ++x) H[i * ss + qs[x]] += p;
      }
    }
    m = mt;
  }
  if (active) {
    inv_l[i] = acc_t(1) / l;
    lse[P.order[t.base + i] * P.h + hh] = m + dev_log(l);
  }
  __syncthreads();
  // out_i = (O_i + sum_slot H[i, slot] Tv[row]) / l_i, one (query, column) per thread: coalesced.
  for (int e = threadIdx.x; e < t.count * d; e += blockDim.x) {
    const int qi = e / d, dd = e - qi * d;
    acc_t o = O[qi * ds + dd];
    for (int slot = 0; slot < S; ++slot) {
      const acc_t hv = H[qi * ss + slot];
      if (hv != acc_t(0)) o += hv * slot_row(P, P.tv, hh, slot, own.c + qi * P.A, true)[dd];
    }
    out[(P.order[t.base + qi] * P.h + hh) * d + dd] = static_cast<scalar_t>(o * inv_l[qi]);
  }
}

// The backward's extra inputs.
template <typename scalar_t, typename acc_t>
struct Grad {
  Rows<scalar_t> dO;
  const acc_t* lse;  // (N, h), the caller's order
  const acc_t* D;    // (N, h): dO_i . out_i
};

template <typename acc_t>
EFFNN_HD size_t dq_smem(int nt, int d, int S, int A, Carve cv) {
  OwnSmem<acc_t> own;
  own.carve(cv, nt, d, S, A, 3, S ? 4 : 0);  // Q, dO, dQ; QT, GQ, HS, HP
  StepSmem<acc_t> st;
  st.carve(cv, d, S, A, false);  // K, V; KT
  return cv.off;
}

// dq, and the query-side histograms hs (of ds) and hp (of p) per window-order point (N, h, S).
template <typename scalar_t, typename acc_t>
__global__ void dq_kernel(const Params<scalar_t, acc_t> P, const Grad<scalar_t, acc_t> G,
                          scalar_t* dq, acc_t* hs, acc_t* hp) {
  const int hh = blockIdx.y, i = threadIdx.x, d = P.d, ds = odd(d), S = P.S, ss = odd(S);
  Carve cv{reinterpret_cast<uintptr_t>(block_smem())};
  OwnSmem<acc_t> own;
  own.carve(cv, blockDim.x, d, S, P.A, 3, S ? 4 : 0);
  StepSmem<acc_t> st;
  st.carve(cv, d, S, P.A, false);
  acc_t *Q = own.x[0], *dO = own.x[1], *dQ = own.x[2];
  acc_t *QT = own.t[0], *GQ = own.t[1], *HS = own.t[2], *HP = own.t[3];

  const Tile t = tile_of(P);
  const bool active = i < t.count;
  stage_own(P, own, t, hh, P.q, P.scale, &G.dO);
  for (int e = threadIdx.x; e < t.count * d; e += blockDim.x) dQ[(e / d) * ds + e % d] = 0;
  for (int e = threadIdx.x; e < t.count * S; e += blockDim.x) {
    HS[(e / S) * ss + e % S] = 0;
    HP[(e / S) * ss + e % S] = 0;
  }
  __syncthreads();
  if (P.rel) {
    slot_products(P, hh, P.tq, true, Q, ds, own.c, t.count, QT, ss);
    slot_products(P, hh, P.tv, true, dO, ds, own.c, t.count, GQ, ss);
  }
  acc_t lse_i = 0, D_i = 0;
  if (active) {
    const int64_t row = P.order[t.base + i] * P.h + hh;
    lse_i = G.lse[row];
    D_i = G.D[row];
  }
  for (int64_t k0 = 0; k0 < t.n; k0 += kStep) {
    const int nk = static_cast<int>(t.n - k0 < kStep ? t.n - k0 : kStep);
    __syncthreads();
    stage_step(P, st, t.s0 + k0, nk, hh, P.k, acc_t(1), P.v);
    __syncthreads();
    if (P.rel) {
      slot_products(P, hh, P.tk, false, st.x, d, st.c, nk, st.T1, S);
      __syncthreads();
    }
    if (!active) continue;
    const acc_t *qi = Q + i * ds, *gi = dO + i * ds;
    for (int j = 0; j < nk; ++j) {
      const acc_t *kj = st.x + j * d, *vj = st.y + j * d;
      acc_t s = dot(qi, kj, d), dp = dot(gi, vj, d);
      int qs[3], ks[3];
      if (P.rel) {
        pair_slots(P, own.c + i * P.A, st.c + j * P.A, own.r[i], st.r[j], qs, ks);
        for (int x = 0; x < 3; ++x) {
          s += QT[i * ss + qs[x]] + st.T1[j * S + ks[x]];
          dp += GQ[i * ss + qs[x]];
        }
      }
      const acc_t p = dev_exp(s - lse_i), dsij = p * (dp - D_i);
      for (int dd = 0; dd < d; ++dd) dQ[i * ds + dd] += dsij * kj[dd];
      if (P.rel) {
        for (int x = 0; x < 3; ++x) {
          HS[i * ss + qs[x]] += dsij;
          HP[i * ss + qs[x]] += p;
        }
      }
    }
  }
  __syncthreads();
  // dq_i = scale (dQ_i + sum_slot HS[i, slot] Tq[row]); q entered the scores as scale * q
  for (int e = threadIdx.x; e < t.count * d; e += blockDim.x) {
    const int qi = e / d, dd = e - qi * d;
    acc_t g = dQ[qi * ds + dd];
    for (int slot = 0; slot < S; ++slot) {
      const acc_t hv = HS[qi * ss + slot];
      if (hv != acc_t(0)) g += hv * slot_row(P, P.tq, hh, slot, own.c + qi * P.A, true)[dd];
    }
    dq[(P.order[t.base + qi] * P.h + hh) * d + dd] = static_cast<scalar_t>(P.scale * g);
  }
  for (int e = threadIdx.x; e < t.count * S; e += blockDim.x) {
    const int qi = e / S, slot = e - qi * S;
    const int64_t dst = ((t.base + qi) * P.h + hh) * S + slot;
    hs[dst] = HS[qi * ss + slot];
    hp[dst] = HP[qi * ss + slot];
  }
}

template <typename acc_t>
EFFNN_HD size_t dkv_smem(int nt, int d, int S, int A, Carve cv) {
  OwnSmem<acc_t> own;
  own.carve(cv, nt, d, S, A, 3, S ? 2 : 0);  // K, dK, dV (V is read from its step); KT, dKT
  cv.take<acc_t>(nt * odd(d));  // V
  StepSmem<acc_t> st;
  st.carve(cv, d, S, A, true);  // Q, dO; QT, GQ
  cv.take<acc_t>(2 * kStep);    // lse, D of the step's queries
  return cv.off;
}

// dk, dv, and the key-side histogram dkt (of ds) per window-order point (N, h, S).
template <typename scalar_t, typename acc_t>
__global__ void dkv_kernel(const Params<scalar_t, acc_t> P, const Grad<scalar_t, acc_t> G,
                           scalar_t* dk, scalar_t* dv, acc_t* dkt) {
  const int hh = blockIdx.y, j = threadIdx.x, d = P.d, ds = odd(d), S = P.S, ss = odd(S);
  Carve cv{reinterpret_cast<uintptr_t>(block_smem())};
  OwnSmem<acc_t> own;
  own.carve(cv, blockDim.x, d, S, P.A, 3, S ? 2 : 0);
  acc_t* V = cv.take<acc_t>(blockDim.x * ds);
  StepSmem<acc_t> st;
  st.carve(cv, d, S, P.A, true);
  acc_t* lse_s = cv.take<acc_t>(2 * kStep);
  acc_t* D_s = lse_s + kStep;
  acc_t *K = own.x[0], *dK = own.x[1], *dV = own.x[2], *KT = own.t[0], *dKT = own.t[1];

  const Tile t = tile_of(P);
  const bool active = j < t.count;
  stage_own(P, own, t, hh, P.k, acc_t(1), static_cast<const Rows<scalar_t>*>(nullptr));
  for (int e = threadIdx.x; e < t.count * d; e += blockDim.x) {
    const int jj = e / d, dd = e % d;
    V[jj * ds + dd] = static_cast<acc_t>(P.v.at(P.order[t.base + jj], hh)[dd]);
    dK[jj * ds + dd] = 0;
    dV[jj * ds + dd] = 0;
  }
  for (int e = threadIdx.x; e < t.count * S; e += blockDim.x) dKT[(e / S) * ss + e % S] = 0;
  __syncthreads();
  if (P.rel) slot_products(P, hh, P.tk, false, K, ds, own.c, t.count, KT, ss);

  for (int64_t q0 = 0; q0 < t.n; q0 += kStep) {
    const int nq = static_cast<int>(t.n - q0 < kStep ? t.n - q0 : kStep);
    __syncthreads();
    stage_step(P, st, t.s0 + q0, nq, hh, P.q, P.scale, G.dO);
    for (int x = threadIdx.x; x < nq; x += blockDim.x) {
      const int64_t row = P.order[t.s0 + q0 + x] * P.h + hh;
      lse_s[x] = G.lse[row];
      D_s[x] = G.D[row];
    }
    __syncthreads();
    if (P.rel) {
      slot_products(P, hh, P.tq, true, st.x, d, st.c, nq, st.T1, S);
      slot_products(P, hh, P.tv, true, st.y, d, st.c, nq, st.T2, S);
      __syncthreads();
    }
    if (!active) continue;
    const acc_t *kj = K + j * ds, *vj = V + j * ds;
    for (int i = 0; i < nq; ++i) {
      const acc_t *qi = st.x + i * d, *gi = st.y + i * d;
      acc_t s = dot(qi, kj, d), dp = dot(gi, vj, d);
      int qs[3], ks[3];
      if (P.rel) {
        pair_slots(P, st.c + i * P.A, own.c + j * P.A, st.r[i], own.r[j], qs, ks);
        for (int x = 0; x < 3; ++x) {
          s += st.T1[i * S + qs[x]] + KT[j * ss + ks[x]];
          dp += st.T2[i * S + qs[x]];
        }
      }
      const acc_t p = dev_exp(s - lse_s[i]), dsij = p * (dp - D_s[i]);
      for (int dd = 0; dd < d; ++dd) {
        dV[j * ds + dd] += p * gi[dd];
        dK[j * ds + dd] += dsij * qi[dd];  // qi is scale * q_i
      }
      if (P.rel) {
        for (int x = 0; x < 3; ++x) dKT[j * ss + ks[x]] += dsij;
      }
    }
  }
  __syncthreads();
  // dk_j = dK_j + sum_slot dKT[j, slot] Tk[row] (the key term is not scaled)
  for (int e = threadIdx.x; e < t.count * d; e += blockDim.x) {
    const int jj = e / d, dd = e - jj * d;
    acc_t g = dK[jj * ds + dd];
    for (int slot = 0; slot < S; ++slot) {
      const acc_t hv = dKT[jj * ss + slot];
      if (hv != acc_t(0)) g += hv * slot_row(P, P.tk, hh, slot, own.c + jj * P.A, false)[dd];
    }
    const int64_t dst = (P.order[t.base + jj] * P.h + hh) * d + dd;
    dk[dst] = static_cast<scalar_t>(g);
    dv[dst] = static_cast<scalar_t>(dV[jj * ds + dd]);
  }
  for (int e = threadIdx.x; e < t.count * S; e += blockDim.x) {
    const int jj = e / S, slot = e - jj * S;
    dkt[((t.base + jj) * P.h + hh) * S + slot] = dKT[jj * ss + slot];
  }
}

template <typename acc_t>
EFFNN_HD size_t table_grad_smem(int R, int S, int A, Carve cv) {
  cv.take<acc_t>(3 * R * kGradCols);       // this block's sums
  cv.take<acc_t>(kGradStage * S);          // staged histograms
  cv.take<acc_t>(kGradStage * kGradCols);  // staged rows
  cv.take<int32_t>(kGradStage * A);        // staged codes
  return cv.off;
}

// partial[chunk, h, 3, R, d] = sum over the chunk's points i (window positions
// [chunk * kGradPoints, ...)) of hist[i, h, slot] * f x_i for the slot standing for each row.
// Grid (chunks, h, column blocks of kGradCols). Each thread owns fixed entries of the block's sums
// and adds the points in order: deterministic.
template <typename scalar_t, typename acc_t>
__global__ void table_grad_kernel(const Params<scalar_t, acc_t> P, int64_t N, const acc_t* hist,
                                  const Rows<scalar_t> x, acc_t f, bool as_query, acc_t* partial) {
  const int hh = blockIdx.y, R = P.R, S = P.S, A = P.A;
  const int d0 = blockIdx.z * kGradCols, nc = imin(kGradCols, P.d - d0);
  Carve cv{reinterpret_cast<uintptr_t>(block_smem())};
  acc_t* acc = cv.take<acc_t>(3 * R * kGradCols);
  acc_t* hs = cv.take<acc_t>(kGradStage * S);
  acc_t* xs = cv.take<acc_t>(kGradStage * kGradCols);
  int32_t* cs = cv.take<int32_t>(kGradStage * A);
  const int entries = 3 * R * nc;
  for (int e = threadIdx.x; e < entries; e += blockDim.x) acc[e] = 0;
  const int64_t p_begin = blockIdx.x * kGradPoints;
  const int64_t p_end = p_begin + kGradPoints < N ? p_begin + kGradPoints : N;
  for (int64_t p0 = p_begin; p0 < p_end; p0 += kGradStage) {
    const int np = static_cast<int>(p_end - p0 < kGradStage ? p_end - p0 : kGradStage);
    __syncthreads();  // the previous stage is read no more
    for (int e = threadIdx.x; e < np * S; e += blockDim.x) {
      const int p = e / S;
      hs[e] = hist[((p0 + p) * P.h + hh) * S + (e - p * S)];
    }
    for (int e = threadIdx.x; e < np * nc; e += blockDim.x) {
      const int p = e / nc, dd = e - p * nc;
      xs[e] = f * static_cast<acc_t>(x.at(P.order[p0 + p], hh)[d0 + dd]);
    }
    for (int e = threadIdx.x; e < np * A; e += blockDim.x) cs[e] = P.codes[p0 * A + e];
    __syncthreads();
    for (int e = threadIdx.x; e < entries; e += blockDim.x) {
      const int axis = e / (R * nc), row = (e / nc) % R, dd = e % nc;
      acc_t a = acc[e];
      for (int p = 0; p < np; ++p) {
        const int slot = row_slot(P, axis, row, cs + p * A, as_query);
        if (slot >= 0) a += hs[p * S + slot] * xs[p * nc + dd];
      }
      acc[e] = a;
    }
  }
  acc_t* dst = partial + (blockIdx.x * static_cast<int64_t>(P.h) + hh) * 3 * R * P.d;
  for (int e = threadIdx.x; e < entries; e += blockDim.x) {
    const int axis = e / (R * nc), row = (e / nc) % R, dd = e % nc;
    dst[(axis * R + row) * P.d + d0 + dd] = acc[e];
  }
}

// out[e] = sum over chunks c, in order, of partial[c, e].
template <typename acc_t>
__global__ void sum_chunks_kernel(const acc_t* partial, int64_t chunks, int64_t size, acc_t* out) {
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (e >= size) return;
  acc_t s = 0;
  for (int64_t c = 0; c < chunks; ++c) s += partial[c * size + e];
  out[e] = s;
}

// ------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------

#ifndef EFFNN_CUDA_EMULATE
constexpr c10::DeviceType kDevice = c10::DeviceType::CUDA;

// The most dynamic shared memory a block may opt in to on the current device.
size_t max_smem() {
  int device = 0, bytes = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return static_cast<size_t>(bytes);
}

template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, int threads, size_t smem, Args&&... args) {
  if (grid.x == 0) return;
  if (smem > 48 * 1024) {  // above the default limit a kernel must opt in
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }
  kernel<<<grid, threads, smem, c10::cuda::getCurrentCUDAStream()>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

using DeviceGuard = c10::cuda::CUDAGuard;
#endif

struct Inputs {
  at::Tensor q, k, v, order, starts, codes, r, tq, tk, tv;
  int64_t N = 0, W = 0, L = 0, R = 0, A = 0, S = 0;
  bool rel = false, exp = false;
  double scale = 1, a = 0;
};

at::Tensor inner_contiguous(const at::Tensor& t) {
  return t.stride(-1) == 1 ? t : t.contiguous();
}

Inputs check_inputs(const char* fn, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& order, const at::Tensor& starts, const at::Tensor& codes,
                    const at::Tensor& r, const c10::optional<at::Tensor>& table_q,
                    const c10::optional<at::Tensor>& table_k,
                    const c10::optional<at::Tensor>& table_v, int64_t L,
                    c10::optional<double> exp_split_a, double scale) {
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, fn,
              ": q, k, v must be float32, float64, float16 or bfloat16, got ", dt);
  const c10::Device dev = q.device();
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->device().type() == kDevice && t->device() == dev, fn,
                ": q, k, v must be CUDA tensors on one device, got ", dev, " and ", t->device());
    TORCH_CHECK(t->scalar_type() == dt, fn, ": q, k, v must share one dtype, got ", dt, " and ",
                t->scalar_type());
    TORCH_CHECK(t->dim() == 3 && t->sizes() == q.sizes(), fn,
                ": q, k, v must be (N, heads, head_dim) of one shape, got ", q.sizes(), " and ",
                t->sizes());
  }
  Inputs in;
  in.N = q.size(0);
  const int64_t h = q.size(1), d = q.size(2);
  TORCH_CHECK(h >= 1 && h <= 65535 && d >= 1 && d <= (1 << 20), fn,
              ": heads must be in [1, 65535] and head_dim in [1, 2^20], got ", h, " and ", d);
  TORCH_CHECK(starts.dim() == 1 && starts.size(0) >= 1 && starts.scalar_type() == at::kLong &&
                  starts.device() == dev,
              fn, ": starts must be a 1-D int64 tensor of W + 1 window offsets on ", dev, ", got ",
              starts.sizes(), " ", starts.scalar_type(), " on ", starts.device());
  TORCH_CHECK(order.dim() == 1 && order.size(0) == in.N && order.scalar_type() == at::kLong &&
                  order.device() == dev,
              fn, ": order must be an int64 (N,) = (", in.N, ",) permutation on ", dev, ", got ",
              order.sizes(), " ", order.scalar_type(), " on ", order.device());
  in.q = inner_contiguous(q);
  in.k = inner_contiguous(k);
  in.v = inner_contiguous(v);
  in.order = order.contiguous();
  in.starts = starts.contiguous();
  in.W = starts.size(0) - 1;
  in.scale = scale;
  in.rel = table_q.has_value() && table_q->defined();
  if (!in.rel) return in;
  TORCH_CHECK(table_k.has_value() && table_k->defined() && table_v.has_value() &&
                  table_v->defined(),
              fn, ": give all three tables or none");
  in.exp = exp_split_a.has_value();
  TORCH_CHECK(L >= 1 && L <= 4096, fn, ": L must be in [1, 4096], got ", L);
  in.L = L;
  in.R = in.exp ? 2 * L : 2 * L - 1;
  in.A = in.exp ? 2 : 3;
  in.S = in.exp ? 4 * L : 3 * L;
  // the sums run in at::opmath_type (float32 for half inputs): the tables are kept in that dtype
  const auto acc = at::toOpMathType(dt);
  for (const at::Tensor* t : {&*table_q, &*table_k, &*table_v}) {
    TORCH_CHECK(t->scalar_type() == acc && t->device() == dev, fn, ": tables must be ", acc,
                " tensors (q's dtype, float32 for half q) on ", dev, ", got ", t->scalar_type(),
                " on ", t->device());
    TORCH_CHECK(t->dim() == 4 && t->size(0) == h && t->size(1) == 3 && t->size(2) == in.R &&
                    t->size(3) == d,
                fn, ": tables must be (heads, 3, rows, head_dim) = (", h, ", 3, ", in.R, ", ", d,
                "), got ", t->sizes());
  }
  in.tq = table_q->contiguous();
  in.tk = table_k->contiguous();
  in.tv = table_v->contiguous();
  TORCH_CHECK(codes.dim() == 2 && codes.size(0) == in.N && codes.size(1) == in.A &&
                  codes.scalar_type() == at::kInt && codes.device() == dev,
              fn, ": codes must be int32 (N, ", in.A, ") = (", in.N, ", ", in.A, ") on ", dev,
              ", got ", codes.sizes(), " ", codes.scalar_type(), " on ", codes.device());
  in.codes = codes.contiguous();
  if (in.exp) {
    TORCH_CHECK(std::isfinite(*exp_split_a) && *exp_split_a > 0, fn,
                ": exp_split_a must be positive, got ", *exp_split_a);
    TORCH_CHECK(r.dim() == 1 && r.size(0) == in.N &&
                    (r.scalar_type() == at::kFloat || r.scalar_type() == at::kDouble) &&
                    r.device() == dev,
                fn, ": r must be a float32/float64 (N,) = (", in.N, ",) tensor on ", dev,
                ", got ", r.sizes(), " ", r.scalar_type(), " on ", r.device());
    in.r = r.contiguous();
    in.a = *exp_split_a;
  }
  return in;
}

// The checks of the values (window offsets, the permutation, the codes) as the CPU file does them,
// computed on the device and copied to the host at once; also returns the number of tiles of each
// size in `tile_sizes`.
std::vector<int64_t> check_values(const char* fn, const Inputs& in,
                                  std::initializer_list<int> tile_sizes) {
  const int64_t N = in.N, W = in.W;
  const at::Tensor counts = in.starts.slice(0, 1) - in.starts.slice(0, 0, W);
  std::vector<at::Tensor> v = {in.starts[0], in.starts[W]};
  v.push_back(W > 0 ? counts.min() : in.starts[0] * 0);
  if (N > 0) {
    // a permutation: every row read and written exactly once (the kernels' writes are unsynchronised)
    const at::Tensor hits = at::zeros({N}, in.order.options())
                                .index_add_(0, in.order.clamp(0, N - 1), at::ones_like(in.order));
    v.insert(v.end(), {in.order.min(), in.order.max(), hits.min(), hits.max()});
    if (in.rel) v.insert(v.end(), {in.codes.min().to(at::kLong), in.codes.max().to(at::kLong)});
  }
  for (int nt : tile_sizes) {
    v.push_back(W > 0 ? at::div(counts + (nt - 1), nt, "floor").sum() : in.starts[0] * 0);
  }
  const at::Tensor host = at::stack(v).cpu();
  const int64_t* s = host.data_ptr<int64_t>();
  TORCH_CHECK(s[0] == 0 && s[1] == N, fn, ": starts must run from 0 to N = ", N, ", got ", s[0],
              " .. ", s[1]);
  TORCH_CHECK(s[2] >= 0, fn, ": starts must be non-decreasing, got a step of ", s[2]);
  size_t at_ = 3;
  if (N > 0) {
    TORCH_CHECK(s[3] >= 0 && s[4] < N && s[5] == 1 && s[6] == 1, fn,
                ": order must be a permutation of 0..N-1, got values in [", s[3], ", ", s[4],
                "] with some row ", s[6] > 1 ? "repeated" : "missing");
    at_ = 7;
    if (in.rel) {
      TORCH_CHECK(s[7] >= 0 && s[8] < in.L, fn, ": codes must be in [0, L-1] = [0, ", in.L - 1,
                  "], got values in [", s[7], ", ", s[8], "]");
      at_ = 9;
    }
  }
  std::vector<int64_t> tiles(s + at_, s + at_ + tile_sizes.size());
  for (int64_t n : tiles) {
    TORCH_CHECK(n < (int64_t(1) << 31), fn, ": too many windows for one launch (", n, " tiles)");
  }
  return tiles;
}

// (tile_window, tile_first) of `tiles` tiles of nt points (see Tile).
std::pair<at::Tensor, at::Tensor> make_tiles(const Inputs& in, int nt, int64_t tiles) {
  const at::Tensor counts = in.starts.slice(0, 1) - in.starts.slice(0, 0, in.W);
  const at::Tensor per = at::div(counts + (nt - 1), nt, "floor");
  // the window index repeated per[w] times (the overload without `self`)
  const at::Tensor window = at::repeat_interleave(per, std::optional<int64_t>(tiles));
  const at::Tensor first_tile = at::cumsum(per, 0) - per;
  const at::Tensor first =
      (at::arange(tiles, in.starts.options()) - first_tile.index_select(0, window)) * nt;
  return {window, first};
}

// The largest block (64, 32 or 16 threads) whose shared memory fits, preferring at most a third of
// the device's so that several blocks share a multiprocessor.
template <typename F>
int pick_threads(const char* fn, F smem_of) {
  const size_t limit = max_smem();
  for (int nt : {64, 32, 16}) {
    if (smem_of(nt) <= limit / 3) return nt;
  }
  TORCH_CHECK(smem_of(16) <= limit, fn, ": head_dim and L need ", smem_of(16),
              " bytes of shared memory per block, the device has ", limit,
              " (use backend=\"ref\" or \"triton\")");
  return 16;
}

template <typename scalar_t>
Rows<scalar_t> rows_of(const at::Tensor& t) {
  return {t.data_ptr<scalar_t>(), t.stride(0), t.stride(1)};
}

template <typename scalar_t, typename acc_t>
Params<scalar_t, acc_t> make_params(const Inputs& in) {
  Params<scalar_t, acc_t> P{};
  P.q = rows_of<scalar_t>(in.q);
  P.k = rows_of<scalar_t>(in.k);
  P.v = rows_of<scalar_t>(in.v);
  P.order = in.order.data_ptr<int64_t>();
  P.starts = in.starts.data_ptr<int64_t>();
  P.h = static_cast<int>(in.q.size(1));
  P.d = static_cast<int>(in.q.size(2));
  P.rel = in.rel;
  P.exp = in.exp;
  P.L = static_cast<int>(in.L);
  P.R = static_cast<int>(in.R);
  P.A = static_cast<int>(in.A);
  P.S = static_cast<int>(in.S);
  P.scale = static_cast<acc_t>(in.scale);
  if (in.rel) {
    P.codes = in.codes.data_ptr<int32_t>();
    P.tq = in.tq.data_ptr<acc_t>();
    P.tk = in.tk.data_ptr<acc_t>();
    P.tv = in.tv.data_ptr<acc_t>();
  }
  if (in.exp) {
    if (in.r.scalar_type() == at::kFloat) {
      P.r32 = in.r.data_ptr<float>();
    } else {
      P.r64 = in.r.data_ptr<double>();
    }
    // as the reference: 2a and a rounded to the coordinates' dtype
    P.a32 = static_cast<float>(in.a);
    P.two_a32 = static_cast<float>(2 * in.a);
    P.a64 = in.a;
    P.two_a64 = 2 * in.a;
  }
  return P;
}

size_t smem_size(size_t (*carve)(int, int, int, int, Carve), int nt, const Inputs& in, int d) {
  return carve(nt, d, static_cast<int>(in.S), static_cast<int>(in.A), Carve{0});
}

std::tuple<at::Tensor, at::Tensor> window_attention_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& order,
    const at::Tensor& starts, const at::Tensor& codes, const at::Tensor& r,
    const c10::optional<at::Tensor>& table_q, const c10::optional<at::Tensor>& table_k,
    const c10::optional<at::Tensor>& table_v, int64_t L, c10::optional<double> exp_split_a,
    double scale) {
  const char* fn = "window_attention_forward";
  at::NoGradGuard no_grad;
  DeviceGuard guard(q.device());
  const Inputs in = check_inputs(fn, q, k, v, order, starts, codes, r, table_q, table_k, table_v, L,
                                 exp_split_a, scale);
  const auto acc_dtype = at::toOpMathType(q.scalar_type());
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1)}, q.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "window_attention", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int d = static_cast<int>(q.size(2));
    const int nt = pick_threads(fn, [&](int n) { return smem_size(forward_smem<acc_t>, n, in, d); });
    const int64_t tiles = check_values(fn, in, {nt})[0];
    if (tiles == 0) return;
    const auto [tile_window, tile_first] = make_tiles(in, nt, tiles);
    Params<scalar_t, acc_t> P = make_params<scalar_t, acc_t>(in);
    P.tile_window = tile_window.data_ptr<int64_t>();
    P.tile_first = tile_first.data_ptr<int64_t>();
    launch(forward_kernel<scalar_t, acc_t>, dim3(tiles, P.h), nt,
           smem_size(forward_smem<acc_t>, nt, in, d), P, out.data_ptr<scalar_t>(),
           lse.data_ptr<acc_t>());
  });
  return {out, lse};
}

// d table (h, 3, R, d) from the per-point histograms hist (N, h, S) and rows x (scaled by f).
template <typename scalar_t, typename acc_t>
at::Tensor table_grad(const Params<scalar_t, acc_t>& P, const Inputs& in, const at::Tensor& hist,
                      const Rows<scalar_t>& x, acc_t f, bool as_query) {
  const int64_t chunks = (in.N + kGradPoints - 1) / kGradPoints;
  const auto opts = hist.options();
  at::Tensor partial = at::empty({chunks, P.h, 3, P.R, P.d}, opts);
  const size_t smem = table_grad_smem<acc_t>(P.R, P.S, P.A, Carve{0});
  TORCH_CHECK(smem <= max_smem(), "window_attention_backward: L = ", in.L,
              " needs too much shared memory for the table gradients");
  launch(table_grad_kernel<scalar_t, acc_t>,
         dim3(chunks, P.h, (P.d + kGradCols - 1) / kGradCols), kGradThreads, smem, P, in.N,
         hist.data_ptr<acc_t>(), x, f, as_query, partial.data_ptr<acc_t>());
  at::Tensor out = at::empty({P.h, 3, P.R, P.d}, opts);
  const int64_t size = out.numel();
  launch(sum_chunks_kernel<acc_t>, dim3((size + 255) / 256), 256, 0,
         static_cast<const acc_t*>(partial.data_ptr<acc_t>()), chunks, size, out.data_ptr<acc_t>());
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
window_attention_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                          const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                          const at::Tensor& order, const at::Tensor& starts,
                          const at::Tensor& codes, const at::Tensor& r,
                          const c10::optional<at::Tensor>& table_q,
                          const c10::optional<at::Tensor>& table_k,
                          const c10::optional<at::Tensor>& table_v, int64_t L,
                          c10::optional<double> exp_split_a, double scale) {
  const char* fn = "window_attention_backward";
  at::NoGradGuard no_grad;
  DeviceGuard guard(q.device());
  const Inputs in = check_inputs(fn, q, k, v, order, starts, codes, r, table_q, table_k, table_v,
                                 L, exp_split_a, scale);
  const auto acc_dtype = at::toOpMathType(q.scalar_type());
  for (const at::Tensor* t : {&grad_out, &out}) {
    TORCH_CHECK(t->sizes() == q.sizes() && t->scalar_type() == q.scalar_type() &&
                    t->device() == q.device(),
                fn, ": grad_out and out must be tensors of q's shape, dtype and device, got ",
                t->sizes(), " ", t->scalar_type(), " on ", t->device());
  }
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) &&
                  lse.scalar_type() == acc_dtype && lse.device() == q.device(),
              fn, ": lse must be (N, heads) of dtype ", acc_dtype, " on ", q.device(), ", got ",
              lse.sizes(), " ", lse.scalar_type(), " on ", lse.device());
  const at::Tensor g = inner_contiguous(grad_out), l = lse.contiguous();
  // D_i = dO_i . out_i (= sum_j p_ij dp_ij), per query and head
  const at::Tensor D = (g.to(acc_dtype) * out.to(acc_dtype)).sum(-1).contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(q.sizes(), q.options());
  at::Tensor dv = at::empty(q.sizes(), q.options());
  at::Tensor dtq = q.new_empty({0}), dtk = q.new_empty({0}), dtv = q.new_empty({0});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "window_attention", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int d = static_cast<int>(q.size(2));
    const int nt_q = pick_threads(fn, [&](int n) { return smem_size(dq_smem<acc_t>, n, in, d); });
    const int nt_k = pick_threads(fn, [&](int n) { return smem_size(dkv_smem<acc_t>, n, in, d); });
    const auto tiles = check_values(fn, in, {nt_q, nt_k});
    if (in.N == 0) {
      dq.zero_();
      dk.zero_();
      dv.zero_();
      if (in.rel) {
        dtq = at::zeros_like(in.tq);
        dtk = at::zeros_like(in.tq);
        dtv = at::zeros_like(in.tq);
      }
      return;
    }
    Params<scalar_t, acc_t> P = make_params<scalar_t, acc_t>(in);
    const Grad<scalar_t, acc_t> G{rows_of<scalar_t>(g), l.data_ptr<acc_t>(), D.data_ptr<acc_t>()};
    // per-point histograms for the table gradients (N, h, S), in window order
    const auto hist_opts = q.options().dtype(acc_dtype);
    const int64_t hist_n = in.rel ? in.N : 0;
    at::Tensor hs = at::empty({hist_n, P.h, P.S}, hist_opts);
    at::Tensor hp = at::empty({hist_n, P.h, P.S}, hist_opts);
    at::Tensor dkt = at::empty({hist_n, P.h, P.S}, hist_opts);
    {
      const auto [tile_window, tile_first] = make_tiles(in, nt_q, tiles[0]);
      P.tile_window = tile_window.data_ptr<int64_t>();
      P.tile_first = tile_first.data_ptr<int64_t>();
      launch(dq_kernel<scalar_t, acc_t>, dim3(tiles[0], P.h), nt_q,
             smem_size(dq_smem<acc_t>, nt_q, in, d), P, G, dq.data_ptr<scalar_t>(),
             hs.data_ptr<acc_t>(), hp.data_ptr<acc_t>());
    }
    {
      const auto [tile_window, tile_first] = make_tiles(in, nt_k, tiles[1]);
      P.tile_window = tile_window.data_ptr<int64_t>();
      P.tile_first = tile_first.data_ptr<int64_t>();
      launch(dkv_kernel<scalar_t, acc_t>, dim3(tiles[1], P.h), nt_k,
             smem_size(dkv_smem<acc_t>, nt_k, in, d), P, G, dk.data_ptr<scalar_t>(),
             dv.data_ptr<scalar_t>(), dkt.data_ptr<acc_t>());
    }
    if (in.rel) {
      dtq = table_grad(P, in, hs, P.q, P.scale, true);   // ds (scale q_i)
      dtv = table_grad(P, in, hp, G.dO, acc_t(1), true);  // p dO_i
      dtk = table_grad(P, in, dkt, P.k, acc_t(1), false); // ds k_j
    }
  });
  return {dq, dk, dv, dtq, dtk, dtv};
}

}  // namespace

#ifndef EFFNN_CUDA_EMULATE
TORCH_LIBRARY_IMPL(effnn_ext, CUDA, m) {
  m.impl("window_attention_forward", &window_attention_forward);
  m.impl("window_attention_backward", &window_attention_backward);
}
#endif
