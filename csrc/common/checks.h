// Input checks shared by every linattn operator. Each failure raises a c10::Error (a Python
// RuntimeError) whose message names the operator, the argument, what was expected and what
// was given, so that a bad call never reaches a kernel that could read or write out of bounds.
//
// Sizes are read as SymInts: the same checks then run in the real kernels (concrete sizes)
// and in the Meta kernels that torch.compile's fake tensors trace with symbolic sizes, so the
// two can never disagree about what is a valid call.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>
#include <vector>

namespace linattn {

inline std::string shape_str(const at::Tensor& t) {
  return c10::str(t.sym_sizes());
}

inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              op, ": ", name, " must be float32, float64, float16 or bfloat16, got ", st);
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim,
                      const char* layout) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be a ", dim, "-D tensor ", layout,
              ", got shape ", shape_str(t));
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t,
                              const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " and ", ref_name,
              " must be on the same device, got ", t.device(), " and ", ref.device());
}

inline void check_same_device_dtype(const char* op, const char* name, const at::Tensor& t,
                                    const char* ref_name, const at::Tensor& ref) {
  check_same_device(op, name, t, ref_name, ref);
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " and ", ref_name,
              " must have the same dtype, got ", t.scalar_type(), " and ", ref.scalar_type());
}

inline void check_shape(const char* op, const char* name, const at::Tensor& t,
                        c10::SymIntArrayRef expected, const char* meaning) {
  TORCH_CHECK(t.sym_sizes() == expected, op, ": ", name, " must have shape ", expected, " ", meaning,
              ", got ", shape_str(t));
}

// q, k and v's ranks, dtypes and devices (k and v's layout named `kv_layout` in messages).
inline void check_qkv_tensors(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const char* kv_layout) {
  check_dim(op, "q", q, 4, "(B, H, T, D)");
  check_dim(op, "k", k, 4, kv_layout);
  check_dim(op, "v", v, 4, kv_layout);
  check_floating(op, "q", q);
  check_same_device_dtype(op, "k", k, "q", q);
  check_same_device_dtype(op, "v", v, "q", q);
}

// q and k's head dims agree, and k and v's lengths.
inline void check_qkv_dims(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.sym_size(3) == k.sym_size(3), op, ": q and k must have the same head dim, got q ",
              shape_str(q), " and k ", shape_str(k));
  TORCH_CHECK(k.sym_size(2) == v.sym_size(2), op, ": k and v must have the same length, got k ",
              shape_str(k), " and v ", shape_str(v));
}

// q (B, H, T_q, D), k (B, H, T_k, D), v (B, H, T_k, dv): one floating dtype, one device.
inline void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_qkv_tensors(op, q, k, v, "(B, H, T, D)");
  TORCH_CHECK(q.sym_size(0) == k.sym_size(0) && q.sym_size(1) == k.sym_size(1) &&
                  k.sym_size(0) == v.sym_size(0) && k.sym_size(1) == v.sym_size(1),
              op, ": q, k and v must share batch and head dims, got q ", shape_str(q), ", k ",
              shape_str(k), " and v ", shape_str(v));
  check_qkv_dims(op, q, k, v);
}

// As check_qkv, with grouped-query heads: k and v may have fewer heads than q, H_kv dividing H
// (query head h reads key/value head h / (H / H_kv); grouped-query and multi-query attention).
inline void check_grouped_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_qkv_tensors(op, q, k, v, "(B, H_kv, T, D)");
  TORCH_CHECK(q.sym_size(0) == k.sym_size(0) && k.sym_size(0) == v.sym_size(0) && k.sym_size(1) == v.sym_size(1),
              op, ": q, k and v must share the batch dim, and k and v the head dim, got q ", shape_str(q), ", k ",
              shape_str(k), " and v ", shape_str(v));
  const c10::SymInt& heads = q.sym_size(1);
  const c10::SymInt& kv_heads = k.sym_size(1);
  TORCH_CHECK(kv_heads == heads || (kv_heads > 0 && heads % kv_heads == 0), op,
              ": q's heads must be a multiple of k and v's (grouped-query attention), got q ", shape_str(q),
              " and k ", shape_str(k));
  check_qkv_dims(op, q, k, v);
}

// A per-key bool mask (B, T_k) on q's device (key padding, Longformer's global tokens).
inline void check_key_mask(const char* op, const char* name, const std::optional<at::Tensor>& mask,
                           const at::Tensor& q, const at::Tensor& k, const char* meaning) {
  if (!mask.has_value()) return;
  check_same_device(op, name, *mask, "q", q);
  TORCH_CHECK(mask->scalar_type() == at::kBool, op, ": ", name, " must be a bool tensor (", meaning,
              "), got ", mask->scalar_type());
  check_shape(op, name, *mask, {k.sym_size(0), k.sym_size(2)}, "(B, T_k)");
}

// cu_seqlens of a packed batch (flash-attn's convention): int32 offsets (N + 1,) on q's device.
// Returns N, the number of sequences (symbolic under fake tensors).
inline c10::SymInt check_cu_seqlens(const char* op, const at::Tensor& cu_seqlens, const at::Tensor& q) {
  check_same_device(op, "cu_seqlens", cu_seqlens, "q", q);
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kInt, op, ": cu_seqlens must be int32 offsets (N + 1,), ",
              "got ", cu_seqlens.scalar_type());
  check_dim(op, "cu_seqlens", cu_seqlens, 1, "(N + 1,)");
  TORCH_CHECK(cu_seqlens.sym_size(0) >= 1, op, ": cu_seqlens needs at least one offset (N + 1,), got ",
              shape_str(cu_seqlens));
  return cu_seqlens.sym_size(0) - 1;
}

// The offsets of a packing, read on the host (a copy, and so a sync, for device tensors) and
// checked: 0 first, non-decreasing, `total` last.
inline std::vector<int64_t> read_packed_offsets(const char* op, const at::Tensor& cu_seqlens, int64_t total) {
  const at::Tensor cu = cu_seqlens.to(at::kCPU).contiguous();
  const int32_t* p = cu.const_data_ptr<int32_t>();
  std::vector<int64_t> offsets(p, p + cu.numel());
  TORCH_CHECK(offsets.front() == 0 && offsets.back() == total, op,
              ": cu_seqlens must start at 0 and end at the packed length ", total, ", got ",
              offsets.front(), " ... ", offsets.back());
  for (size_t n = 1; n < offsets.size(); ++n)
    TORCH_CHECK(offsets[n] >= offsets[n - 1], op, ": cu_seqlens must be non-decreasing, got ", offsets[n - 1],
                " then ", offsets[n], " at index ", n);
  return offsets;
}

// States and normalizers accumulate in float32, or float64 for float64 inputs.
inline at::ScalarType accumulate_type(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_state(const char* op, const char* name, const at::Tensor& state,
                        const at::Tensor& like, c10::SymIntArrayRef expected) {
  check_same_device(op, name, state, "q", like);
  const auto acc = accumulate_type(like.scalar_type());
  TORCH_CHECK(state.scalar_type() == acc, op, ": ", name, " must be ", acc, " for ",
              like.scalar_type(), " inputs, got ", state.scalar_type());
  check_shape(op, name, state, expected, "(B, H, m, dv + 1)");
}

}  // namespace linattn
