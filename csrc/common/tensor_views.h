// Raw views of ATen tensors for the CPU kernels' pointer/stride interfaces.
#pragma once

#include "strided.h"

#include <ATen/core/Tensor.h>

#include <optional>

namespace linattn {

template <typename T>
Strided4<const T> view_of(const at::Tensor& t) {
  Strided4<const T> s;
  s.data = t.const_data_ptr<T>();
  for (int i = 0; i < 4; ++i) s.stride[i] = t.stride(i);
  return s;
}

// Nullable pointer to the data of a tensor that may be undefined (already contiguous).
template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// Nullable pointer to the contiguous data of an optional tensor (a state or a mask);
// keep_alive holds the contiguous copy when one was needed.
template <typename T>
const T* optional_ptr(const std::optional<at::Tensor>& t, at::Tensor& keep_alive) {
  if (!t.has_value()) return nullptr;
  keep_alive = t->contiguous();
  return keep_alive.const_data_ptr<T>();
}

}  // namespace linattn
