// ONNX Runtime custom-op library: a native kernel for the model-local function
// mistral_edge::WindowedGroupQueryAttention (export/attention.py, docs/graph-contract.md).
// ONNX Runtime consults custom-op registries before inlining a function, so a session that loads
// this library runs these nodes natively on the very same graph; other runtimes run the body.
// Registered for float32 and float16 (one op per type), without and with attention sinks
// (SinkWindowedGroupQueryAttention: two more cache tensors); a node of any other type finds no kernel
// and ONNX Runtime inlines the function body as it would without the library.
// Threads: one work unit per (batch row, kv head), run on the session's intra-op pool
// (KernelContext_ParallelFor), so the session's intra_op_num_threads holds.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#include <onnxruntime_lite_custom_op.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <memory>
#include <string>
#include <vector>

#include "wgqa.h"

namespace {

using Ort::Custom::Tensor;
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

struct Job {
  wgqa::Problem p;
};

void run_unit(void* job, size_t unit) { UNIT(static_cast<Job*>(job)->p, static_cast<int64_t>(unit)); }

// The sink half of a SinkWindowedGroupQueryAttention node's inputs and outputs.
template <typename T>
struct Sinks {
  const Tensor<T>& past_key;
  const Tensor<T>& past_value;
  const Tensor<int64_t>& src;
  const Tensor<bool>& fresh;
  Tensor<T>& present_key;
  Tensor<T>& present_value;
};

// present bound to past's buffer (the runtime's in-place binding) needs no copy
template <typename T>
T* keep_in_place(const Tensor<T>& past, Tensor<T>& present) {
  T* out = present.Allocate(past.Shape());
  if (out != past.Data()) std::memcpy(out, past.Data(), static_cast<size_t>(past.NumberOfElement()) * sizeof(T));
  return out;
}

template <typename T>
Ort::Status compute(OrtKernelContext* ctx, const Tensor<T>& qkv, const Tensor<T>& past_key,
                    const Tensor<T>& past_value, const Tensor<T>& cos_q, const Tensor<T>& sin_q,
                    const Tensor<T>& cos_k, const Tensor<T>& sin_k, const Tensor<int64_t>& write_at,
                    const Tensor<int64_t>& gather_idx, const Tensor<bool>& keep, const Tensor<T>& bias,
                    const Tensor<int64_t>& score_split, Tensor<T>& output, Tensor<T>& present_key,
                    Tensor<T>& present_value, const Sinks<T>* sinks = nullptr) {
  const auto& xs = qkv.Shape();
  const auto& cs = past_key.Shape();
  if (xs.size() != 3 || cs.size() != 4) return fail("qkv must be [B, C, (Hq+2Hkv) D] and past_key [B, Hkv, S, D]");
  const int64_t B = xs[0], C = xs[1], Hkv = cs[1], S = cs[2], D = cs[3];
  if (cs[0] != B || D <= 0 || D % 2 || Hkv <= 0 || C <= 0 || xs[2] % D || xs[2] / D <= 2 * Hkv)
    return fail("qkv and past_key shapes disagree");
  const int64_t Hq = xs[2] / D - 2 * Hkv, G = Hq / Hkv;
  if (Hq % Hkv) return fail("query heads are not a multiple of kv heads");
  if (!shaped(past_value.Shape(), cs)) return fail("past_value's shape differs from past_key's");
  for (const Tensor<T>* t : {&cos_q, &sin_q, &cos_k, &sin_k})
    if (!shaped(t->Shape(), {B, C, D / 2})) return fail("RoPE tables must be [B, C, D/2]");
  const int64_t Ss = sinks ? sinks->past_key.Shape().size() == 4 ? sinks->past_key.Shape()[2] : -1 : 0;
  if (sinks && (Ss <= 0 || !shaped(sinks->past_key.Shape(), {B, Hkv, Ss, D}) ||
                !shaped(sinks->past_value.Shape(), {B, Hkv, Ss, D}) || !shaped(sinks->src.Shape(), {B, Hkv, Ss, D}) ||
                !shaped(sinks->fresh.Shape(), {B, 1, Ss, 1})))
    return fail("sink cache and sink plan tensors must be [B, Hkv, Ss, D] (Ss > 0) and [B, 1, Ss, 1]");
  if (!shaped(write_at.Shape(), {B}) || !shaped(gather_idx.Shape(), {B, Hkv, C, D}) ||
      !shaped(keep.Shape(), {B, 1, C, 1}) || !shaped(bias.Shape(), {B, 1, G * C, S + C + Ss}) ||
      !shaped(score_split.Shape(), {sinks ? 3 : 2}))
    return fail("plan tensors do not match qkv and the cache");
  const int64_t* split = score_split.Data();
  if (split[0] != S || split[1] != C || (sinks && split[2] != Ss)) return fail("score_split must be (S, C[, Ss])");
  const int64_t* at = write_at.Data();
  const int64_t* idx = gather_idx.Data();
  for (int64_t b = 0; b < B; ++b)
    if (S > 0 ? (at[b] < 0 || at[b] >= S) : keep.Data()[b * C]) return fail("write slot outside the cache");
  for (int64_t i = 0, n = gather_idx.NumberOfElement(); i < n; i += D)
    if (idx[i] < 0 || idx[i] >= S) return fail("gather index outside the cache");
  if (sinks)
    for (int64_t i = 0, n = sinks->src.NumberOfElement(); i < n; i += D)
      if (sinks->src.Data()[i] < 0 || sinks->src.Data()[i] >= C) return fail("sink source outside the chunk");

  calls.fetch_add(1, std::memory_order_relaxed);
  T* out = output.Allocate({B, C, Hq * D});
  T* key = keep_in_place(past_key, present_key);
  T* value = keep_in_place(past_value, present_value);
  T* sink_key = sinks ? keep_in_place(sinks->past_key, sinks->present_key) : nullptr;
  T* sink_value = sinks ? keep_in_place(sinks->past_value, sinks->present_value) : nullptr;

  Job job{{B, C, Hq, Hkv, D, S, !std::is_same<T, float>::value, qkv.Data(), key, value, cos_q.Data(),
           sin_q.Data(), cos_k.Data(), sin_k.Data(), at, idx, keep.Data(), bias.Data(), out, Ss, sink_key,
           sink_value, sinks ? sinks->src.Data() : nullptr, sinks ? sinks->fresh.Data() : nullptr}};
  const size_t units = static_cast<size_t>(B * Hkv);
  if (units == 1 || S == 0) {
    for (size_t u = 0; u < units && S > 0; ++u) run_unit(&job, u);
    return Ort::Status{nullptr};
  }
  return Ort::Status{Ort::GetApi().KernelContext_ParallelFor(ctx, run_unit, units, 0, &job)};
}

Ort::Status compute_f32(OrtKernelContext* ctx, const Tensor<float>& a, const Tensor<float>& b,
                        const Tensor<float>& c, const Tensor<float>& d, const Tensor<float>& e,
                        const Tensor<float>& f, const Tensor<float>& g, const Tensor<int64_t>& h,
                        const Tensor<int64_t>& i, const Tensor<bool>& j, const Tensor<float>& k,
                        const Tensor<int64_t>& l, Tensor<float>& o1, Tensor<float>& o2, Tensor<float>& o3) {
  return compute<float>(ctx, a, b, c, d, e, f, g, h, i, j, k, l, o1, o2, o3);
}

using F16 = Ort::Float16_t;
Ort::Status compute_f16(OrtKernelContext* ctx, const Tensor<F16>& a, const Tensor<F16>& b, const Tensor<F16>& c,
                        const Tensor<F16>& d, const Tensor<F16>& e, const Tensor<F16>& f, const Tensor<F16>& g,
                        const Tensor<int64_t>& h, const Tensor<int64_t>& i, const Tensor<bool>& j,
                        const Tensor<F16>& k, const Tensor<int64_t>& l, Tensor<F16>& o1, Tensor<F16>& o2,
                        Tensor<F16>& o3) {
  return compute<F16>(ctx, a, b, c, d, e, f, g, h, i, j, k, l, o1, o2, o3);
}

template <typename T>
Ort::Status compute_sinks(OrtKernelContext* ctx, const Tensor<T>& qkv, const Tensor<T>& past_key,
                          const Tensor<T>& past_value, const Tensor<T>& past_sink_key,
                          const Tensor<T>& past_sink_value, const Tensor<T>& cos_q, const Tensor<T>& sin_q,
                          const Tensor<T>& cos_k, const Tensor<T>& sin_k, const Tensor<int64_t>& write_at,
                          const Tensor<int64_t>& gather_idx, const Tensor<bool>& keep, const Tensor<T>& bias,
                          const Tensor<int64_t>& score_split, const Tensor<int64_t>& sink_src,
                          const Tensor<bool>& sink_new, Tensor<T>& output, Tensor<T>& present_key,
                          Tensor<T>& present_value, Tensor<T>& present_sink_key, Tensor<T>& present_sink_value) {
  const Sinks<T> sinks{past_sink_key, past_sink_value, sink_src, sink_new, present_sink_key, present_sink_value};
  return compute<T>(ctx, qkv, past_key, past_value, cos_q, sin_q, cos_k, sin_k, write_at, gather_idx, keep, bias,
                    score_split, output, present_key, present_value, &sinks);
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
  static std::unique_ptr<Ort::Custom::OrtLiteCustomOp> f32{
      Ort::Custom::CreateLiteCustomOp("WindowedGroupQueryAttention", "CPUExecutionProvider", compute_f32)};
  static std::unique_ptr<Ort::Custom::OrtLiteCustomOp> f16{
      Ort::Custom::CreateLiteCustomOp("WindowedGroupQueryAttention", "CPUExecutionProvider", compute_f16)};
  static std::unique_ptr<Ort::Custom::OrtLiteCustomOp> sinks_f32{Ort::Custom::CreateLiteCustomOp(
      "SinkWindowedGroupQueryAttention", "CPUExecutionProvider", compute_sinks<float>)};
  static std::unique_ptr<Ort::Custom::OrtLiteCustomOp> sinks_f16{Ort::Custom::CreateLiteCustomOp(
      "SinkWindowedGroupQueryAttention", "CPUExecutionProvider", compute_sinks<F16>)};
  try {
    static Ort::CustomOpDomain domain = [] {
      Ort::CustomOpDomain d{"mistral_edge"};
      d.Add(f32.get());
      d.Add(f16.get());
      d.Add(sinks_f32.get());
      d.Add(sinks_f16.get());
      return d;
    }();
    Ort::UnownedSessionOptions(options).Add(domain);
  } catch (const Ort::Exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}

}  // extern "C"
