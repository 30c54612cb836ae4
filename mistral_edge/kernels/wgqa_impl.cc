// One (batch row, kv head) unit of WindowedGroupQueryAttention, in the order the ONNX function
// fixes (export/attention.py): gather the entries the chunk overwrites, write the rotated chunk,
// then attend over the S updated slots plus the gathered entries. Compiled once per instruction
// set with WGQA_UNIT naming the entry point; the loops are written for the compiler to vectorize
// over the head dimension (omp simd reductions: no -ffast-math needed).
#include <cmath>
#include <cstring>
#include <vector>

#include "wgqa.h"

#ifndef WGQA_UNIT
#error "compile with -DWGQA_UNIT=unit_<isa>"
#endif

namespace wgqa {
namespace {

using half = _Float16;
constexpr int64_t ROWS = 4;  // query rows per register block

template <typename T>
inline float f(T x) { return static_cast<float>(x); }

// Half rotation (RotaryEmbedding, interleaved=0) of one head vector into float.
template <typename T>
void rope(const T* x, const T* cos, const T* sin, int64_t D, float* y) {
  const int64_t h = D / 2;
  for (int64_t d = 0; d < h; ++d) {
    const float a = f(x[d]), b = f(x[d + h]), c = f(cos[d]), s = f(sin[d]);
    y[d] = a * c - b * s;
    y[d + h] = b * c + a * s;
  }
}

// scores[r * ld + n] = q[r] . keys[n] for nr <= ROWS rows of q (float) and n keys of type T.
template <int64_t nr, typename T>
void scores_n(const float* q, const T* keys, int64_t n, int64_t D, float* out, int64_t ld) {
  const float* q0 = q;
  const float* q1 = q + (nr > 1 ? D : 0);
  const float* q2 = q + (nr > 2 ? 2 * D : 0);
  const float* q3 = q + (nr > 3 ? 3 * D : 0);
  for (int64_t s = 0; s < n; ++s) {
    const T* k = keys + s * D;
    float a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
    for (int64_t d = 0; d < D; ++d) {
      const float kd = f(k[d]);
      a0 += q0[d] * kd;
      if (nr > 1) a1 += q1[d] * kd;
      if (nr > 2) a2 += q2[d] * kd;
      if (nr > 3) a3 += q3[d] * kd;
    }
    out[s] = a0;
    if (nr > 1) out[ld + s] = a1;
    if (nr > 2) out[2 * ld + s] = a2;
    if (nr > 3) out[3 * ld + s] = a3;
  }
}

// The row count as a template argument, so a block of fewer rows computes no spare dot products.
template <typename T>
void scores(const float* q, int64_t nr, const T* keys, int64_t n, int64_t D, float* out, int64_t ld) {
  switch (nr) {
    case 1: return scores_n<1>(q, keys, n, D, out, ld);
    case 2: return scores_n<2>(q, keys, n, D, out, ld);
    case 3: return scores_n<3>(q, keys, n, D, out, ld);
    default: return scores_n<4>(q, keys, n, D, out, ld);
  }
}

// acc[r] += sum_n p[r * ld + n] * vals[n] for nr <= ROWS rows.
template <int64_t nr, typename T>
void weighted_n(const float* p, int64_t ld, const T* vals, int64_t n, int64_t D, float* acc) {
  float* o0 = acc;
  float* o1 = acc + (nr > 1 ? D : 0);
  float* o2 = acc + (nr > 2 ? 2 * D : 0);
  float* o3 = acc + (nr > 3 ? 3 * D : 0);
  for (int64_t s = 0; s < n; ++s) {
    const T* v = vals + s * D;
    const float p0 = p[s], p1 = nr > 1 ? p[ld + s] : 0, p2 = nr > 2 ? p[2 * ld + s] : 0,
                p3 = nr > 3 ? p[3 * ld + s] : 0;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) {
      const float vd = f(v[d]);
      o0[d] += p0 * vd;
      if (nr > 1) o1[d] += p1 * vd;
      if (nr > 2) o2[d] += p2 * vd;
      if (nr > 3) o3[d] += p3 * vd;
    }
  }
}

template <typename T>
void weighted(const float* p, int64_t ld, int64_t nr, const T* vals, int64_t n, int64_t D, float* acc) {
  switch (nr) {
    case 1: return weighted_n<1>(p, ld, vals, n, D, acc);
    case 2: return weighted_n<2>(p, ld, vals, n, D, acc);
    case 3: return weighted_n<3>(p, ld, vals, n, D, acc);
    default: return weighted_n<4>(p, ld, vals, n, D, acc);
  }
}

// Softmax in place over n scores plus the additive bias (type T).
template <typename T>
void softmax(float* x, const T* bias, int64_t n) {
  float m = -INFINITY;
  for (int64_t i = 0; i < n; ++i) {
    x[i] += f(bias[i]);
    m = x[i] > m ? x[i] : m;
  }
  float sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += (x[i] = std::exp(x[i] - m));
  const float inv = 1.0f / sum;
  for (int64_t i = 0; i < n; ++i) x[i] *= inv;
}

template <typename T>
void unit(const Problem& p, int64_t u) {
  const int64_t b = u / p.Hkv, h = u % p.Hkv, C = p.C, D = p.D, S = p.S, G = p.Hq / p.Hkv;
  const int64_t R = G * C, L = S + C, width = (p.Hq + 2 * p.Hkv) * D, half_d = D / 2;
  const T* qkv = static_cast<const T*>(p.qkv) + b * C * width;
  T* key = static_cast<T*>(p.key) + (b * p.Hkv + h) * S * D;
  T* value = static_cast<T*>(p.value) + (b * p.Hkv + h) * S * D;
  const int64_t table = b * C * half_d;
  const T *cos_q = static_cast<const T*>(p.cos_q) + table, *sin_q = static_cast<const T*>(p.sin_q) + table;
  const T *cos_k = static_cast<const T*>(p.cos_k) + table, *sin_k = static_cast<const T*>(p.sin_k) + table;
  const int64_t* gather = p.gather_idx + (b * p.Hkv + h) * C * D;
  const bool* keep = p.keep + b * C;
  const T* bias = static_cast<const T*>(p.bias) + b * R * L;

  // (1) the entries the chunk overwrites, read before any write
  std::vector<T> old_k(C * D), old_v(C * D);
  for (int64_t j = 0; j < C; ++j) {
    const int64_t slot = gather[j * D];
    std::memcpy(&old_k[j * D], key + slot * D, D * sizeof(T));
    std::memcpy(&old_v[j * D], value + slot * D, D * sizeof(T));
  }
  // (2) the chunk's rotated keys and values at slot (write_at + j) mod S; padding keeps the old entry
  std::vector<float> row(D);
  for (int64_t j = 0; j < C; ++j) {
    if (!keep[j]) continue;
    const int64_t slot = (p.write_at[b] + j) % S;
    const T* src = qkv + j * width + (p.Hq + h) * D;
    rope(src, cos_k + j * half_d, sin_k + j * half_d, D, row.data());
    for (int64_t d = 0; d < D; ++d) key[slot * D + d] = static_cast<T>(row[d]);
    std::memcpy(value + slot * D, src + p.Hkv * D, D * sizeof(T));
  }
  // (3) queries of this kv head, rows g-major (r = g C + i), scaled by the tables
  std::vector<float> q(R * D), sc(ROWS * L), acc(ROWS * D);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i = 0; i < C; ++i)
      rope(qkv + i * width + (h * G + g) * D, cos_q + i * half_d, sin_q + i * half_d, D, &q[(g * C + i) * D]);
  T* out = static_cast<T*>(p.out) + b * C * p.Hq * D;
  for (int64_t r0 = 0; r0 < R; r0 += ROWS) {
    const int64_t nr = R - r0 < ROWS ? R - r0 : ROWS;
    const float* qb = &q[r0 * D];
    scores(qb, nr, key, S, D, sc.data(), L);
    scores(qb, nr, old_k.data(), C, D, sc.data() + S, L);
    for (int64_t r = 0; r < nr; ++r) softmax(&sc[r * L], bias + (r0 + r) * L, L);
    std::fill(acc.begin(), acc.end(), 0.0f);
    weighted(sc.data(), L, nr, value, S, D, acc.data());
    weighted(sc.data() + S, L, nr, old_v.data(), C, D, acc.data());
    for (int64_t r = 0; r < nr; ++r) {
      const int64_t g = (r0 + r) / C, i = (r0 + r) % C;
      T* o = out + i * p.Hq * D + (h * G + g) * D;
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(acc[r * D + d]);
    }
  }
}

}  // namespace

void WGQA_UNIT(const Problem& p, int64_t u) {
  if (p.half)
    unit<half>(p, u);
  else
    unit<float>(p, u);
}

}  // namespace wgqa
