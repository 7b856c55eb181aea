// effnn._C: fused window attention with sptr's contextual relative position encoding (SphereFormer's
// radial windows and cubic windows), forward and backward, for CPU tensors.
//
// Semantics (the specification is window_attention_ref in effnn/ops/radial_window.py). The caller
// partitions the points into windows (window_partition) and passes `order`, its rows sorted by
// window; window w holds the points order[starts[w] : starts[w+1]]. q, k, v are read in place
// through `order` (strided views of a fused qkv projection need no copy) and the outputs are
// written in the caller's order. For each head, with q multiplied by `scale`:
//   s[i, j]  = q_i . k_j + sum_a Pq[i, a, idx_a(i, j)] + Pk[j, a, idx_a(i, j)]
//   Pq[i, a, r] = q_i . Tq[h, a, r],  Pk[j, a, r] = k_j . Tk[h, a, r]
//   p[i, :]  = softmax_j s[i, :],  lse_i = log sum_j exp s[i, j]
//   out_i    = sum_j p[i, j] v_j + sum_{a, r} H[i, a, r] Tv[h, a, r],  H[i, a, r] = sum_{j: idx_a(i,j) = r} p[i, j]
// with the table row per axis
//   linear axes:          idx_a(i, j) = c[i, a] - c[j, a] + L - 1           (codes c in [0, L-1])
//   exponential split:    idx_2(i, j) = clamp(split(r_i - r_j) + L, 0, 2L-1)
// where split is effnn.ops.radial_window.exponential_split, evaluated in the dtype of r exactly as
// the reference does (the exponent and first mantissa bit of (|rel| + 2a) / a).
//
// How: windows are independent. Per window and head, the table products Pq, Pk (forward) and G =
// dO . Tv (backward) are computed per point over only the rows that the window can reach (a
// contiguous range per point and axis, from the window's minimum and maximum code / range: idx is
// monotone in both points), the scores of a block of at most kBlock queries against all keys of
// the window are formed in a small buffer, and the table terms are gathered (scores) or
// histogrammed (value term, gradients) per pair; table rows that no pair of the window uses are
// skipped. The small products (p @ V, the table rows) accumulate kV outputs at a time in
// registers. The backward recomputes p from the saved lse.
// dq, dk, dv of a window are sums over that window only, so each window writes its own rows: no
// atomics. The table gradients are accumulated per part of the windows (one part per thread,
// contiguous windows of about equal cost) and summed in part order at the end: deterministic for a
// given number of threads.
//
// dtypes: float32 and float64 (the Python wrapper computes fp16/bf16 inputs in float32, as the
// reference does). The hot loops are compiled twice, for the baseline x86-64 and for AVX2+FMA,
// and picked at run time (the package must run on any x86-64); EFFNN_EXT_BASELINE_ISA=1 forces
// the baseline build (for its tests).
//
// Registered as torch ops effnn_ext::window_attention_forward / window_attention_backward (the
// Monarch functions of this extension are pybind functions in monarch_cpu.cpp; one extension
// module can have only one pybind module, so this file registers through the dispatcher instead).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kBlock = 64;  // queries per score block: the block's buffers stay in L1/L2
// Register block of the small products: kV consecutive outputs are accumulated in registers (one
// AVX2 vector of floats). Loops over them may read up to kV - 1 values past a row's end and write
// up to kV - 1 values past a per-point table row, so every buffer and table the kernel reads that
// way has kV values of padding (pad()).
constexpr int64_t kV = 8;

#if defined(__GNUC__)
#define EFFNN_INLINE inline __attribute__((always_inline))
#else
#define EFFNN_INLINE inline
#endif

// Rows of an (N, h, d) tensor with any point and head strides (the dim stride must be 1): the
// q, k, v views of a fused qkv projection are read in place.
template <typename T>
struct Rows {
  const T* p;
  int64_t sn, sh;
};

template <typename T>
struct Problem {
  int64_t N, h, d, W, L, R, A;  // A: linear axes (3 cubic, 2 radial); R: table rows
  bool rel, exp;
  Rows<T> q, k, v;              // (N, h, d) in the caller's order
  T scale;                      // multiplies q
  const int64_t* order;         // (N,) window order -> the caller's row
  const int64_t* starts;        // (W + 1) window offsets in window order
  const int32_t* codes;         // (N, A) in window order
  const float* r32;             // (N,) range in window order, when the coordinates are float32
  const double* r64;            // (N,) the same, when they are float64
  double a;                     // first bin of the exponential split
  const T *tq, *tk, *tv;        // (h, 3, R, d)
  const T *tqT, *tkT, *tvT;     // (h, 3, d, R)
};

// exponential_split(rel, a) + L, clamped to [0, 2L-1], in the arithmetic of the reference.
EFFNN_INLINE int32_t exp_row(float rel, float two_a, float a, int32_t L) {
  float x = (std::fabs(rel) + two_a) / a;
  int32_t bits;
  std::memcpy(&bits, &x, 4);
  int32_t b = (bits >> 22) - 256;
  if (rel < 0) b = ~b;
  return std::min(std::max(b + L, 0), 2 * L - 1);
}
EFFNN_INLINE int32_t exp_row(double rel, double two_a, double a, int32_t L) {
  double x = (std::fabs(rel) + two_a) / a;
  int64_t bits;
  std::memcpy(&bits, &x, 8);
  int64_t b = (bits >> 51) - 2048;
  if (rel < 0) b = ~b;
  return static_cast<int32_t>(std::min<int64_t>(std::max<int64_t>(b + L, 0), 2 * L - 1));
}

// Per-thread buffers, grown on demand.
template <typename T>
struct Work {
  std::vector<T> Q, K, V, dO, Kt, Vt, Pq, Pk, G, S, dP, hist, dK, dV, dq, dPk;
  std::vector<int32_t> idx, lo, hi, klo, khi;
};

template <typename T>
EFFNN_INLINE void grow(std::vector<T>& v, size_t n) {
  if (v.size() < n + kV) v.resize(n + kV);  // + the padding of the register blocks
}

// y[0:d] += sum_k w[k * ws] * x[k * xs : k * xs + d], accumulated in registers kV columns at a
// time (x must have kV values of padding past its last row).
template <typename T>
EFFNN_INLINE void acc_rows(T* y, int64_t d, const T* w, int64_t wstride, const T* x, int64_t xs,
                           int64_t count) {
  for (int64_t d0 = 0; d0 < d; d0 += kV) {
    T acc[kV] = {};
    for (int64_t k = 0; k < count; ++k) {
      const T wk = w[k * wstride];
      const T* xk = x + k * xs + d0;
      for (int64_t e = 0; e < kV; ++e) acc[e] += wk * xk[e];
    }
    const int64_t m = std::min(kV, d - d0);
    for (int64_t e = 0; e < m; ++e) y[d0 + e] += acc[e];
  }
}

// The per-point table row ranges [lo, hi] (as a query) and [klo, khi] (as a key) of each axis in
// the window: linear axes from the window's minimum and maximum code; on the exponential axis
// [idx(r_i - rmax), idx(r_i - rmin)] and [idx(rmin - r_j), idx(rmax - r_j)], since idx is
// monotone in r_i - r_j (and the rounded difference is monotone in each operand).
template <typename T>
EFFNN_INLINE void window_ranges(const Problem<T>& P, int64_t s0, int64_t n, Work<T>& ws) {
  const int32_t L = static_cast<int32_t>(P.L);
  grow(ws.lo, n * 3);
  grow(ws.hi, n * 3);
  grow(ws.klo, n * 3);
  grow(ws.khi, n * 3);
  for (int64_t ax = 0; ax < P.A; ++ax) {
    int32_t cmin = std::numeric_limits<int32_t>::max(), cmax = std::numeric_limits<int32_t>::min();
    for (int64_t i = 0; i < n; ++i) {
      const int32_t c = P.codes[(s0 + i) * P.A + ax];
      cmin = std::min(cmin, c);
      cmax = std::max(cmax, c);
    }
    for (int64_t i = 0; i < n; ++i) {
      const int32_t c = P.codes[(s0 + i) * P.A + ax];
      ws.lo[i * 3 + ax] = c - cmax + L - 1;
      ws.hi[i * 3 + ax] = c - cmin + L - 1;
      ws.klo[i * 3 + ax] = cmin - c + L - 1;
      ws.khi[i * 3 + ax] = cmax - c + L - 1;
    }
  }
  if (P.exp) {
    auto fill = [&](auto r, auto two_a, auto a) {
      auto rmin = r[s0], rmax = r[s0];
      for (int64_t i = 1; i < n; ++i) {
        rmin = std::min(rmin, r[s0 + i]);
        rmax = std::max(rmax, r[s0 + i]);
      }
      for (int64_t i = 0; i < n; ++i) {
        const auto ri = r[s0 + i];
        ws.lo[i * 3 + 2] = exp_row(ri - rmax, two_a, a, L);
        ws.hi[i * 3 + 2] = exp_row(ri - rmin, two_a, a, L);
        ws.klo[i * 3 + 2] = exp_row(rmin - ri, two_a, a, L);
        ws.khi[i * 3 + 2] = exp_row(rmax - ri, two_a, a, L);
      }
    };
    if (P.r32) {
      fill(P.r32, static_cast<float>(2 * P.a), static_cast<float>(P.a));
    } else {
      fill(P.r64, 2 * P.a, P.a);
    }
  }
}

// idx[ax][ib * n + j]: the row (in the 3R layout: ax * R + row) of query b0 + ib and key j.
template <typename T>
EFFNN_INLINE void block_rows(const Problem<T>& P, int64_t s0, int64_t n, int64_t b0, int64_t nb,
                             Work<T>& ws) {
  const int32_t L = static_cast<int32_t>(P.L), R = static_cast<int32_t>(P.R);
  grow(ws.idx, 3 * kBlock * n);
  for (int64_t ax = 0; ax < P.A; ++ax) {
    int32_t* out = ws.idx.data() + ax * kBlock * n;
    const int32_t* c = P.codes + s0 * P.A + ax;
    for (int64_t ib = 0; ib < nb; ++ib) {
      const int32_t base = static_cast<int32_t>(ax) * R + c[(b0 + ib) * P.A] + L - 1;
      int32_t* o = out + ib * n;
      for (int64_t j = 0; j < n; ++j) o[j] = base - c[j * P.A];
    }
  }
  if (P.exp) {
    int32_t* out = ws.idx.data() + 2 * kBlock * n;
    auto fill = [&](auto r, auto two_a, auto a) {
      for (int64_t ib = 0; ib < nb; ++ib) {
        const auto ri = r[s0 + b0 + ib];
        int32_t* o = out + ib * n;
        for (int64_t j = 0; j < n; ++j) o[j] = 2 * R + exp_row(ri - r[s0 + j], two_a, a, L);
      }
    };
    if (P.r32) {
      fill(P.r32, static_cast<float>(2 * P.a), static_cast<float>(P.a));
    } else {
      fill(P.r64, 2 * P.a, P.a);
    }
  }
}

// out (n, 3R) over the given row ranges: out[i, ax*R + r] = x_i . T[ax, r] (TT: (3, d, R)).
template <typename T>
EFFNN_INLINE void per_row(const T* x, int64_t stride, int64_t n, int64_t d, int64_t R,
                          const T* TT, const int32_t* lo, const int32_t* hi, T* out) {
  for (int64_t i = 0; i < n; ++i) {
    const T* xi = x + i * stride;
    T* o = out + i * 3 * R;
    for (int64_t ax = 0; ax < 3; ++ax) {
      const int32_t l = lo[i * 3 + ax], u = hi[i * 3 + ax];
      T* oa = o + ax * R;
      // kV rows at a time in registers; the last block writes up to kV - 1 values past u (into
      // rows that are never read or are written later) and reads past the table row (padding)
      for (int32_t r0 = l; r0 <= u; r0 += kV) {
        T acc[kV] = {};
        for (int64_t dd = 0; dd < d; ++dd) {
          const T xv = xi[dd];
          const T* t = TT + (ax * d + dd) * R + r0;
          for (int64_t e = 0; e < kV; ++e) acc[e] += xv * t[e];
        }
        for (int64_t e = 0; e < kV; ++e) oa[r0 + e] = acc[e];
      }
    }
  }
}

// y_i (+)= sum over the rows in range of w[i, ax*R + r] * T[ax, r, :]  (T: (3, R, d)).
template <typename T>
EFFNN_INLINE void from_rows(const T* w, int64_t n, int64_t d, int64_t R, const T* Tab,
                            const int32_t* lo, const int32_t* hi, T* y, int64_t ystride) {
  for (int64_t i = 0; i < n; ++i) {
    T* yi = y + i * ystride;
    for (int64_t d0 = 0; d0 < d; d0 += kV) {
      T acc[kV] = {};
      for (int64_t ax = 0; ax < 3; ++ax) {
        const int32_t l = lo[i * 3 + ax], u = hi[i * 3 + ax];
        for (int32_t r = l; r <= u; ++r) {
          const T wv = w[i * 3 * R + ax * R + r];
          if (wv == T(0)) continue;  // a row that no pair of the window uses
          const T* t = Tab + (ax * R + r) * d + d0;
          for (int64_t e = 0; e < kV; ++e) acc[e] += wv * t[e];
        }
      }
      const int64_t m = std::min(kV, d - d0);
      for (int64_t e = 0; e < m; ++e) yi[d0 + e] += acc[e];
    }
  }
}

// grad[ax*R + r, :] += w[i, ax*R + r] * x_i for the rows in range.
template <typename T>
EFFNN_INLINE void add_row_grad(const T* w, const T* x, int64_t stride, int64_t n, int64_t d,
                               int64_t R, const int32_t* lo, const int32_t* hi, T* grad) {
  for (int64_t i = 0; i < n; ++i) {
    const T* xi = x + i * stride;
    for (int64_t ax = 0; ax < 3; ++ax) {
      const int32_t l = lo[i * 3 + ax], u = hi[i * 3 + ax];
      for (int32_t r = l; r <= u; ++r) {
        const T wv = w[i * 3 * R + ax * R + r];
        if (wv == T(0)) continue;  // a row that no pair of the window uses
        T* g = grad + (ax * R + r) * d;
        for (int64_t dd = 0; dd < d; ++dd) g[dd] += wv * xi[dd];
      }
    }
  }
}

// S (nb, n) = Q[b0 : b0 + nb] . K^T (+ the table terms), Kt (d, n).
template <typename T>
EFFNN_INLINE void scores(const Problem<T>& P, const T* q, int64_t stride, int64_t n, int64_t b0,
                         int64_t nb, const T* Kt, const Work<T>& ws, T* S) {
  const int64_t d = P.d, R3 = 3 * P.R;
  for (int64_t ib = 0; ib < nb; ++ib) {
    T* s = S + ib * n;
    const T* qi = q + (b0 + ib) * stride;
    for (int64_t j = 0; j < n; ++j) s[j] = 0;
    for (int64_t dd = 0; dd < d; ++dd) {
      const T qv = qi[dd];
      const T* kt = Kt + dd * n;
      for (int64_t j = 0; j < n; ++j) s[j] += qv * kt[j];
    }
    if (!P.rel) continue;
    const T* pq = ws.Pq.data() + (b0 + ib) * R3;
    const T* pk = ws.Pk.data();
    for (int64_t ax = 0; ax < 3; ++ax) {
      const int32_t* idx = ws.idx.data() + ax * kBlock * n + ib * n;
      for (int64_t j = 0; j < n; ++j) s[j] += pq[idx[j]] + pk[j * R3 + idx[j]];
    }
  }
}

// exp(x) for x <= 0 (scores minus their maximum or log-sum-exp), written so that the compiler
// vectorises loops over it (glibc's expf is a scalar call): 2^n * e^f with n = round(x / ln 2),
// |f| <= ln(2) / 2, e^f by its Taylor polynomial to degree 7 (relative error < 2e-8, under one
// float32 rounding); arguments below -87 give e^-87 ~ 1.6e-38 instead of less (an absolute
// error under 2e-38 on a probability). float64 uses std::exp.
EFFNN_INLINE float exp_nonpos(float x) {
  x = std::max(x, -87.0f);
  const float n = std::floor(x * 1.44269504f + 0.5f);
  const float f = (x - n * 0.693145752f) - n * 1.42860677e-6f;  // ln 2 in two parts
  float p = 1.98412698e-4f;  // 1/5040
  p = p * f + 1.38888889e-3f;
  p = p * f + 8.33333333e-3f;
  p = p * f + 4.16666667e-2f;
  p = p * f + 1.66666667e-1f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}
EFFNN_INLINE double exp_nonpos(double x) { return std::exp(x); }

// Softmax of the row s (n) in place; returns its log-sum-exp.
template <typename T>
EFFNN_INLINE T softmax_row(T* s, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = std::max(m, s[j]);
  T sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = exp_nonpos(s[j] - m);
    sum += s[j];
  }
  const T inv = T(1) / sum;
  for (int64_t j = 0; j < n; ++j) s[j] *= inv;
  return m + std::log(sum);
}

// One head of the window's points, gathered through the window order: rows (n, d) times f, and
// optionally transposed (d, n).
template <typename T>
EFFNN_INLINE void gather_head(const Rows<T>& x, const int64_t* order, int64_t n, int64_t hh,
                              int64_t d, T f, T* rows, T* cols) {
  for (int64_t j = 0; j < n; ++j) {
    const T* src = x.p + order[j] * x.sn + hh * x.sh;
    if (rows) {
      for (int64_t dd = 0; dd < d; ++dd) rows[j * d + dd] = f * src[dd];
    }
    if (cols) {
      for (int64_t dd = 0; dd < d; ++dd) cols[dd * n + j] = src[dd];
    }
  }
}

// The rows of window w + 1 are read through `order` (scattered): request them from memory while
// window w is computed.
template <typename T>
EFFNN_INLINE void prefetch_window(const Problem<T>& P, int64_t w, std::initializer_list<Rows<T>> xs) {
  if (w >= P.W) return;
  for (int64_t j = P.starts[w]; j < P.starts[w + 1]; ++j) {
    for (const Rows<T>& x : xs) {
      for (int64_t hh = 0; hh < P.h; ++hh) __builtin_prefetch(x.p + P.order[j] * x.sn + hh * x.sh);
    }
  }
}

template <typename T>
EFFNN_INLINE void forward_windows(const Problem<T>& P, int64_t w0, int64_t w1, T* out, T* lse,
                                  Work<T>& ws) {
  const int64_t h = P.h, d = P.d, hd = h * d, R = P.R, R3 = 3 * R;
  for (int64_t w = w0; w < w1; ++w) {
    const int64_t s0 = P.starts[w], n = P.starts[w + 1] - s0;
    if (n == 0) continue;
    const int64_t* order = P.order + s0;
    prefetch_window(P, w + 1, {P.q, P.k, P.v});
    if (P.rel) window_ranges(P, s0, n, ws);
    grow(ws.Q, n * d);
    grow(ws.K, n * d);
    grow(ws.V, n * d);
    grow(ws.Kt, d * n);
    grow(ws.S, kBlock * n);
    if (P.rel) {
      grow(ws.Pq, n * R3);
      grow(ws.Pk, n * R3);
      grow(ws.hist, R3);
    }
    const T* q = ws.Q.data();
    const T* k = ws.K.data();
    const T* v = ws.V.data();
    for (int64_t hh = 0; hh < h; ++hh) {
      gather_head(P.q, order, n, hh, d, P.scale, ws.Q.data(), static_cast<T*>(nullptr));
      gather_head(P.k, order, n, hh, d, T(1), ws.K.data(), ws.Kt.data());
      gather_head(P.v, order, n, hh, d, T(1), ws.V.data(), static_cast<T*>(nullptr));
      if (P.rel) {
        per_row(q, d, n, d, R, P.tqT + hh * R3 * d, ws.lo.data(), ws.hi.data(), ws.Pq.data());
        per_row(k, d, n, d, R, P.tkT + hh * R3 * d, ws.klo.data(), ws.khi.data(), ws.Pk.data());
      }
      const T* tv = P.rel ? P.tv + hh * R3 * d : nullptr;
      for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
        const int64_t nb = std::min(kBlock, n - b0);
        if (P.rel) block_rows(P, s0, n, b0, nb, ws);
        scores(P, q, d, n, b0, nb, ws.Kt.data(), ws, ws.S.data());
        for (int64_t ib = 0; ib < nb; ++ib) {
          const int64_t i = b0 + ib;
          T* p = ws.S.data() + ib * n;
          lse[order[i] * h + hh] = softmax_row(p, n);
          T* o = out + order[i] * hd + hh * d;
          for (int64_t dd = 0; dd < d; ++dd) o[dd] = 0;
          acc_rows(o, d, p, 1, v, d, n);
          if (!P.rel) continue;
          T* H = ws.hist.data();
          for (int64_t ax = 0; ax < 3; ++ax) {
            for (int32_t r = ws.lo[i * 3 + ax]; r <= ws.hi[i * 3 + ax]; ++r) H[ax * R + r] = 0;
            const int32_t* idx = ws.idx.data() + ax * kBlock * n + ib * n;
            for (int64_t j = 0; j < n; ++j) H[idx[j]] += p[j];
          }
          from_rows(H, 1, d, R, tv, ws.lo.data() + i * 3, ws.hi.data() + i * 3, o, hd);
        }
      }
    }
  }
}

template <typename T>
EFFNN_INLINE void backward_windows(const Problem<T>& P, int64_t w0, int64_t w1,
                                   const Rows<T>& dO, const Rows<T>& out, const T* lse, T* dq,
                                   T* dk, T* dv, T* dT, Work<T>& ws) {
  const int64_t h = P.h, d = P.d, hd = h * d, R = P.R, R3 = 3 * R;
  const int64_t tsize = h * R3 * d;  // one table's gradient
  for (int64_t w = w0; w < w1; ++w) {
    const int64_t s0 = P.starts[w], n = P.starts[w + 1] - s0;
    if (n == 0) continue;
    const int64_t* order = P.order + s0;
    prefetch_window(P, w + 1, {P.q, P.k, P.v, dO, out});
    if (P.rel) window_ranges(P, s0, n, ws);
    grow(ws.Q, n * d);
    grow(ws.K, n * d);
    grow(ws.dO, n * d);
    grow(ws.Kt, d * n);
    grow(ws.Vt, d * n);
    grow(ws.S, kBlock * n);
    grow(ws.dP, kBlock * n);
    grow(ws.dK, n * d);
    grow(ws.dV, n * d);
    grow(ws.dq, d);
    if (P.rel) {
      grow(ws.Pq, n * R3);
      grow(ws.Pk, n * R3);
      grow(ws.G, n * R3);
      grow(ws.dPk, n * R3);
      grow(ws.hist, 2 * R3);
    }
    const T* q = ws.Q.data();
    const T* k = ws.K.data();
    const T* g = ws.dO.data();
    T* dqi = ws.dq.data();
    for (int64_t hh = 0; hh < h; ++hh) {
      gather_head(P.q, order, n, hh, d, P.scale, ws.Q.data(), static_cast<T*>(nullptr));
      gather_head(P.k, order, n, hh, d, T(1), ws.K.data(), ws.Kt.data());
      gather_head(P.v, order, n, hh, d, T(1), static_cast<T*>(nullptr), ws.Vt.data());
      gather_head(dO, order, n, hh, d, T(1), ws.dO.data(), static_cast<T*>(nullptr));
      std::fill(ws.dK.begin(), ws.dK.begin() + n * d, T(0));
      std::fill(ws.dV.begin(), ws.dV.begin() + n * d, T(0));
      const T *tq = nullptr, *tk = nullptr;
      T *dTq = nullptr, *dTk = nullptr, *dTv = nullptr;
      if (P.rel) {
        tq = P.tq + hh * R3 * d;
        tk = P.tk + hh * R3 * d;
        dTq = dT + hh * R3 * d;
        dTk = dT + tsize + hh * R3 * d;
        dTv = dT + 2 * tsize + hh * R3 * d;
        per_row(q, d, n, d, R, P.tqT + hh * R3 * d, ws.lo.data(), ws.hi.data(), ws.Pq.data());
        per_row(k, d, n, d, R, P.tkT + hh * R3 * d, ws.klo.data(), ws.khi.data(), ws.Pk.data());
        per_row(g, d, n, d, R, P.tvT + hh * R3 * d, ws.lo.data(), ws.hi.data(), ws.G.data());
        std::fill(ws.dPk.begin(), ws.dPk.begin() + n * R3, T(0));
      }
      for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
        const int64_t nb = std::min(kBlock, n - b0);
        if (P.rel) block_rows(P, s0, n, b0, nb, ws);
        scores(P, q, d, n, b0, nb, ws.Kt.data(), ws, ws.S.data());
        for (int64_t ib = 0; ib < nb; ++ib) {
          const int64_t i = b0 + ib;
          T* p = ws.S.data() + ib * n;
          T* dp = ws.dP.data() + ib * n;
          const T* gi = g + i * d;
          const T* oi = out.p + order[i] * out.sn + hh * out.sh;
          const T* qi = q + i * d;
          const T l = lse[order[i] * h + hh];
          for (int64_t j = 0; j < n; ++j) p[j] = exp_nonpos(p[j] - l);
          T D = 0;
          for (int64_t dd = 0; dd < d; ++dd) D += gi[dd] * oi[dd];
          // dp = dO_i . v_j (+ the value-table term)
          for (int64_t j = 0; j < n; ++j) dp[j] = 0;
          for (int64_t dd = 0; dd < d; ++dd) {
            const T gv = gi[dd];
            const T* vt = ws.Vt.data() + dd * n;
            for (int64_t j = 0; j < n; ++j) dp[j] += gv * vt[j];
          }
          if (P.rel) {
            const T* Gi = ws.G.data() + i * R3;
            for (int64_t ax = 0; ax < 3; ++ax) {
              const int32_t* idx = ws.idx.data() + ax * kBlock * n + ib * n;
              for (int64_t j = 0; j < n; ++j) dp[j] += Gi[idx[j]];
            }
          }
          // ds = p (dp - D) overwrites dp; dq_i = sum_j ds_ij k_j
          for (int64_t j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - D);
          for (int64_t dd = 0; dd < d; ++dd) dqi[dd] = 0;
          acc_rows(dqi, d, dp, 1, k, d, n);
          if (P.rel) {
            // histograms of p (-> dTv) and ds (-> dq, dTq) over the query's rows; ds -> dPk
            T* Hp = ws.hist.data();
            T* Hs = Hp + R3;
            T* dPk = ws.dPk.data();
            for (int64_t ax = 0; ax < 3; ++ax) {
              for (int32_t r = ws.lo[i * 3 + ax]; r <= ws.hi[i * 3 + ax]; ++r) {
                Hp[ax * R + r] = 0;
                Hs[ax * R + r] = 0;
              }
              const int32_t* idx = ws.idx.data() + ax * kBlock * n + ib * n;
              for (int64_t j = 0; j < n; ++j) {
                Hp[idx[j]] += p[j];
                Hs[idx[j]] += dp[j];
                dPk[j * R3 + idx[j]] += dp[j];
              }
            }
            const int32_t* lo = ws.lo.data() + i * 3;
            const int32_t* hi = ws.hi.data() + i * 3;
            add_row_grad(Hp, gi, d, 1, d, R, lo, hi, dTv);
            add_row_grad(Hs, qi, d, 1, d, R, lo, hi, dTq);
            from_rows(Hs, 1, d, R, tq, lo, hi, dqi, d);
          }
          // q entered the scores as scale * q
          T* dst = dq + order[i] * hd + hh * d;
          for (int64_t dd = 0; dd < d; ++dd) dst[dd] = P.scale * dqi[dd];
        }
        // over the block's queries: dv_j += sum_i p_ij dO_i, dk_j += sum_i ds_ij q_i
        for (int64_t j = 0; j < n; ++j) {
          acc_rows(ws.dV.data() + j * d, d, ws.S.data() + j, n, g + b0 * d, d, nb);
          acc_rows(ws.dK.data() + j * d, d, ws.dP.data() + j, n, q + b0 * d, d, nb);
        }
      }
      if (P.rel) {
        from_rows(ws.dPk.data(), n, d, R, tk, ws.klo.data(), ws.khi.data(), ws.dK.data(), d);
        add_row_grad(ws.dPk.data(), k, d, n, d, R, ws.klo.data(), ws.khi.data(), dTk);
      }
      for (int64_t j = 0; j < n; ++j) {
        T* dkj = dk + order[j] * hd + hh * d;
        T* dvj = dv + order[j] * hd + hh * d;
        for (int64_t dd = 0; dd < d; ++dd) {
          dkj[dd] = ws.dK[j * d + dd];
          dvj[dd] = ws.dV[j * d + dd];
        }
      }
    }
  }
}

// The hot loops, compiled for the baseline target and for AVX2+FMA. (Making the head dimension a
// compile-time constant was tried: GCC then unrolls the loops over it and the kernel got slower.)
#if defined(__x86_64__) && defined(__GNUC__)
#define EFFNN_HAVE_AVX2_CLONE 1
template <typename T>
__attribute__((target("avx2,fma"))) void forward_avx2(const Problem<T>& P, int64_t w0, int64_t w1,
                                                      T* out, T* lse, Work<T>& ws) {
  forward_windows(P, w0, w1, out, lse, ws);
}
template <typename T>
__attribute__((target("avx2,fma"))) void backward_avx2(const Problem<T>& P, int64_t w0,
                                                       int64_t w1, const Rows<T>& dO,
                                                       const Rows<T>& out, const T* lse, T* dq,
                                                       T* dk, T* dv, T* dT, Work<T>& ws) {
  backward_windows(P, w0, w1, dO, out, lse, dq, dk, dv, dT, ws);
}
// EFFNN_EXT_BASELINE_ISA=1 forces the baseline build of the loops (tests; read at every call).
bool use_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const char* force = std::getenv("EFFNN_EXT_BASELINE_ISA");
  return has && !(force && std::strcmp(force, "1") == 0);
}
#endif

template <typename T>
void forward_base(const Problem<T>& P, int64_t w0, int64_t w1, T* out, T* lse, Work<T>& ws) {
  forward_windows(P, w0, w1, out, lse, ws);
}
template <typename T>
void backward_base(const Problem<T>& P, int64_t w0, int64_t w1, const Rows<T>& dO,
                   const Rows<T>& out, const T* lse, T* dq, T* dk, T* dv, T* dT, Work<T>& ws) {
  backward_windows(P, w0, w1, dO, out, lse, dq, dk, dv, dT, ws);
}

// Contiguous groups of windows of about equal cost (pairs plus per-point table work), one per
// thread: part t is [bounds[t], bounds[t+1]).
std::vector<int64_t> partition(const int64_t* starts, int64_t W, int64_t parts, int64_t per_point) {
  std::vector<double> cum(W + 1, 0.0);
  for (int64_t w = 0; w < W; ++w) {
    const double n = static_cast<double>(starts[w + 1] - starts[w]);
    cum[w + 1] = cum[w] + n * n + n * static_cast<double>(per_point);
  }
  std::vector<int64_t> bounds(parts + 1, W);
  bounds[0] = 0;
  int64_t w = 0;
  for (int64_t t = 1; t < parts; ++t) {
    const double target = cum[W] * static_cast<double>(t) / static_cast<double>(parts);
    while (w < W && cum[w] < target) ++w;
    bounds[t] = w;
  }
  return bounds;
}

struct Inputs {
  at::Tensor q, k, v, order, starts, codes, r, tq, tk, tv;
  at::Tensor tq_pad, tk_pad, tv_pad, tqT, tkT, tvT;  // flat copies with kV values of padding
  int64_t L = 0;
  double scale = 1;
  c10::optional<double> a;
};

// A tensor whose last dimension is contiguous (a copy only when it is not).
at::Tensor inner_contiguous(const at::Tensor& t) {
  return t.stride(-1) == 1 ? t : t.contiguous();
}

// A flat contiguous copy of t followed by kV zeros (the register blocks read past row ends).
at::Tensor padded(const at::Tensor& t) {
  at::Tensor buf = at::zeros({t.numel() + kV}, t.options());
  buf.narrow(0, 0, t.numel()).copy_(t.reshape(-1));
  return buf;
}

template <typename T>
Rows<T> rows_of(const at::Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0), t.stride(1)};
}

template <typename T>
Problem<T> make_problem(const Inputs& in) {
  Problem<T> P{};
  P.N = in.q.size(0);
  P.h = in.q.size(1);
  P.d = in.q.size(2);
  P.W = in.starts.size(0) - 1;
  P.rel = in.tq.defined();
  P.exp = in.a.has_value();
  P.L = in.L;
  P.R = P.rel ? in.tq.size(2) : 0;
  P.A = P.rel ? in.codes.size(1) : 0;
  P.q = rows_of<T>(in.q);
  P.k = rows_of<T>(in.k);
  P.v = rows_of<T>(in.v);
  P.scale = static_cast<T>(in.scale);
  P.order = in.order.data_ptr<int64_t>();
  P.starts = in.starts.data_ptr<int64_t>();
  P.codes = P.rel ? in.codes.data_ptr<int32_t>() : nullptr;
  P.r32 = nullptr;
  P.r64 = nullptr;
  if (P.exp) {
    if (in.r.scalar_type() == at::kFloat) {
      P.r32 = in.r.data_ptr<float>();
    } else {
      P.r64 = in.r.data_ptr<double>();
    }
    P.a = *in.a;
  }
  if (P.rel) {
    P.tq = in.tq_pad.data_ptr<T>();
    P.tk = in.tk_pad.data_ptr<T>();
    P.tv = in.tv_pad.data_ptr<T>();
    P.tqT = in.tqT.data_ptr<T>();
    P.tkT = in.tkT.data_ptr<T>();
    P.tvT = in.tvT.data_ptr<T>();
  }
  return P;
}

Inputs check_inputs(const char* fn, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& order, const at::Tensor& starts, const at::Tensor& codes,
                    const at::Tensor& r, const c10::optional<at::Tensor>& table_q,
                    const c10::optional<at::Tensor>& table_k,
                    const c10::optional<at::Tensor>& table_v, int64_t L,
                    c10::optional<double> exp_split_a, double scale) {
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, fn,
              ": q, k, v must be float32 or float64 (compute fp16/bf16 in float32), got ", dt);
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->device().is_cpu(), fn, ": effnn._C only handles CPU tensors, got ", t->device());
    TORCH_CHECK(t->scalar_type() == dt, fn, ": q, k, v must share one dtype, got ", dt, " and ",
                t->scalar_type());
    TORCH_CHECK(t->dim() == 3 && t->sizes() == q.sizes(), fn,
                ": q, k, v must be (N, heads, head_dim) of one shape, got ", q.sizes(), " and ",
                t->sizes());
  }
  TORCH_CHECK(starts.dim() == 1 && starts.size(0) >= 1 && starts.scalar_type() == at::kLong, fn,
              ": starts must be a 1-D int64 tensor of W + 1 window offsets, got ", starts.sizes(),
              " ", starts.scalar_type());
  Inputs in;
  in.q = inner_contiguous(q);
  in.k = inner_contiguous(k);
  in.v = inner_contiguous(v);
  in.starts = starts.contiguous();
  in.scale = scale;
  const int64_t N = q.size(0), W = starts.size(0) - 1;
  TORCH_CHECK(order.dim() == 1 && order.size(0) == N && order.scalar_type() == at::kLong, fn,
              ": order must be an int64 (N,) = (", N, ",) permutation, got ", order.sizes(), " ",
              order.scalar_type());
  in.order = order.contiguous();
  {
    // a permutation: every row is read and written exactly once (the writes are unsynchronised)
    std::vector<char> seen(N, 0);
    const int64_t* o = in.order.data_ptr<int64_t>();
    for (int64_t i = 0; i < N; ++i) {
      TORCH_CHECK(o[i] >= 0 && o[i] < N && !seen[o[i]], fn,
                  ": order must be a permutation of 0..N-1, got order[", i, "] = ", o[i]);
      seen[o[i]] = 1;
    }
  }
  const int64_t* s = in.starts.data_ptr<int64_t>();
  TORCH_CHECK(s[0] == 0 && s[W] == N, fn, ": starts must run from 0 to N = ", N, ", got ", s[0],
              " .. ", s[W]);
  for (int64_t w = 0; w < W; ++w) {
    TORCH_CHECK(s[w + 1] >= s[w], fn, ": starts must be non-decreasing, got starts[", w, "] = ",
                s[w], " > starts[", w + 1, "] = ", s[w + 1]);
  }
  const bool rel = table_q.has_value() && table_q->defined();
  if (!rel) return in;
  TORCH_CHECK(table_k.has_value() && table_k->defined() && table_v.has_value() &&
                  table_v->defined(),
              fn, ": give all three tables or none");
  const int64_t h = q.size(1), d = q.size(2);
  const bool exp = exp_split_a.has_value();
  const int64_t R = exp ? 2 * L : 2 * L - 1, A = exp ? 2 : 3;
  TORCH_CHECK(L >= 1, fn, ": L must be >= 1, got ", L);
  for (const at::Tensor* t : {&*table_q, &*table_k, &*table_v}) {
    TORCH_CHECK(t->scalar_type() == dt && t->device().is_cpu(), fn,
                ": tables must be CPU tensors of q's dtype ", dt, ", got ", t->scalar_type(), " on ",
                t->device());
    TORCH_CHECK(t->dim() == 4 && t->size(0) == h && t->size(1) == 3 && t->size(2) == R &&
                    t->size(3) == d,
                fn, ": tables must be (heads, 3, rows, head_dim) = (", h, ", 3, ", R, ", ", d,
                "), got ", t->sizes());
  }
  TORCH_CHECK(codes.dim() == 2 && codes.size(0) == N && codes.size(1) == A &&
                  codes.scalar_type() == at::kInt,
              fn, ": codes must be int32 (N, ", A, ") = (", N, ", ", A, "), got ", codes.sizes(),
              " ", codes.scalar_type());
  in.codes = codes.contiguous();
  const int32_t* c = in.codes.data_ptr<int32_t>();
  for (int64_t i = 0; i < N * A; ++i) {
    TORCH_CHECK(c[i] >= 0 && c[i] < L, fn, ": codes must be in [0, L-1] = [0, ", L - 1, "], got ",
                c[i]);
  }
  if (exp) {
    TORCH_CHECK(std::isfinite(*exp_split_a) && *exp_split_a > 0, fn,
                ": exp_split_a must be positive, got ", *exp_split_a);
    TORCH_CHECK(r.dim() == 1 && r.size(0) == N &&
                    (r.scalar_type() == at::kFloat || r.scalar_type() == at::kDouble),
                fn, ": r must be a float32/float64 (N,) = (", N, ",) tensor, got ", r.sizes(), " ",
                r.scalar_type());
    in.r = r.contiguous();
    in.a = exp_split_a;
  }
  in.L = L;
  in.tq = table_q->contiguous();
  in.tk = table_k->contiguous();
  in.tv = table_v->contiguous();
  in.tq_pad = padded(in.tq);
  in.tk_pad = padded(in.tk);
  in.tv_pad = padded(in.tv);
  in.tqT = padded(in.tq.transpose(2, 3));
  in.tkT = padded(in.tk.transpose(2, 3));
  in.tvT = padded(in.tv.transpose(2, 3));
  return in;
}

// Forward. q, k, v: (N, h, d) float32/float64 in the caller's order (any point and head strides);
// order (N,) int64: the caller's row of each point in window order; starts (W + 1) int64 window
// offsets in window order; codes (N, A) int32 (the linear axes) and r (N,) (the exponential-split
// coordinate, used with exp_split_a), both in window order; tables (h, 3, rows, d) or None; scale
// multiplies q. Returns (out (N, h, d), lse (N, h)) in the caller's order.
std::tuple<at::Tensor, at::Tensor> window_attention_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& order,
    const at::Tensor& starts, const at::Tensor& codes, const at::Tensor& r,
    const c10::optional<at::Tensor>& table_q, const c10::optional<at::Tensor>& table_k,
    const c10::optional<at::Tensor>& table_v, int64_t L, c10::optional<double> exp_split_a,
    double scale) {
  at::NoGradGuard no_grad;
  const Inputs in = check_inputs("window_attention_forward", q, k, v, order, starts, codes, r,
                                 table_q, table_k, table_v, L, exp_split_a, scale);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1)}, q.options());
  AT_DISPATCH_FLOATING_TYPES(in.q.scalar_type(), "window_attention_forward", [&] {
    const Problem<scalar_t> P = make_problem<scalar_t>(in);
    const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), P.W));
    const auto bounds = partition(P.starts, P.W, parts, P.rel ? 6 * P.R : 1);
    scalar_t* o = out.data_ptr<scalar_t>();
    scalar_t* l = lse.data_ptr<scalar_t>();
    at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
      Work<scalar_t> ws;
      for (int64_t t = b; t < e; ++t) {
#ifdef EFFNN_HAVE_AVX2_CLONE
        if (use_avx2()) {
          forward_avx2(P, bounds[t], bounds[t + 1], o, l, ws);
          continue;
        }
#endif
        forward_base(P, bounds[t], bounds[t + 1], o, l, ws);
      }
    });
  });
  return {out, lse};
}

// Backward from the forward's out and lse (the caller's order, as the other arguments).
// Returns (dq, dk, dv, dtable_q, dtable_k, dtable_v); the table gradients are empty (0,) tensors
// without tables.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
window_attention_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                          const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                          const at::Tensor& order, const at::Tensor& starts,
                          const at::Tensor& codes, const at::Tensor& r,
                          const c10::optional<at::Tensor>& table_q,
                          const c10::optional<at::Tensor>& table_k,
                          const c10::optional<at::Tensor>& table_v, int64_t L,
                          c10::optional<double> exp_split_a, double scale) {
  at::NoGradGuard no_grad;
  const char* fn = "window_attention_backward";
  const Inputs in = check_inputs(fn, q, k, v, order, starts, codes, r, table_q, table_k, table_v,
                                 L, exp_split_a, scale);
  for (const at::Tensor* t : {&grad_out, &out}) {
    TORCH_CHECK(t->sizes() == q.sizes() && t->scalar_type() == q.scalar_type() &&
                    t->device().is_cpu(),
                fn, ": grad_out and out must be CPU tensors of q's shape and dtype, got ",
                t->sizes(), " ", t->scalar_type());
  }
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) &&
                  lse.scalar_type() == q.scalar_type(),
              fn, ": lse must be (N, heads) of q's dtype, got ", lse.sizes(), " ",
              lse.scalar_type());
  const at::Tensor g = inner_contiguous(grad_out), o = inner_contiguous(out), l = lse.contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(q.sizes(), q.options());
  at::Tensor dv = at::empty(q.sizes(), q.options());
  at::Tensor dtq = q.new_empty({0}), dtk = q.new_empty({0}), dtv = q.new_empty({0});
  AT_DISPATCH_FLOATING_TYPES(in.q.scalar_type(), "window_attention_backward", [&] {
    const Problem<scalar_t> P = make_problem<scalar_t>(in);
    const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), P.W));
    const auto bounds = partition(P.starts, P.W, parts, P.rel ? 12 * P.R : 1);
    const int64_t tsize = P.rel ? P.h * 3 * P.R * P.d : 0;
    const Rows<scalar_t> gr = rows_of<scalar_t>(g), orows = rows_of<scalar_t>(o);
    scalar_t *dqp = dq.data_ptr<scalar_t>(), *dkp = dk.data_ptr<scalar_t>(),
             *dvp = dv.data_ptr<scalar_t>();
    const scalar_t* lp = l.data_ptr<scalar_t>();
    // one accumulator of the three table gradients per part, summed in part order below
    std::vector<scalar_t> acc(parts * 3 * tsize, scalar_t(0));
    at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
      Work<scalar_t> ws;
      for (int64_t t = b; t < e; ++t) {
        scalar_t* dT = acc.data() + t * 3 * tsize;
#ifdef EFFNN_HAVE_AVX2_CLONE
        if (use_avx2()) {
          backward_avx2(P, bounds[t], bounds[t + 1], gr, orows, lp, dqp, dkp, dvp, dT, ws);
          continue;
        }
#endif
        backward_base(P, bounds[t], bounds[t + 1], gr, orows, lp, dqp, dkp, dvp, dT, ws);
      }
    });
    if (P.rel) {
      for (int64_t t = 1; t < parts; ++t) {
        const scalar_t* a = acc.data() + t * 3 * tsize;
        for (int64_t i = 0; i < 3 * tsize; ++i) acc[i] += a[i];
      }
      dtq = at::empty_like(in.tq);
      dtk = at::empty_like(in.tq);
      dtv = at::empty_like(in.tq);
      std::memcpy(dtq.data_ptr<scalar_t>(), acc.data(), sizeof(scalar_t) * tsize);
      std::memcpy(dtk.data_ptr<scalar_t>(), acc.data() + tsize, sizeof(scalar_t) * tsize);
      std::memcpy(dtv.data_ptr<scalar_t>(), acc.data() + 2 * tsize, sizeof(scalar_t) * tsize);
    }
  });
  return {dq, dk, dv, dtq, dtk, dtv};
}

}  // namespace

TORCH_LIBRARY(effnn_ext, m) {
  m.def("window_attention_forward", &window_attention_forward);
  m.def("window_attention_backward", &window_attention_backward);
}
