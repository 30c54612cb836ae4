// ONNX Runtime custom-op library: a native kernel for the model-local functions
// mistral_edge::WindowedGroupQueryAttention and its variants (export/attention.py,
// docs/graph-contract.md). ONNX Runtime consults custom-op registries before inlining a function,
// so a session that loads this library runs these nodes natively on the very same graph; other
// runtimes run the body.
// Registered exactly for the pairs of activation type (qkv, tables, bias, output) and cache type it
// computes: float32/float32, float16/float16 and float32 with a float16 cache for
// WindowedGroupQueryAttention and SinkWindowedGroupQueryAttention (two more cache tensors), and
// float32 or float16 activations over an int8 cache (codes plus one float16 scale per slot and kv
// head, docs/kernel.md) for WindowedGroupQueryAttentionInt8Cache and
// SinkWindowedGroupQueryAttentionInt8Cache, and the same for the pooled ops with sinks
// (PoolSinkWindowedGroupQueryAttention and its Int8Cache twin: a pool's masses and positions beside
// the cache). A pooled op without sinks has no kernel: its node runs the body. A node of any other pair finds no kernel, and ONNX
// Runtime refuses it rather than inline the body: runtime/session.py NATIVE_CACHES lists these pairs.
// Threads: one work unit per (batch row, kv head), run on the session's intra-op pool
// (KernelContext_ParallelFor), so the session's intra_op_num_threads holds.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#include <onnxruntime_lite_custom_op.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "wgqa.h"

namespace {

using Ort::Custom::Tensor;
using F16 = Ort::Float16_t;
const char* const OP = "WindowedGroupQueryAttention";

// The best variant the CPU has, chosen once when the library loads; MISTRAL_EDGE_KERNEL_ISA=avx2 or
// portable asks for a lesser one (tests run every variant this way).
wgqa::UnitFn pick_unit() {
  __builtin_cpu_init();
  const char* env = std::getenv("MISTRAL_EDGE_KERNEL_ISA");
  const std::string want = env ? env : "";
  if (want != "avx2" && want != "portable" && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return wgqa::unit_avx512;
  if (want != "portable" && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c"))
    return wgqa::unit_avx2;
  return wgqa::unit_portable;
}
const wgqa::UnitFn UNIT = pick_unit();

const char* isa_name() {
  return UNIT == wgqa::unit_avx512 ? "avx512" : UNIT == wgqa::unit_avx2 ? "avx2" : "portable";
}

Ort::Status fail(const std::string& what) {
  return Ort::Status((std::string(OP) + ": " + what).c_str(), ORT_INVALID_ARGUMENT);
}

bool shaped(const std::vector<int64_t>& got, const std::vector<int64_t>& want) { return got == want; }

std::atomic<uint64_t> calls{0};  // nodes computed, so tests can tell this kernel ran

void run_unit(void* job, size_t unit) {
  const auto& p = *static_cast<const wgqa::Problem*>(job);
  UNIT(p, static_cast<int64_t>(unit));
}

template <typename K>
constexpr wgqa::Cache cache_type() {
  return std::is_same<K, float>::value ? wgqa::Cache::F32 : std::is_same<K, F16>::value ? wgqa::Cache::F16 : wgqa::Cache::I8;
}

// present bound to past's buffer (the runtime's in-place binding) needs no copy
template <typename T>
T* keep_in_place(const Tensor<T>& past, Tensor<T>& present) {
  T* out = present.Allocate(past.Shape());
  if (out != past.Data()) std::memcpy(out, past.Data(), static_cast<size_t>(past.NumberOfElement()) * sizeof(T));
  return out;
}

// One cache tensor of a node: past (input) and present (output), with their float16 scales for an
// int8 cache (null otherwise).
template <typename K>
struct Store {
  const Tensor<K>& past;
  Tensor<K>& present;
  const Tensor<F16>* past_scale = nullptr;
  Tensor<F16>* present_scale = nullptr;

  // [B, Hkv, slots, D] codes, and [B, Hkv, slots, 1] scales where there are any
  bool shaped_as(const std::vector<int64_t>& codes) const {
    if (!shaped(past.Shape(), codes)) return false;
    return !past_scale || shaped(past_scale->Shape(), {codes[0], codes[1], codes[2], 1});
  }
  void* codes() const { return keep_in_place(past, present); }
  void* scales() const { return past_scale ? keep_in_place(*past_scale, *present_scale) : nullptr; }
};

template <typename A>
struct Plan {  // attention.PLAN_INPUTS
  const Tensor<A>& cos_q;
  const Tensor<A>& sin_q;
  const Tensor<A>& cos_k;
  const Tensor<A>& sin_k;
  const Tensor<int64_t>& write_at;
  const Tensor<int64_t>& gather_idx;
  const Tensor<bool>& keep;
  const Tensor<A>& bias;
  const Tensor<int64_t>& score_split;
};

// The sink half of a SinkWindowedGroupQueryAttention* node's inputs and outputs.
template <typename K>
struct Sinks {
  Store<K> key, value;
  const Tensor<int64_t>& src;
  const Tensor<bool>& fresh;
};

// The pool half of a PoolSinkWindowedGroupQueryAttention* node: the ring's masses, the pool's
// tensors, and the four pool plan tensors (attention.POOL_PLAN_INPUTS).
template <typename K>
struct Pool {
  const Tensor<float>& past_mass;
  Tensor<float>& present_mass;
  Store<K> key, value;
  const Tensor<float>& past_pool_mass;
  Tensor<float>& present_pool_mass;
  const Tensor<int64_t>& past_pool_pos;
  Tensor<int64_t>& present_pool_pos;
  const Tensor<float>& query_weight;
  const Tensor<int64_t>& old_pos;
  const Tensor<float>& age_base;
  const Tensor<bool>& written;
};

template <typename A, typename K>
Ort::Status compute(OrtKernelContext* ctx, const Tensor<A>& qkv, const Plan<A>& plan, Tensor<A>& output,
                    const Store<K>& key, const Store<K>& value, const Sinks<K>* sinks = nullptr,
                    const Pool<K>* pool = nullptr) {
  const auto& xs = qkv.Shape();
  const auto& cs = key.past.Shape();
  if (xs.size() != 3 || cs.size() != 4) return fail("qkv must be [B, C, (Hq+2Hkv) D] and past_key [B, Hkv, S, D]");
  const int64_t B = xs[0], C = xs[1], Hkv = cs[1], S = cs[2], D = cs[3];
  if (cs[0] != B || D <= 0 || D % 2 || Hkv <= 0 || C <= 0 || xs[2] % D || xs[2] / D <= 2 * Hkv)
    return fail("qkv and past_key shapes disagree");
  const int64_t Hq = xs[2] / D - 2 * Hkv, G = Hq / Hkv;
  if (Hq % Hkv) return fail("query heads are not a multiple of kv heads");
  if (!key.shaped_as(cs) || !value.shaped_as(cs))
    return fail("past_value's shape differs from past_key's, or a scale tensor is not [B, Hkv, S, 1]");
  for (const Tensor<A>* t : {&plan.cos_q, &plan.sin_q, &plan.cos_k, &plan.sin_k})
    if (!shaped(t->Shape(), {B, C, D / 2})) return fail("RoPE tables must be [B, C, D/2]");
  const int64_t Ss = sinks ? sinks->key.past.Shape().size() == 4 ? sinks->key.past.Shape()[2] : -1 : 0;
  if (sinks && (Ss <= 0 || !sinks->key.shaped_as({B, Hkv, Ss, D}) || !sinks->value.shaped_as({B, Hkv, Ss, D}) ||
                !shaped(sinks->src.Shape(), {B, Hkv, Ss, D}) || !shaped(sinks->fresh.Shape(), {B, 1, Ss, 1})))
    return fail("sink cache and sink plan tensors must be [B, Hkv, Ss, D] (Ss > 0, scales [B, Hkv, Ss, 1]) "
                "and [B, 1, Ss, 1]");
  const int64_t P = pool ? pool->key.past.Shape().size() == 4 ? pool->key.past.Shape()[2] : -1 : 0;
  if (pool && (P <= 0 || !pool->key.shaped_as({B, Hkv, P, D}) || !pool->value.shaped_as({B, Hkv, P, D}) ||
               !shaped(pool->past_mass.Shape(), {B, Hkv, S, 1}) || !shaped(pool->past_pool_mass.Shape(), {B, Hkv, P, 1}) ||
               !shaped(pool->past_pool_pos.Shape(), {B, Hkv, P, 1}) ||
               !shaped(pool->query_weight.Shape(), {B, 1, 1, G * C}) || !shaped(pool->old_pos.Shape(), {B, 1, C, 1}) ||
               !shaped(pool->age_base.Shape(), {B, 1, 1, 1}) || !shaped(pool->written.Shape(), {B, 1, S, 1})))
    return fail("pool cache and pool plan tensors do not match qkv and the cache (P > 0)");
  if (!shaped(plan.write_at.Shape(), {B}) || !shaped(plan.gather_idx.Shape(), {B, Hkv, C, D}) ||
      !shaped(plan.keep.Shape(), {B, 1, C, 1}) || !shaped(plan.bias.Shape(), {B, 1, G * C, S + C + Ss}) ||
      !shaped(plan.score_split.Shape(), {(sinks ? 3 : 2) + (pool ? 1 : 0)}))
    return fail("plan tensors do not match qkv and the cache");
  const int64_t* split = plan.score_split.Data();
  if (split[0] != S || split[1] != C || (sinks && split[2] != Ss) || (pool && split[3] != P))
    return fail("score_split must be (S, C[, Ss[, P]])");
  const int64_t* at = plan.write_at.Data();
  const int64_t* idx = plan.gather_idx.Data();
  for (int64_t b = 0; b < B; ++b)
    if (S > 0 ? (at[b] < 0 || at[b] >= S) : plan.keep.Data()[b * C]) return fail("write slot outside the cache");
  for (int64_t i = 0, n = plan.gather_idx.NumberOfElement(); i < n; i += D)
    if (idx[i] < 0 || idx[i] >= S) return fail("gather index outside the cache");
  if (sinks)
    for (int64_t i = 0, n = sinks->src.NumberOfElement(); i < n; i += D)
      if (sinks->src.Data()[i] < 0 || sinks->src.Data()[i] >= C) return fail("sink source outside the chunk");

  calls.fetch_add(1, std::memory_order_relaxed);
  wgqa::Problem p{};
  p.B = B, p.C = C, p.Hq = Hq, p.Hkv = Hkv, p.D = D, p.S = S;
  p.half = std::is_same<A, F16>::value;
  p.cache = cache_type<K>();
  p.qkv = qkv.Data();
  p.out = output.Allocate({B, C, Hq * D});
  p.key = key.codes(), p.key_scale = key.scales();
  p.value = value.codes(), p.value_scale = value.scales();
  p.cos_q = plan.cos_q.Data(), p.sin_q = plan.sin_q.Data(), p.cos_k = plan.cos_k.Data(), p.sin_k = plan.sin_k.Data();
  p.write_at = at, p.gather_idx = idx, p.keep = plan.keep.Data(), p.bias = plan.bias.Data();
  if (sinks) {
    p.Ss = Ss;
    p.sink_key = sinks->key.codes(), p.sink_key_scale = sinks->key.scales();
    p.sink_value = sinks->value.codes(), p.sink_value_scale = sinks->value.scales();
    p.sink_src = sinks->src.Data(), p.sink_new = sinks->fresh.Data();
  }
  if (pool) {
    p.P = P;
    p.pool_key = pool->key.codes(), p.pool_key_scale = pool->key.scales();
    p.pool_value = pool->value.codes(), p.pool_value_scale = pool->value.scales();
    p.mass = keep_in_place(pool->past_mass, pool->present_mass);
    p.pool_mass = keep_in_place(pool->past_pool_mass, pool->present_pool_mass);
    p.pool_pos = keep_in_place(pool->past_pool_pos, pool->present_pool_pos);
    p.query_weight = pool->query_weight.Data(), p.old_pos = pool->old_pos.Data();
    p.age_base = pool->age_base.Data(), p.written = pool->written.Data();
  }
  const size_t units = static_cast<size_t>(B * Hkv);
  if (units == 1 || S == 0) {
    for (size_t u = 0; u < units && S > 0; ++u) run_unit(&p, u);
    return Ort::Status{nullptr};
  }
  return Ort::Status{Ort::GetApi().KernelContext_ParallelFor(ctx, run_unit, units, 0, &p)};
}

// The four op signatures (inputs in the function's order), each for the type pairs registered below.
template <typename A, typename K>
Ort::Status plain(OrtKernelContext* ctx, const Tensor<A>& qkv, const Tensor<K>& past_key, const Tensor<K>& past_value,
                  const Tensor<A>& cos_q, const Tensor<A>& sin_q, const Tensor<A>& cos_k, const Tensor<A>& sin_k,
                  const Tensor<int64_t>& write_at, const Tensor<int64_t>& gather_idx, const Tensor<bool>& keep,
                  const Tensor<A>& bias, const Tensor<int64_t>& score_split, Tensor<A>& output, Tensor<K>& present_key,
                  Tensor<K>& present_value) {
  const Plan<A> plan{cos_q, sin_q, cos_k, sin_k, write_at, gather_idx, keep, bias, score_split};
  return compute<A, K>(ctx, qkv, plan, output, {past_key, present_key}, {past_value, present_value});
}

template <typename A, typename K>
Ort::Status with_sinks(OrtKernelContext* ctx, const Tensor<A>& qkv, const Tensor<K>& past_key,
                       const Tensor<K>& past_value, const Tensor<K>& past_sink_key, const Tensor<K>& past_sink_value,
                       const Tensor<A>& cos_q, const Tensor<A>& sin_q, const Tensor<A>& cos_k, const Tensor<A>& sin_k,
                       const Tensor<int64_t>& write_at, const Tensor<int64_t>& gather_idx, const Tensor<bool>& keep,
                       const Tensor<A>& bias, const Tensor<int64_t>& score_split, const Tensor<int64_t>& sink_src,
                       const Tensor<bool>& sink_new, Tensor<A>& output, Tensor<K>& present_key,
                       Tensor<K>& present_value, Tensor<K>& present_sink_key, Tensor<K>& present_sink_value) {
  const Plan<A> plan{cos_q, sin_q, cos_k, sin_k, write_at, gather_idx, keep, bias, score_split};
  const Sinks<K> sinks{{past_sink_key, present_sink_key}, {past_sink_value, present_sink_value}, sink_src, sink_new};
  return compute<A, K>(ctx, qkv, plan, output, {past_key, present_key}, {past_value, present_value}, &sinks);
}

using I8 = Tensor<int8_t>;
using Scale = Tensor<F16>;

template <typename A>
Ort::Status int8(OrtKernelContext* ctx, const Tensor<A>& qkv, const I8& past_key, const I8& past_value,
                 const Scale& past_key_scale, const Scale& past_value_scale, const Tensor<A>& cos_q,
                 const Tensor<A>& sin_q, const Tensor<A>& cos_k, const Tensor<A>& sin_k,
                 const Tensor<int64_t>& write_at, const Tensor<int64_t>& gather_idx, const Tensor<bool>& keep,
                 const Tensor<A>& bias, const Tensor<int64_t>& score_split, Tensor<A>& output, I8& present_key,
                 I8& present_value, Scale& present_key_scale, Scale& present_value_scale) {
  const Plan<A> plan{cos_q, sin_q, cos_k, sin_k, write_at, gather_idx, keep, bias, score_split};
  return compute<A, int8_t>(ctx, qkv, plan, output, {past_key, present_key, &past_key_scale, &present_key_scale},
                            {past_value, present_value, &past_value_scale, &present_value_scale});
}

template <typename A>
Ort::Status int8_with_sinks(
    OrtKernelContext* ctx, const Tensor<A>& qkv, const I8& past_key, const I8& past_value, const Scale& past_key_scale,
    const Scale& past_value_scale, const I8& past_sink_key, const I8& past_sink_value,
    const Scale& past_sink_key_scale, const Scale& past_sink_value_scale, const Tensor<A>& cos_q,
    const Tensor<A>& sin_q, const Tensor<A>& cos_k, const Tensor<A>& sin_k, const Tensor<int64_t>& write_at,
    const Tensor<int64_t>& gather_idx, const Tensor<bool>& keep, const Tensor<A>& bias,
    const Tensor<int64_t>& score_split, const Tensor<int64_t>& sink_src, const Tensor<bool>& sink_new,
    Tensor<A>& output, I8& present_key, I8& present_value, Scale& present_key_scale, Scale& present_value_scale,
    I8& present_sink_key, I8& present_sink_value, Scale& present_sink_key_scale, Scale& present_sink_value_scale) {
  const Plan<A> plan{cos_q, sin_q, cos_k, sin_k, write_at, gather_idx, keep, bias, score_split};
  const Sinks<int8_t> sinks{{past_sink_key, present_sink_key, &past_sink_key_scale, &present_sink_key_scale},
                            {past_sink_value, present_sink_value, &past_sink_value_scale, &present_sink_value_scale},
                            sink_src, sink_new};
  return compute<A, int8_t>(ctx, qkv, plan, output, {past_key, present_key, &past_key_scale, &present_key_scale},
                            {past_value, present_value, &past_value_scale, &present_value_scale}, &sinks);
}

template <typename A, typename K>
Ort::Status pooled(OrtKernelContext* ctx, const Tensor<A>& qkv, const Tensor<K>& past_key, const Tensor<K>& past_value,
                   const Tensor<K>& past_sink_key, const Tensor<K>& past_sink_value, const Tensor<float>& past_mass,
                   const Tensor<K>& past_pool_key, const Tensor<K>& past_pool_value,
                   const Tensor<float>& past_pool_mass, const Tensor<int64_t>& past_pool_pos, const Tensor<A>& cos_q,
                   const Tensor<A>& sin_q, const Tensor<A>& cos_k, const Tensor<A>& sin_k,
                   const Tensor<int64_t>& write_at, const Tensor<int64_t>& gather_idx, const Tensor<bool>& keep,
                   const Tensor<A>& bias, const Tensor<int64_t>& score_split, const Tensor<int64_t>& sink_src,
                   const Tensor<bool>& sink_new, const Tensor<float>& query_weight, const Tensor<int64_t>& old_pos,
                   const Tensor<float>& age_base, const Tensor<bool>& written, Tensor<A>& output,
                   Tensor<K>& present_key, Tensor<K>& present_value, Tensor<K>& present_sink_key,
                   Tensor<K>& present_sink_value, Tensor<float>& present_mass, Tensor<K>& present_pool_key,
                   Tensor<K>& present_pool_value, Tensor<float>& present_pool_mass,
                   Tensor<int64_t>& present_pool_pos) {
  const Plan<A> plan{cos_q, sin_q, cos_k, sin_k, write_at, gather_idx, keep, bias, score_split};
  const Sinks<K> sinks{{past_sink_key, present_sink_key}, {past_sink_value, present_sink_value}, sink_src, sink_new};
  const Pool<K> pool{past_mass, present_mass, {past_pool_key, present_pool_key}, {past_pool_value, present_pool_value},
                     past_pool_mass, present_pool_mass, past_pool_pos, present_pool_pos, query_weight, old_pos,
                     age_base, written};
  return compute<A, K>(ctx, qkv, plan, output, {past_key, present_key}, {past_value, present_value}, &sinks, &pool);
}

template <typename A>
Ort::Status int8_pooled(
    OrtKernelContext* ctx, const Tensor<A>& qkv, const I8& past_key, const I8& past_value, const Scale& past_key_scale,
    const Scale& past_value_scale, const I8& past_sink_key, const I8& past_sink_value,
    const Scale& past_sink_key_scale, const Scale& past_sink_value_scale, const Tensor<float>& past_mass,
    const I8& past_pool_key, const I8& past_pool_value, const Scale& past_pool_key_scale,
    const Scale& past_pool_value_scale, const Tensor<float>& past_pool_mass, const Tensor<int64_t>& past_pool_pos,
    const Tensor<A>& cos_q, const Tensor<A>& sin_q, const Tensor<A>& cos_k, const Tensor<A>& sin_k,
    const Tensor<int64_t>& write_at, const Tensor<int64_t>& gather_idx, const Tensor<bool>& keep, const Tensor<A>& bias,
    const Tensor<int64_t>& score_split, const Tensor<int64_t>& sink_src, const Tensor<bool>& sink_new,
    const Tensor<float>& query_weight, const Tensor<int64_t>& old_pos, const Tensor<float>& age_base,
    const Tensor<bool>& written, Tensor<A>& output, I8& present_key, I8& present_value, Scale& present_key_scale,
    Scale& present_value_scale, I8& present_sink_key, I8& present_sink_value, Scale& present_sink_key_scale,
    Scale& present_sink_value_scale, Tensor<float>& present_mass, I8& present_pool_key, I8& present_pool_value,
    Scale& present_pool_key_scale, Scale& present_pool_value_scale, Tensor<float>& present_pool_mass,
    Tensor<int64_t>& present_pool_pos) {
  const Plan<A> plan{cos_q, sin_q, cos_k, sin_k, write_at, gather_idx, keep, bias, score_split};
  const Sinks<int8_t> sinks{{past_sink_key, present_sink_key, &past_sink_key_scale, &present_sink_key_scale},
                            {past_sink_value, present_sink_value, &past_sink_value_scale, &present_sink_value_scale},
                            sink_src, sink_new};
  const Pool<int8_t> pool{past_mass, present_mass,
                          {past_pool_key, present_pool_key, &past_pool_key_scale, &present_pool_key_scale},
                          {past_pool_value, present_pool_value, &past_pool_value_scale, &present_pool_value_scale},
                          past_pool_mass, present_pool_mass, past_pool_pos, present_pool_pos, query_weight, old_pos,
                          age_base, written};
  return compute<A, int8_t>(ctx, qkv, plan, output, {past_key, present_key, &past_key_scale, &present_key_scale},
                            {past_value, present_value, &past_value_scale, &present_value_scale}, &sinks, &pool);
}

template <typename Fn>
Ort::Custom::OrtLiteCustomOp* op(const char* name, Fn fn) {
  return Ort::Custom::CreateLiteCustomOp(name, "CPUExecutionProvider", fn);
}

}  // namespace

extern "C" {

// Which compute variant the CPU got, for reports ("avx512", "avx2" or "portable").
__attribute__((visibility("default"))) const char* MistralEdgeWgqaIsa() { return isa_name(); }

// How many nodes this library has computed in this process.
__attribute__((visibility("default"))) uint64_t MistralEdgeWgqaCalls() { return calls.load(); }

__attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(OrtSessionOptions* options,
                                                                   const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (!api) return nullptr;  // an older runtime: register nothing, the function body runs
  Ort::InitApi(api);
  try {
    static std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>> ops;
    static Ort::CustomOpDomain domain = [] {
      const char *ring = OP, *sink = "SinkWindowedGroupQueryAttention";
      const char *ring8 = "WindowedGroupQueryAttentionInt8Cache", *sink8 = "SinkWindowedGroupQueryAttentionInt8Cache";
      ops.emplace_back(op(ring, plain<float, float>));
      ops.emplace_back(op(ring, plain<F16, F16>));
      ops.emplace_back(op(ring, plain<float, F16>));
      ops.emplace_back(op(sink, with_sinks<float, float>));
      ops.emplace_back(op(sink, with_sinks<F16, F16>));
      ops.emplace_back(op(sink, with_sinks<float, F16>));
      ops.emplace_back(op(ring8, int8<float>));
      ops.emplace_back(op(ring8, int8<F16>));
      ops.emplace_back(op(sink8, int8_with_sinks<float>));
      ops.emplace_back(op(sink8, int8_with_sinks<F16>));
      const char *pool = "PoolSinkWindowedGroupQueryAttention", *pool8 = "PoolSinkWindowedGroupQueryAttentionInt8Cache";
      ops.emplace_back(op(pool, pooled<float, float>));
      ops.emplace_back(op(pool, pooled<F16, F16>));
      ops.emplace_back(op(pool, pooled<float, F16>));
      ops.emplace_back(op(pool8, int8_pooled<float>));
      ops.emplace_back(op(pool8, int8_pooled<F16>));
      Ort::CustomOpDomain d{"mistral_edge"};
      for (const auto& o : ops) d.Add(o.get());
      return d;
    }();
    Ort::UnownedSessionOptions(options).Add(domain);
  } catch (const Ort::Exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}

}  // extern "C"
