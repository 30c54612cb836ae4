// The problem one WindowedGroupQueryAttention node solves, shared by the ORT glue (wgqa.cc) and the
// compute variants (wgqa_impl.cc, compiled once per instruction set).
#pragma once
#include <cstdint>

namespace wgqa {

// Storage type of the cache tensors (docs/kernel.md): the activation type, float16 under float32
// activations, or int8 codes with one float16 scale per slot and kv head.
enum class Cache { F32, F16, I8 };

struct Problem {
  int64_t B, C, Hq, Hkv, D, S;  // batch, chunk, query heads, kv heads, head dim, cache slots
  bool half;                     // activation type (qkv, tables, bias, output): float16 when true, float32 otherwise
  Cache cache;                   // storage type of key, value, sink_key, sink_value
  const void* qkv;               // [B, C, (Hq + 2 Hkv) D], before RoPE
  void* key;                     // present_key [B, Hkv, S, D], holding past_key on entry
  void* value;                   // present_value, likewise
  void* key_scale;               // int8 cache: present_key_scale [B, Hkv, S, 1] float16 (null otherwise)
  void* value_scale;
  const void *cos_q, *sin_q, *cos_k, *sin_k;  // [B, C, D/2]
  const int64_t* write_at;       // [B]
  const int64_t* gather_idx;     // [B, Hkv, C, D]
  const bool* keep;              // [B, 1, C, 1]
  const void* bias;              // [B, 1, G C, S + C + Ss]
  void* out;                     // [B, C, Hq D]
  // attention sinks (SinkWindowedGroupQueryAttention; Ss = 0 and null pointers otherwise)
  int64_t Ss;                    // sink slots
  void* sink_key;                // present_sink_key [B, Hkv, Ss, D], holding past_sink_key on entry
  void* sink_value;
  void* sink_key_scale;          // int8 cache: [B, Hkv, Ss, 1]
  void* sink_value_scale;
  const int64_t* sink_src;       // [B, Hkv, Ss, D] chunk index each sink slot takes
  const bool* sink_new;          // [B, 1, Ss, 1] sink slots this chunk writes
  // a pool (PoolSinkWindowedGroupQueryAttention; P = 0 and null pointers otherwise)
  int64_t P;                     // pool slots
  void* pool_key;                // present_pool_key [B, Hkv, P, D], holding past_pool_key on entry
  void* pool_value;
  void* pool_key_scale;          // int8 cache: [B, Hkv, P, 1]
  void* pool_value_scale;
  float* mass;                   // present_mass [B, Hkv, S, 1], holding past_mass on entry
  float* pool_mass;              // present_pool_mass [B, Hkv, P, 1], likewise
  int64_t* pool_pos;             // present_pool_pos [B, Hkv, P, 1]: position + 1, 0 empty
  const float* query_weight;     // [B, 1, 1, G C]
  const int64_t* old_pos;        // [B, 1, C, 1]
  const float* age_base;         // [B, 1, 1, 1]
  const bool* written;           // [B, 1, S, 1]
};

// Solves one (batch row, kv head) unit, unit = b * Hkv + h. Units touch disjoint cache slices.
using UnitFn = void (*)(const Problem&, int64_t unit);
void unit_avx512(const Problem&, int64_t);
void unit_avx2(const Problem&, int64_t);
void unit_portable(const Problem&, int64_t);

}  // namespace wgqa
