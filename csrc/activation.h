// Nested activations: the activation of the MLP's hidden block, computed only inside each
// row's width (zeros past it). The element math is shared by the CPU and CUDA kernels.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <string>

#include "checks.h"

namespace flextron {

enum class Activation : int { kSwiGLU = 0, kGelu = 1, kGeluTanh = 2 };

inline Activation parse_activation(const std::string& name) {
  if (name == "swiglu") return Activation::kSwiGLU;
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  TORCH_CHECK_VALUE(false, "activation must be 'swiglu', 'gelu' or 'gelu_tanh', got '", name, "'");
}

// Forward: swiglu = silu(gate) * h; gelu / gelu_tanh of h (gate unused).
template <typename T>
C10_HOST_DEVICE inline T activation_forward(Activation kind, T h, T gate) {
  if (kind == Activation::kSwiGLU) {
    const T sig = T(1) / (T(1) + std::exp(-gate));
    return gate * sig * h;
  }
  if (kind == Activation::kGelu) {
    return T(0.5) * h * (T(1) + std::erf(h * T(M_SQRT1_2)));
  }
  const T k = T(0.7978845608028654);  // sqrt(2 / pi)
  const T t = std::tanh(k * (h + T(0.044715) * h * h * h));
  return T(0.5) * h * (T(1) + t);
}

// Backward: d/dh and d/dgate of activation_forward, times grad.
template <typename T>
C10_HOST_DEVICE inline void activation_backward(Activation kind, T grad, T h, T gate, T* grad_h,
                                                T* grad_gate) {
  if (kind == Activation::kSwiGLU) {
    const T sig = T(1) / (T(1) + std::exp(-gate));
    *grad_h = grad * gate * sig;
    *grad_gate = grad * h * sig * (T(1) + gate * (T(1) - sig));
    return;
  }
  *grad_gate = T(0);
  if (kind == Activation::kGelu) {
    const T cdf = T(0.5) * (T(1) + std::erf(h * T(M_SQRT1_2)));
    const T pdf = std::exp(T(-0.5) * h * h) * T(0.3989422804014327);  // 1 / sqrt(2 pi)
    *grad_h = grad * (cdf + h * pdf);
    return;
  }
  const T k = T(0.7978845608028654);
  const T t = std::tanh(k * (h + T(0.044715) * h * h * h));
  *grad_h = grad * (T(0.5) * (T(1) + t) +
                    T(0.5) * h * (T(1) - t * t) * k * (T(1) + T(3) * T(0.044715) * h * h));
}

struct ActivationProblem {
  Activation kind;
  std::vector<int64_t> widths;
};

// h [M, D]; gate [M, D] for swiglu only; widths <= D.
inline ActivationProblem check_activation_inputs(const at::Tensor& h,
                                                 const std::optional<at::Tensor>& gate,
                                                 const at::Tensor& offsets,
                                                 const at::Tensor& widths,
                                                 const std::string& activation) {
  ActivationProblem problem{parse_activation(activation), {}};
  check_dtype_float(h, "h");
  TORCH_CHECK_VALUE(h.dim() == 2, "h must be 2-D [M, D], got shape ", h.sizes());
  if (problem.kind == Activation::kSwiGLU) {
    TORCH_CHECK_VALUE(gate.has_value(), "activation 'swiglu' needs gate");
    TORCH_CHECK_VALUE(gate->sizes() == h.sizes(), "gate must have the shape of h ", h.sizes(),
                      ", got ", gate->sizes());
    TORCH_CHECK_TYPE(gate->scalar_type() == h.scalar_type(),
                     "gate and h must have the same dtype, got ", gate->scalar_type(), " and ",
                     h.scalar_type());
    check_same_device(*gate, "gate", h, "h");
  } else {
    TORCH_CHECK_VALUE(!gate.has_value(),
                      "gate is only used by activation 'swiglu', got activation '", activation,
                      "'");
  }
  problem.widths = read_widths(widths, h.size(1), "D (h.size(1))");
  check_offsets_shape(offsets, static_cast<int64_t>(problem.widths.size()), h);
  return problem;
}

inline ActivationProblem check_activation_backward_inputs(
    const at::Tensor& grad, const at::Tensor& h, const std::optional<at::Tensor>& gate,
    const at::Tensor& offsets, const at::Tensor& widths, const std::string& activation) {
  auto problem = check_activation_inputs(h, gate, offsets, widths, activation);
  TORCH_CHECK_VALUE(grad.sizes() == h.sizes() && grad.scalar_type() == h.scalar_type(),
                    "grad must match h (", h.sizes(), ", ", h.scalar_type(), "), got ",
                    grad.sizes(), ", ", grad.scalar_type());
  check_same_device(grad, "grad", h, "h");
  return problem;
}

}  // namespace flextron
