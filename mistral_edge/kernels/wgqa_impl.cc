// One (batch row, kv head) unit of WindowedGroupQueryAttention, in the order the ONNX function
// fixes (export/attention.py): gather the entries the chunk overwrites, admit the best of them into
// the pool (a pooled op), write the rotated chunk (and the sink slots it reaches), then attend over
// the S updated slots, the gathered entries, the Ss sinks and the P pool slots, adding each key's
// probability mass to the ring's and the pool's masses. The cache is stored as float32, float16 or int8 with a float16 scale per row
// (docs/kernel.md); int8 rows are read as codes, the scale applied once per key row. Compiled once
// per instruction set with WGQA_UNIT naming the entry point; the loops use GCC vector extensions
// over the head dimension, whose width follows the variant's flags.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
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

// int8 cache rows carry a scale; float rows do not.
template <typename K>
constexpr bool QUANT = std::is_same<K, int8_t>::value;

// Half rotation (RotaryEmbedding, interleaved=0) of one head vector into float, with the rounding
// of ONNX Runtime's own kernel (MLAS: fused a c - (b s) and a s + (b c) where the CPU has FMA, plain
// products otherwise), so a rotated key quantizes to the function body's int8 codes.
template <typename T>
void rope(const T* x, const T* cos, const T* sin, int64_t D, float* y) {
  const int64_t h = D / 2;
  for (int64_t d = 0; d < h; ++d) {
    const float a = f(x[d]), b = f(x[d + h]), c = f(cos[d]), s = f(sin[d]);
#if defined(__FMA__)
    y[d] = __builtin_fmaf(a, c, -(b * s));
    y[d + h] = __builtin_fmaf(a, s, b * c);
#else
    y[d] = a * c - b * s;
    y[d + h] = a * s + b * c;
#endif
  }
}

// L floats as one GCC vector (extensions, so each variant's flags pick the instructions).
template <int L>
struct Vec {
  typedef float f __attribute__((vector_size(4 * L)));
  typedef _Float16 h __attribute__((vector_size(2 * L)));
  typedef int8_t b __attribute__((vector_size(L)));
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
// int8 codes to float: sign extension and vcvtdq2ps where the variant has SSE4.1/AVX2.
template <int L>
[[gnu::always_inline]] inline typename Vec<L>::f load(const int8_t* p) {
#if defined(__AVX2__)
  if constexpr (L == 8)
    return (typename Vec<L>::f)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  if constexpr (L == 4) {
    int32_t w;
    std::memcpy(&w, p, sizeof w);
    return (typename Vec<L>::f)_mm_cvtepi32_ps(_mm_cvtepi8_epi32(_mm_cvtsi32_si128(w)));
  }
#endif
  typename Vec<L>::b v;
  std::memcpy(&v, p, sizeof v);
  return __builtin_convertvector(v, typename Vec<L>::f);
}
template <int L>
[[gnu::always_inline]] inline void store(float* p, typename Vec<L>::f v) { std::memcpy(p, &v, sizeof v); }

// One row x (D floats, already rounded to the activation type) in the cache's type. int8: the
// spec's row scale s = fp16(max|x| / 127) (1 for a zero row) and codes clip(nearbyint(x / s),
// -127, 127), the function body's float32 operations in its order (nearbyint rounds half to even
// under the default rounding mode; fmax maps a NaN to -127 rather than to undefined behaviour).
// The AVX variants take 8 lanes at a time with the same operations (vdivps, vroundps to nearest
// even, NaN to -127), so the codes are the same bit for bit.
template <typename K>
void put(const float* x, int64_t D, K* dst, half* scale) {
  if constexpr (QUANT<K>) {
    float a = 0.0f;
    int64_t d = 0;
#if defined(__AVX__)
    using F = Vec<8>::f;
    using I = Vec<8>::i;
    F top{};
    for (; d + 8 <= D; d += 8) {
      F v = load<8>(x + d);
      I bits;
      std::memcpy(&bits, &v, sizeof v);
      bits &= 0x7fffffff;
      std::memcpy(&v, &bits, sizeof v);
      top = v > top ? v : top;  // a NaN lane keeps top, as the scalar comparison does
    }
    for (int l = 0; l < 8; ++l) a = top[l] > a ? top[l] : a;
#endif
    for (; d < D; ++d) a = std::fabs(x[d]) > a ? std::fabs(x[d]) : a;
    const half s = static_cast<half>(a > 0.0f ? a / 127.0f : 1.0f);
    const float sf = f(s);
    d = 0;
#if defined(__AVX__)
    for (; d + 8 <= D; d += 8) {
      const __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + d), _mm256_set1_ps(sf)),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      F c = (F)r;
      c = c > -127.0f ? c : F{} - 127.0f;
      c = c < 127.0f ? c : F{} + 127.0f;
      const Vec<8>::b codes = __builtin_convertvector(__builtin_convertvector(c, I), Vec<8>::b);
      std::memcpy(dst + d, &codes, sizeof codes);
    }
#endif
    for (; d < D; ++d)
      dst[d] = static_cast<int8_t>(std::fmin(std::fmax(std::nearbyint(x[d] / sf), -127.0f), 127.0f));
    *scale = s;
  } else {
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<K>(x[d]);
  }
}

// y[i] *= s[i] for n floats y and float16 s, NATIVE lanes at a time (GCC leaves the plain loop
// scalar, converting each s[i] apart).
void scale_by(float* y, const half* s, int64_t n) {
  int64_t i = 0;
  for (; i + NATIVE <= n; i += NATIVE) store<NATIVE>(y + i, load<NATIVE>(y + i) * load<NATIVE>(s + i));
  for (; i < n; ++i) y[i] *= f(s[i]);
}

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

// scores[r * ld + s] = q[r] . keys[s] for NR rows of q (float, [NR, D]) and n keys of type K, in
// L-lane vectors (L divides D); NR is a template argument so the accumulators stay in registers.
// int8 keys: q . codes, times the row's scale (kscale) once.
template <int L, int NR, typename K>
void scores_n(const float* q, const K* keys, const half* kscale, int64_t n, int64_t D, float* out, int64_t ld) {
  for (int64_t s = 0; s < n; ++s) {
    const K* k = keys + s * D;
    typename Vec<L>::f a[NR] = {};
    for (int64_t c = 0; c < D; c += L) {
      const auto kv = load<L>(k + c);
      for (int r = 0; r < NR; ++r) a[r] += load<L>(q + r * D + c) * kv;
    }
    if constexpr (QUANT<K>) {
      const float scale = f(kscale[s]);
      for (int r = 0; r < NR; ++r) out[r * ld + s] = hsum<L>(a[r]) * scale;
    } else {
      for (int r = 0; r < NR; ++r) out[r * ld + s] = hsum<L>(a[r]);
    }
  }
}

// acc[r] += sum_s p[r * ld + s] * vals[s] for NR rows ([NR, D] float accumulators). int8 values
// come with their scales already folded into p (unit() does that once per block).
template <int L, int NR, typename K>
void weighted_n(const float* p, int64_t ld, const K* vals, int64_t n, int64_t D, float* acc) {
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
template <int L, typename K>
void block(const float* q, int64_t nr, const K* keys, const half* kscale, const K* vals, int64_t n, int64_t D,
           float* sc, int64_t ld, float* acc, bool weigh) {
  if constexpr (L > 1) {
    if (D % L) return block<L / 2>(q, nr, keys, kscale, vals, n, D, sc, ld, acc, weigh);
  }
#define WGQA_ROWS(NR)                                     \
  case NR:                                                \
    if (weigh)                                            \
      weighted_n<L, NR>(sc, ld, vals, n, D, acc);         \
    else                                                  \
      scores_n<L, NR>(q, keys, kscale, n, D, sc, ld);     \
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

// The stretches [from[k], to[k]) of the score axis a block computes (sorted, disjoint); its
// other scores are neither computed nor read, their probabilities being exactly 0.
struct Spans {
  int64_t from[4], to[4];
  int n = 0;
  void add(int64_t a, int64_t b) {
    if (b > a) from[n] = a, to[n] = b, ++n;
  }
};

// Softmax in place over the scores of the spans plus the additive bias (type T), NATIVE lanes at a
// time. The sum gathers each exponential in lane i mod L, in increasing i, as over the whole axis:
// the skipped scores would only add exact zeros, so the result is the same bit for bit. A vector
// that a span covers only in part is padded with -inf (an exponential of 0).
template <typename T>
void softmax(float* x, const T* bias, const Spans& sp) {
  constexpr int L = NATIVE;
  using F = typename Vec<L>::f;
  F top = F{} - INFINITY;
  float m = -INFINITY;
  for (int k = 0; k < sp.n; ++k) {
    int64_t i = sp.from[k];
    for (; i + L <= sp.to[k]; i += L) {
      const F v = load<L>(x + i) + load<L>(bias + i);
      store<L>(x + i, v);
      top = v > top ? v : top;
    }
    for (; i < sp.to[k]; ++i) {
      x[i] += f(bias[i]);
      m = x[i] > m ? x[i] : m;
    }
  }
  for (int l = 0; l < L; ++l) m = top[l] > m ? top[l] : m;
  F sum{};
  for (int k = 0; k < sp.n; ++k) {
    const int64_t a = sp.from[k], b = sp.to[k];
    for (int64_t v = a - a % L; v < b; v += L) {
      if (v >= a && v + L <= b) {
        const F e = vexp<L>(load<L>(x + v) - m);
        store<L>(x + v, e);
        sum += e;
        continue;
      }
      float part[L];
      for (int l = 0; l < L; ++l) part[l] = v + l >= a && v + l < b ? x[v + l] - m : -INFINITY;
      const F e = vexp<L>(load<L>(part));
      sum += e;
      for (int l = 0; l < L; ++l)
        if (v + l >= a && v + l < b) x[v + l] = e[l];
    }
  }
  const float inv = 1.0f / hsum<L>(sum);
  for (int k = 0; k < sp.n; ++k)
    for (int64_t i = sp.from[k]; i < sp.to[k]; ++i) x[i] *= inv;
}

// One kv head's rows of a key or value cache tensor: n rows of D codes and, for int8, n scales.
template <typename K>
struct Rows {
  K* code;
  half* scale;  // null unless int8

  static Rows of(void* codes, void* scales, int64_t head, int64_t n, int64_t D) {
    return {static_cast<K*>(codes) + head * n * D, QUANT<K> ? static_cast<half*>(scales) + head * n : nullptr};
  }
  K* row(int64_t i, int64_t D) const { return code + i * D; }
  half* scale_at(int64_t i) const { return QUANT<K> ? scale + i : nullptr; }
};

// A thread's working buffers, kept across calls: a decode step would otherwise allocate (and zero)
// a dozen of them per unit.
template <typename K>
struct Scratch {
  std::vector<K> old_k, old_v;       // the entries the chunk overwrites: codes
  std::vector<half> old_ks, old_vs;  // and their scales (int8)
  std::vector<float> row, q, sc, acc;
  std::vector<float> old_m, mean, bias, ring_mass, pool_got;  // a pool's
  std::vector<int64_t> order;
  std::vector<char> moved;

  static Scratch& mine() {
    thread_local Scratch s;
    return s;
  }
};
template <typename T>
T* room(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
  return v.data();
}

// One part of the score axis (the S ring slots, the C overwritten entries, the Ss sinks): n rows of
// keys and values, with their row scales (int8), at offset `at`.
template <typename K>
struct Part {
  const K *keys, *vals;
  const half *kscale, *vscale;
  int64_t n, at;
};

// A bias at or below this hides its key: the plan's mask is half the type's lowest finite value
// (export/attention.py mask_value), real biases are 0.
template <typename A>
constexpr float HIDDEN = (std::is_same<A, half>::value ? -65504.0f : -3.40282347e38f) / 4;

// The slots [lo, hi) of part `pt` that some row of a block sees (bias rows b, stride L). A slot
// outside them is hidden from every row: when each row sees some key, its score sits at least
// |mask| - (score spread) below the row's maximum, so its exponential is exactly 0 (vexp) and
// skipping it changes no sum (leading and trailing zeros only), bit for bit. That is what spares
// the empty tail of a ring not yet full (the runtime grows S in steps of 64) and the ring copies
// of the sink positions. The ends are found NATIVE slots at a time, then slot by slot.
template <typename A, typename T, typename K>
void seen_span(const T* b, int64_t nr, int64_t L, const Part<K>& pt, int64_t& lo, int64_t& hi) {
  constexpr int V = NATIVE;
  const T* at = b + pt.at;
  auto seen = [&](int64_t i) {
    for (int64_t r = 0; r < nr; ++r)
      if (f(at[r * L + i]) > HIDDEN<A>) return true;
    return false;
  };
  auto seen_v = [&](int64_t i) {  // any of slots i .. i + V - 1
    auto top = load<V>(at + i);
    for (int64_t r = 1; r < nr; ++r) {
      const auto v = load<V>(at + r * L + i);
      top = v > top ? v : top;
    }
    bool any = false;
    for (int l = 0; l < V; ++l) any |= top[l] > HIDDEN<A>;
    return any;
  };
  for (lo = 0; lo + V <= pt.n && !seen_v(lo); lo += V) {}
  for (; lo < pt.n && !seen(lo); ++lo) {}
  for (hi = pt.n; hi - V >= lo && !seen_v(hi - V); hi -= V) {}
  for (; hi > lo && !seen(hi - 1); --hi) {}
}

template <typename A, typename K>
void unit(const Problem& p, int64_t u) {
  const int64_t b = u / p.Hkv, h = u % p.Hkv, C = p.C, D = p.D, S = p.S, G = p.Hq / p.Hkv, head = u;
  const int64_t Ss = p.Ss, R = G * C, L = S + C + Ss, width = (p.Hq + 2 * p.Hkv) * D, half_d = D / 2;
  const A* qkv = static_cast<const A*>(p.qkv) + b * C * width;
  const Rows<K> key = Rows<K>::of(p.key, p.key_scale, head, S, D);
  const Rows<K> value = Rows<K>::of(p.value, p.value_scale, head, S, D);
  const int64_t table = b * C * half_d;
  const A *cos_q = static_cast<const A*>(p.cos_q) + table, *sin_q = static_cast<const A*>(p.sin_q) + table;
  const A *cos_k = static_cast<const A*>(p.cos_k) + table, *sin_k = static_cast<const A*>(p.sin_k) + table;
  const int64_t* gather = p.gather_idx + head * C * D;
  const bool* keep = p.keep + b * C;
  const A* bias = static_cast<const A*>(p.bias) + b * R * L;
  Scratch<K>& w = Scratch<K>::mine();

  // (1) the entries the chunk overwrites, read before any write
  K *old_k = room(w.old_k, C * D), *old_v = room(w.old_v, C * D);
  half *old_ks = room(w.old_ks, C), *old_vs = room(w.old_vs, C);
  for (int64_t j = 0; j < C; ++j) {
    const int64_t slot = gather[j * D];
    std::memcpy(old_k + j * D, key.row(slot, D), D * sizeof(K));
    std::memcpy(old_v + j * D, value.row(slot, D), D * sizeof(K));
    if constexpr (QUANT<K>) old_ks[j] = key.scale[slot], old_vs[j] = value.scale[slot];
  }
  // (1b) with a pool: the P keys of highest mean mass among the pool's and the gathered entries
  // stay (ties to the lower index, the pool's first, as ONNX TopK); the k-th losing pool slot takes
  // the k-th winner; a winner's gathered copy is hidden below
  const int64_t P = p.P, L2 = L + P;
  char* moved = room(w.moved, C);
  std::fill(moved, moved + C, 0);
  const Rows<K> pool_key = P ? Rows<K>::of(p.pool_key, p.pool_key_scale, head, P, D) : Rows<K>{};
  const Rows<K> pool_value = P ? Rows<K>::of(p.pool_value, p.pool_value_scale, head, P, D) : Rows<K>{};
  float *ring_mass = nullptr, *pool_mass = nullptr;
  int64_t* pool_pos = nullptr;
  if (P) {
    ring_mass = p.mass + head * S, pool_mass = p.pool_mass + head * P, pool_pos = p.pool_pos + head * P;
    float *old_m = room(w.old_m, C), *mean = room(w.mean, P + C);
    const int64_t* old_pos = p.old_pos + b * C;
    for (int64_t j = 0; j < C; ++j) old_m[j] = ring_mass[gather[j * D]];
    for (int64_t j = 0; j < P + C; ++j) {
      const int64_t pos1 = j < P ? pool_pos[j] : old_pos[j - P];
      const float m = j < P ? pool_mass[j] : old_m[j - P];
      mean[j] = pos1 > 0 ? m / std::fmax(p.age_base[b] - static_cast<float>(pos1), 1.0f) : -INFINITY;
    }
    auto better = [&](int64_t x, int64_t y) { return mean[x] > mean[y] || (mean[x] == mean[y] && x < y); };
    if (C == 1) {  // decode: drop the one worst candidate, a single scan
      int64_t worst = 0;
      for (int64_t j = 1; j <= P; ++j) worst = better(worst, j) ? j : worst;
      mean[worst] = NAN;  // dropped (NaN marks it: kept ones are never NaN)
    } else {
      int64_t* order = room(w.order, P + C);
      for (int64_t j = 0; j < P + C; ++j) order[j] = j;
      std::nth_element(order, order + P, order + P + C, better);
      for (int64_t j = P; j < P + C; ++j) mean[order[j]] = NAN;
    }
    int64_t l = 0;
    for (int64_t j = 0; j < C; ++j) {
      if (std::isnan(mean[P + j])) continue;
      while (!std::isnan(mean[l])) ++l;  // the next losing pool slot
      std::memcpy(pool_key.row(l, D), old_k + j * D, D * sizeof(K));
      std::memcpy(pool_value.row(l, D), old_v + j * D, D * sizeof(K));
      if constexpr (QUANT<K>) pool_key.scale[l] = old_ks[j], pool_value.scale[l] = old_vs[j];
      pool_pos[l] = old_pos[j], pool_mass[l] = old_m[j], moved[j] = 1;
      ++l;
    }
  }
  // (2) the chunk's rotated keys and values (rounded to the activation type, as the function holds
  // them) at slot (write_at + j) mod S; padding keeps the old entry
  float* row = room(w.row, D);
  auto write = [&](int64_t j, const Rows<K>& k, const Rows<K>& v, int64_t slot) {
    const A* src = qkv + j * width + (p.Hq + h) * D;
    rope(src, cos_k + j * half_d, sin_k + j * half_d, D, row);
    for (int64_t d = 0; d < D; ++d) row[d] = f(static_cast<A>(row[d]));
    put(row, D, k.row(slot, D), k.scale_at(slot));
    for (int64_t d = 0; d < D; ++d) row[d] = f(src[p.Hkv * D + d]);
    put(row, D, v.row(slot, D), v.scale_at(slot));
  };
  for (int64_t j = 0; j < C; ++j)
    if (keep[j]) write(j, key, value, (p.write_at[b] + j) % S);
  const Rows<K> sink_key = Ss ? Rows<K>::of(p.sink_key, p.sink_key_scale, head, Ss, D) : Rows<K>{};
  const Rows<K> sink_value = Ss ? Rows<K>::of(p.sink_value, p.sink_value_scale, head, Ss, D) : Rows<K>{};
  for (int64_t s = 0; s < Ss; ++s)
    if (p.sink_new[b * Ss + s]) write(p.sink_src[(head * Ss + s) * D], sink_key, sink_value, s);
  const Part<K> parts[] = {{key.code, value.code, key.scale, value.scale, S, 0},
                           {old_k, old_v, old_ks, old_vs, C, S},
                           {sink_key.code, sink_value.code, sink_key.scale, sink_value.scale, Ss, S + C},
                           {pool_key.code, pool_value.code, pool_key.scale, pool_value.scale, P, L}};
  constexpr int NPARTS = 4;
  // the plan's bias, shared by the kv heads; a pool's is this head's own: the winners' gathered
  // copies hidden, the pool's empty slots hidden, its held keys seen by every query
  const A* bias_rows = bias;
  float* own = nullptr;
  if (P) {
    const float hide = (std::is_same<A, half>::value ? -65504.0f : -3.40282347e38f) / 2;  // mask_value
    own = room(w.bias, R * L2);
    for (int64_t r = 0; r < R; ++r) {
      float* o = own + r * L2;
      for (int64_t c = 0; c < L; ++c) o[c] = f(bias[r * L + c]);
      for (int64_t j = 0; j < C; ++j)
        if (moved[j]) o[S + j] += hide;
      for (int64_t j = 0; j < P; ++j) o[L + j] = pool_pos[j] > 0 ? 0.0f : hide;
    }
    float* got = room(w.ring_mass, S);
    std::fill(got, got + S, 0.0f);
    got = room(w.pool_got, P);
    std::fill(got, got + P, 0.0f);
  }
  // (3) queries of this kv head, rows g-major (r = g C + i), scaled by the tables
  float *q = room(w.q, R * D), *sc = room(w.sc, ROWS * L2), *acc = room(w.acc, ROWS * D);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i = 0; i < C; ++i)
      rope(qkv + i * width + (h * G + g) * D, cos_q + i * half_d, sin_q + i * half_d, D, &q[(g * C + i) * D]);
  A* out = static_cast<A*>(p.out) + b * C * p.Hq * D;
  auto attend = [&](const auto* bias_rows, int64_t ld) {  // the plan's bias (type A) or a pool's own (float)
    for (int64_t r0 = 0; r0 < R; r0 += ROWS) {
      const int64_t nr = R - r0 < ROWS ? R - r0 : ROWS;
      const float* qb = &q[r0 * D];
      const auto* bb = bias_rows + r0 * ld;
      // skip hidden slots only when every row sees some key (a padding row sees none: its softmax
      // is over masked scores alike, so every slot counts)
      bool skip = true;
      for (int64_t r = 0; r < nr && skip; ++r) {
        int64_t i = 0;
        while (i < ld && f(bb[r * ld + i]) <= HIDDEN<A>) ++i;
        skip = i < ld;
      }
      int64_t lo[NPARTS], hi[NPARTS];
      Spans spans;
      for (int k = 0; k < NPARTS; ++k) {
        const Part<K>& pt = parts[k];
        if (skip) {
          seen_span<A>(bb, nr, ld, pt, lo[k], hi[k]);
        } else {
          lo[k] = 0, hi[k] = pt.n;
        }
        spans.add(pt.at + lo[k], pt.at + hi[k]);
        if (hi[k] > lo[k])
          block<NATIVE>(qb, nr, pt.keys + lo[k] * D, QUANT<K> ? pt.kscale + lo[k] : nullptr, pt.vals + lo[k] * D,
                        hi[k] - lo[k], D, sc + pt.at + lo[k], ld, nullptr, false);
      }
      for (int64_t r = 0; r < nr; ++r) softmax(&sc[r * ld], bb + r * ld, spans);
      for (int64_t r = 0; r < nr && P; ++r) {  // the mass each ring and pool key got from the real queries
        const float wq = p.query_weight[b * R + r0 + r];
        if (wq == 0.0f) continue;
        for (int64_t i = lo[0]; i < hi[0]; ++i) w.ring_mass[i] += sc[r * ld + i] * wq;
        for (int64_t i = lo[3]; i < hi[3]; ++i) w.pool_got[i] += sc[r * ld + L + i] * wq;
      }
      std::fill(acc, acc + ROWS * D, 0.0f);
      for (int k = 0; k < NPARTS; ++k) {
        const Part<K>& pt = parts[k];
        if (hi[k] <= lo[k]) continue;
        float* pk = sc + pt.at + lo[k];
        if constexpr (QUANT<K>)  // p v' = (p s) codes: the value scales folded into the probabilities
          for (int64_t r = 0; r < nr; ++r) scale_by(pk + r * ld, pt.vscale + lo[k], hi[k] - lo[k]);
        block<NATIVE>(qb, nr, pt.keys + lo[k] * D, nullptr, pt.vals + lo[k] * D, hi[k] - lo[k], D, pk, ld, acc, true);
      }
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t g = (r0 + r) / C, i = (r0 + r) % C;
        A* o = out + i * p.Hq * D + (h * G + g) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<A>(acc[r * D + d]);
      }
    }
  };
  if (!P) return attend(bias_rows, L);
  attend(own, L2);
  const bool* written = p.written + b * S;  // the chunk's own keys start from what they got
  for (int64_t i = 0; i < S; ++i) ring_mass[i] = (written[i] ? 0.0f : ring_mass[i]) + w.ring_mass[i];
  for (int64_t j = 0; j < P; ++j) pool_mass[j] += w.pool_got[j];
}

}  // namespace

void WGQA_UNIT(const Problem& p, int64_t u) {
  switch (p.cache) {
    case Cache::F32:  // only under float32 activations (the glue registers no other pairing)
      return unit<float, float>(p, u);
    case Cache::F16:
      return p.half ? unit<half, half>(p, u) : unit<float, half>(p, u);
    case Cache::I8:
      return p.half ? unit<half, int8_t>(p, u) : unit<float, int8_t>(p, u);
  }
}

}  // namespace wgqa
