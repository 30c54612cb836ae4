// One (batch row, kv head) unit of WindowedGroupQueryAttention, in the order the ONNX function
// fixes (export/attention.py): gather the entries the chunk overwrites, write the rotated chunk
// (and the sink slots it reaches), then attend over the S updated slots, the gathered entries and
// the Ss sinks. Compiled once per instruction
// set with WGQA_UNIT naming the entry point; the loops use GCC vector extensions over the head
// dimension, whose width follows the variant's flags.
#include <immintrin.h>

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
constexpr int64_t ROWS = 4;  // query rows per register block (block() handles 1..ROWS)

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

// L floats as one GCC vector (extensions, so each variant's flags pick the instructions).
template <int L>
struct Vec {
  typedef float f __attribute__((vector_size(4 * L)));
  typedef _Float16 h __attribute__((vector_size(2 * L)));
  typedef int32_t i __attribute__((vector_size(4 * L)));
};
#if defined(__AVX__)  // AVX2 and AVX-512 (256-bit AVX-512VL: 512-bit lanes measured slower, docs/kernel.md)
constexpr int NATIVE = 8;
#else
constexpr int NATIVE = 4;
#endif

template <int L>
[[gnu::always_inline]] inline typename Vec<L>::f load(const float* p) {
  typename Vec<L>::f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
// float16 lanes to float: F16C's vcvtph2ps where the variant has it (GCC converts a vector of
// _Float16 element by element otherwise).
template <int L>
[[gnu::always_inline]] inline typename Vec<L>::f load(const half* p) {
#if defined(__F16C__)
  if constexpr (L == 8) return (typename Vec<L>::f)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  if constexpr (L == 4) return (typename Vec<L>::f)_mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
#endif
  typename Vec<L>::h v;
  std::memcpy(&v, p, sizeof v);
  return __builtin_convertvector(v, typename Vec<L>::f);
}
template <int L>
[[gnu::always_inline]] inline void store(float* p, typename Vec<L>::f v) { std::memcpy(p, &v, sizeof v); }

// The sum of the lanes by halving (log2 L dependent adds, not L).
template <int L>
[[gnu::always_inline]] inline float hsum(typename Vec<L>::f v) {
  if constexpr (L == 1) {
    return v[0];
  } else {
    typename Vec<L / 2>::f lo, hi;
    std::memcpy(&lo, &v, sizeof lo);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
    return hsum<L / 2>(lo + hi);
  }
}

// scores[r * ld + s] = q[r] . keys[s] for NR rows of q (float, [NR, D]) and n keys of type T, in
// L-lane vectors (L divides D); NR is a template argument so the accumulators stay in registers.
template <int L, int NR, typename T>
void scores_n(const float* q, const T* keys, int64_t n, int64_t D, float* out, int64_t ld) {
  for (int64_t s = 0; s < n; ++s) {
    const T* k = keys + s * D;
    typename Vec<L>::f a[NR] = {};
    for (int64_t c = 0; c < D; c += L) {
      const auto kv = load<L>(k + c);
      for (int r = 0; r < NR; ++r) a[r] += load<L>(q + r * D + c) * kv;
    }
    for (int r = 0; r < NR; ++r) out[r * ld + s] = hsum<L>(a[r]);
  }
}

// acc[r] += sum_s p[r * ld + s] * vals[s] for NR rows ([NR, D] float accumulators).
template <int L, int NR, typename T>
void weighted_n(const float* p, int64_t ld, const T* vals, int64_t n, int64_t D, float* acc) {
  for (int64_t c = 0; c < D; c += L) {
    typename Vec<L>::f o[NR] = {};
    for (int64_t s = 0; s < n; ++s) {
      const auto v = load<L>(vals + s * D + c);
      for (int r = 0; r < NR; ++r) o[r] += p[r * ld + s] * v;
    }
    for (int r = 0; r < NR; ++r) store<L>(acc + r * D + c, load<L>(acc + r * D + c) + o[r]);
  }
}

// Both products for a block of nr rows, with the widest lane count (up to the variant's native
// one) that divides D.
template <int L, typename T>
void block(const float* q, int64_t nr, const T* keys, const T* vals, int64_t n, int64_t D, float* sc,
           int64_t ld, float* acc, bool weigh) {
  if constexpr (L > 1) {
    if (D % L) return block<L / 2>(q, nr, keys, vals, n, D, sc, ld, acc, weigh);
  }
#define WGQA_ROWS(NR)                                  \
  case NR:                                             \
    if (weigh)                                         \
      weighted_n<L, NR>(sc, ld, vals, n, D, acc);      \
    else                                               \
      scores_n<L, NR>(q, keys, n, D, sc, ld);          \
    return;
  switch (nr) {
    WGQA_ROWS(1)
    WGQA_ROWS(2)
    WGQA_ROWS(3)
    default:
      WGQA_ROWS(4)
  }
#undef WGQA_ROWS
}

// e^x in L lanes: 2^n e^r with n = round(x log2 e), |r| <= ln2 / 2, e^r by its degree-7 Taylor
// polynomial (relative error below 2e-8, under float rounding); e^x below e^-87 is 0, as in expf
// up to denormals, so masked keys weigh exactly nothing.
template <int L>
[[gnu::always_inline]] inline typename Vec<L>::f vexp(typename Vec<L>::f x) {
  using F = typename Vec<L>::f;
  using I = typename Vec<L>::i;
  const I tiny = x < -87.0f;
  x = tiny ? F{} - 87.0f : x;
  const F t = x * 1.44269504088896341f;
  const I n = __builtin_convertvector(t + (t < 0.0f ? F{} - 0.5f : F{} + 0.5f), I);
  const F nf = __builtin_convertvector(n, F);
  const F r = (x - nf * 0.693145751953125f) - nf * 1.428606765330187e-06f;  // ln 2 in two parts
  F e = 1.0f / 5040 + F{};
  e = e * r + 1.0f / 720;
  e = e * r + 1.0f / 120;
  e = e * r + 1.0f / 24;
  e = e * r + 1.0f / 6;
  e = e * r + 0.5f;
  e = e * r + 1.0f;
  e = e * r + 1.0f;
  const I bits = (n + 127) << 23;
  F scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return tiny ? F{} : e * scale;
}

// Softmax in place over n scores plus the additive bias (type T), NATIVE lanes at a time; the
// tail goes through one padded vector.
template <typename T>
void softmax(float* x, const T* bias, int64_t n) {
  constexpr int L = NATIVE;
  using F = typename Vec<L>::f;
  const int64_t body = n - n % L;
  float m = -INFINITY;
  for (int64_t i = 0; i < n; ++i) {
    x[i] += f(bias[i]);
    m = x[i] > m ? x[i] : m;
  }
  F sum{};
  for (int64_t i = 0; i < body; i += L) {
    const F e = vexp<L>(load<L>(x + i) - m);
    store<L>(x + i, e);
    sum += e;
  }
  if (body < n) {
    float tail[L];
    for (int i = 0; i < L; ++i) tail[i] = body + i < n ? x[body + i] - m : -INFINITY;
    const F e = vexp<L>(load<L>(tail));
    sum += e;
    for (int64_t i = body; i < n; ++i) x[i] = e[i - body];
  }
  const float inv = 1.0f / hsum<L>(sum);
  for (int64_t i = 0; i < n; ++i) x[i] *= inv;
}

template <typename T>
void unit(const Problem& p, int64_t u) {
  const int64_t b = u / p.Hkv, h = u % p.Hkv, C = p.C, D = p.D, S = p.S, G = p.Hq / p.Hkv;
  const int64_t Ss = p.Ss, R = G * C, L = S + C + Ss, width = (p.Hq + 2 * p.Hkv) * D, half_d = D / 2;
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
  T* sink_key = Ss ? static_cast<T*>(p.sink_key) + (b * p.Hkv + h) * Ss * D : nullptr;
  T* sink_value = Ss ? static_cast<T*>(p.sink_value) + (b * p.Hkv + h) * Ss * D : nullptr;
  for (int64_t s = 0; s < Ss; ++s) {
    if (!p.sink_new[b * Ss + s]) continue;
    const int64_t j = p.sink_src[((b * p.Hkv + h) * Ss + s) * D];
    const T* src = qkv + j * width + (p.Hq + h) * D;
    rope(src, cos_k + j * half_d, sin_k + j * half_d, D, row.data());
    for (int64_t d = 0; d < D; ++d) sink_key[s * D + d] = static_cast<T>(row[d]);
    std::memcpy(sink_value + s * D, src + p.Hkv * D, D * sizeof(T));
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
    block<NATIVE>(qb, nr, key, value, S, D, sc.data(), L, nullptr, false);
    block<NATIVE>(qb, nr, old_k.data(), old_v.data(), C, D, sc.data() + S, L, nullptr, false);
    if (Ss) block<NATIVE>(qb, nr, sink_key, sink_value, Ss, D, sc.data() + S + C, L, nullptr, false);
    for (int64_t r = 0; r < nr; ++r) softmax(&sc[r * L], bias + (r0 + r) * L, L);
    std::fill(acc.begin(), acc.end(), 0.0f);
    block<NATIVE>(qb, nr, key, value, S, D, sc.data(), L, acc.data(), true);
    block<NATIVE>(qb, nr, old_k.data(), old_v.data(), C, D, sc.data() + S, L, acc.data(), true);
    if (Ss) block<NATIVE>(qb, nr, sink_key, sink_value, Ss, D, sc.data() + S + C, L, acc.data(), true);
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
