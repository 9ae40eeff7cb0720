// What the operators' C++ autograd (linear_attention/autograd.cpp, restricted_softmax/autograd.cpp)
// shares: calling an operator below autograd, optional tensors in and out of saved variables,
// and the Autograd kernel of a backward operator, which has no derivative of its own.
//
// Why C++: torch.library's Python autograd costs a round trip through the interpreter on every
// call (microseconds, the whole cost of a small call on a GPU). A Function registered for the
// Autograd key runs in the dispatcher; torch.compile traces it like any ATen op's autograd.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>

#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace linattn {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

inline std::optional<at::Tensor> optional_of(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

inline at::Tensor saved_of(const std::optional<at::Tensor>& t) {
  return t.has_value() ? *t : at::Tensor();
}

// The typed handle of linattn::<name>, looked up once per name.
template <typename Signature>
c10::TypedOperatorHandle<Signature> linattn_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

inline const char* kNoDoubleBackward =
    "linattn: second derivatives (double backward) are not implemented; the first-order gradient "
    "is exact. Differentiate it once (create_graph=False), or use method='softmax' / torch's "
    "attention where higher-order gradients are needed";

namespace detail {

// How torch holds a graph node: c10::intrusive_ptr since torch 2.13 or so, std::shared_ptr before
// (torch 2.11 on the GPU machines here); the edge's pointer type says which this build has.
using NodePtr = decltype(torch::autograd::Edge::function);

template <typename NodeType, typename... A>
NodePtr make_node(A&&... args) {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>) {
    return std::make_shared<NodeType>(std::forward<A>(args)...);
  } else {
    return c10::make_intrusive<NodeType>(std::forward<A>(args)...);
  }
}

template <typename Tuple, size_t... I>
void attach(Tuple& results, const NodePtr& node,
            std::index_sequence<I...>) {
  (torch::autograd::set_history(std::get<I>(results), node), ...);
}

inline bool tracked(const at::Tensor& t) { return t.defined() && t.requires_grad(); }
inline bool tracked(const std::optional<at::Tensor>& t) { return t.has_value() && tracked(*t); }
template <typename T>
bool tracked(const T&) { return false; }  // ints, floats, bools

inline void collect_tracked(std::vector<at::Tensor>& out, const at::Tensor& t) {
  if (tracked(t)) out.push_back(t);
}
inline void collect_tracked(std::vector<at::Tensor>& out, const std::optional<at::Tensor>& t) {
  if (tracked(t)) out.push_back(*t);
}
template <typename T>
void collect_tracked(std::vector<at::Tensor>&, const T&) {}

}  // namespace detail

// Whether a call must be recorded for backward: grad mode on and some tensor argument requiring
// a gradient. The Autograd kernels skip the Function (its node, saved variables and options)
// when not: inference and no_grad calls then cost what the kernel costs.
template <typename... Args>
bool needs_graph(const Args&... args) {
  return at::GradMode::is_enabled() && (detail::tracked(args) || ...);
}

// Calls op below autograd (an Autograd kernel's call when no graph is needed).
template <typename Signature, typename... Args>
auto call_below_autograd(const c10::TypedOperatorHandle<Signature>& op, const Args&... args) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(args...);
}

// The Autograd kernel of a backward operator: it runs the operator below autograd; when its
// gradients are themselves being differentiated (create_graph=True), their history is a node
// that raises kNoDoubleBackward instead of a silent zero second derivative.
template <const char* Name, typename Signature>
struct FirstOrderOnly;

template <const char* Name, typename... Outs, typename... Args>
struct FirstOrderOnly<Name, std::tuple<Outs...>(Args...)> {
  static std::tuple<Outs...> call(Args... args) {
    static const auto op = linattn_op<std::tuple<Outs...>(Args...)>(Name);
    std::vector<at::Tensor> tracked;
    if (at::GradMode::is_enabled()) (detail::collect_tracked(tracked, args), ...);
    std::tuple<Outs...> results;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      results = op.call(args...);
    }
    if (!tracked.empty()) {
      detail::NodePtr node = detail::make_node<torch::autograd::Error>(
          kNoDoubleBackward, torch::autograd::collect_next_edges(at::ArrayRef<at::Tensor>(tracked)));
      detail::attach(results, node, std::index_sequence_for<Outs...>{});
    }
    return results;
  }
};

}  // namespace linattn
