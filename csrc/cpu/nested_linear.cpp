// CPU kernels of the nested GEMMs: one BLAS call (at::mm_out) per group on weight slices.
// BLAS parallelises each call; groups run one after another.
#include <torch/library.h>

#include "nested_linear.h"

namespace flextron {
namespace {

// BLAS takes a row-major or a column-major operand as it is: a transposed weight view (the
// backward passes weight.t()) is read in place instead of copied.
at::Tensor blas_operand(const at::Tensor& t) {
  return t.stride(1) == 1 || t.stride(0) == 1 ? t : t.contiguous();
}

at::Tensor nested_linear_n_cpu(const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& offsets, const at::Tensor& widths) {
  const auto problem = check_nested_inputs(x, "x", weight, "weight", offsets, widths, NestedDim::kN);
  const auto bounds = read_offsets_cpu(offsets, x.size(0));
  const auto a = x.contiguous();
  const auto w = blas_operand(weight);
  auto out = at::empty({a.size(0), w.size(0)}, a.options());
  for (size_t g = 0; g < problem.widths.size(); ++g) {
    const int64_t start = bounds[g], rows = bounds[g + 1] - bounds[g], d = problem.widths[g];
    if (rows == 0) continue;
    auto out_rows = out.narrow(0, start, rows);
    if (a.size(1) == 0) {
      out_rows.narrow(1, 0, d).zero_();
    } else {
      auto out_block = out_rows.narrow(1, 0, d);
      at::mm_out(out_block, a.narrow(0, start, rows), w.narrow(0, 0, d).t());
    }
    out_rows.narrow(1, d, w.size(0) - d).zero_();
  }
  return out;
}

at::Tensor nested_linear_k_cpu(const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& offsets, const at::Tensor& widths) {
  const auto problem = check_nested_inputs(x, "x", weight, "weight", offsets, widths, NestedDim::kK);
  const auto bounds = read_offsets_cpu(offsets, x.size(0));
  const auto a = x.contiguous();
  const auto w = blas_operand(weight);
  auto out = at::empty({a.size(0), w.size(0)}, a.options());
  for (size_t g = 0; g < problem.widths.size(); ++g) {
    const int64_t start = bounds[g], rows = bounds[g + 1] - bounds[g], d = problem.widths[g];
    if (rows == 0) continue;
    auto out_block = out.narrow(0, start, rows);
    at::mm_out(out_block, a.narrow(0, start, rows).narrow(1, 0, d), w.narrow(1, 0, d).t());
  }
  return out;
}

// Staircase: the row band [d_{g+1}, d_g) of the weight is used by the tokens of groups 0..g,
// which are the sorted prefix [0, offsets[g+1]). Each band is written once, by one GEMM.
at::Tensor nested_weight_grad_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                  const at::Tensor& offsets, const at::Tensor& widths) {
  const auto problem =
      check_nested_inputs(grad_out, "grad_out", x, "x", offsets, widths, NestedDim::kWeightGrad);
  const auto bounds = read_offsets_cpu(offsets, x.size(0));
  const auto dy = grad_out.contiguous();
  const auto a = x.contiguous();
  auto out = at::zeros({dy.size(1), a.size(1)}, a.options());
  const int64_t groups = static_cast<int64_t>(problem.widths.size());
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t band_end = problem.widths[g];
    const int64_t band_start = g + 1 < groups ? problem.widths[g + 1] : 0;
    const int64_t prefix = bounds[g + 1];
    if (prefix == 0 || a.size(1) == 0) continue;
    const auto dy_band = dy.narrow(0, 0, prefix).narrow(1, band_start, band_end - band_start);
    auto out_band = out.narrow(0, band_start, band_end - band_start);
    at::mm_out(out_band, dy_band.t(), a.narrow(0, 0, prefix));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(flextron, CPU, m) {
  m.impl("nested_linear_n", &nested_linear_n_cpu);
  m.impl("nested_linear_k", &nested_linear_k_cpu);
  m.impl("nested_weight_grad", &nested_weight_grad_cpu);
}

}  // namespace flextron
