// CPU kernels of nested_activation and its backward: per group, ATen's vectorized
// activation on the [rows of g, :d_g] block, written in place into the output; zeros past
// each width.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "activation.h"

namespace flextron {
namespace {

c10::string_view gelu_approximation(Activation kind) {
  return kind == Activation::kGeluTanh ? "tanh" : "none";
}

at::Tensor nested_activation_cpu(const at::Tensor& h, const std::optional<at::Tensor>& gate,
                                 const at::Tensor& offsets, const at::Tensor& widths,
                                 c10::string_view activation) {
  const auto problem = check_activation_inputs(h, gate, offsets, widths, std::string(activation));
  const auto bounds = read_offsets_cpu(offsets, h.size(0));
  const auto hc = h.contiguous();
  auto out = at::empty_like(hc);
  for (size_t g = 0; g < problem.widths.size(); ++g) {
    const int64_t start = bounds[g], rows = bounds[g + 1] - bounds[g], d = problem.widths[g];
    if (rows == 0) continue;
    auto rows_out = out.narrow(0, start, rows);
    auto block = rows_out.narrow(1, 0, d);
    const auto h_block = hc.narrow(0, start, rows).narrow(1, 0, d);
    if (problem.kind == Activation::kSwiGLU) {
      at::mul_out(block, at::silu(gate->narrow(0, start, rows).narrow(1, 0, d)), h_block);
    } else {
      at::gelu_out(block, h_block, gelu_approximation(problem.kind));
    }
    rows_out.narrow(1, d, hc.size(1) - d).zero_();
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> nested_activation_backward_cpu(
    const at::Tensor& grad, const at::Tensor& h, const std::optional<at::Tensor>& gate,
    const at::Tensor& offsets, const at::Tensor& widths, c10::string_view activation) {
  const auto problem =
      check_activation_backward_inputs(grad, h, gate, offsets, widths, std::string(activation));
  const auto bounds = read_offsets_cpu(offsets, h.size(0));
  const int64_t cols = h.size(1);
  auto grad_h = at::zeros_like(h, at::MemoryFormat::Contiguous);
  auto grad_gate = gate.has_value() ? at::zeros_like(h, at::MemoryFormat::Contiguous)
                                    : at::empty({0}, h.options());
  for (size_t g = 0; g < problem.widths.size(); ++g) {
    const int64_t start = bounds[g], rows = bounds[g + 1] - bounds[g], d = problem.widths[g];
    if (rows == 0 || d == 0 || cols == 0) continue;
    const auto slice = [&](const at::Tensor& t) {
      return t.narrow(0, start, rows).narrow(1, 0, d);
    };
    auto dh = slice(grad_h);
    const auto dy = slice(grad);
    if (problem.kind == Activation::kSwiGLU) {
      const auto gate_block = slice(*gate);
      at::mul_out(dh, dy, at::silu(gate_block));
      auto dg = slice(grad_gate);
      dg.copy_(at::silu_backward(dy * slice(h), gate_block));
    } else {
      dh.copy_(at::gelu_backward(dy, slice(h), gelu_approximation(problem.kind)));
    }
  }
  return {grad_h, grad_gate};
}

}  // namespace

TORCH_LIBRARY_IMPL(flextron, CPU, m) {
  m.impl("nested_activation", &nested_activation_cpu);
  m.impl("nested_activation_backward", &nested_activation_backward_cpu);
}

}  // namespace flextron
