// Validation shared by the CPU and CUDA nested GEMM entry points.
#pragma once

#include <vector>

#include "checks.h"

namespace flextron {

struct NestedProblem {
  std::vector<int64_t> widths;  // strictly decreasing, host copy
};

// Which operand dimension is nested, for error messages and bounds.
enum class NestedDim { kN, kK, kWeightGrad };

inline NestedProblem check_nested_inputs(const at::Tensor& a, const char* a_name,
                                         const at::Tensor& b, const char* b_name,
                                         const at::Tensor& offsets, const at::Tensor& widths,
                                         NestedDim dim) {
  check_dtype_float(a, a_name);
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), a_name, " and ", b_name,
              " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
  check_same_device(a, a_name, b, b_name);
  TORCH_CHECK(a.dim() == 2, a_name, " must be 2-D, got shape ", a.sizes());
  TORCH_CHECK(b.dim() == 2, b_name, " must be 2-D, got shape ", b.sizes());
  NestedProblem problem;
  switch (dim) {
    case NestedDim::kN:  // x [M, K], weight [Nmax, K]
      TORCH_CHECK(a.size(1) == b.size(1), "x [M, K] and weight [Nmax, K] must share K, got ",
                  a.sizes(), " and ", b.sizes());
      problem.widths = read_widths(widths, b.size(0), "weight rows Nmax");
      break;
    case NestedDim::kK:  // x [M, Kmax], weight [N, Kmax]
      TORCH_CHECK(a.size(1) == b.size(1), "x [M, Kmax] and weight [N, Kmax] must share Kmax, got ",
                  a.sizes(), " and ", b.sizes());
      problem.widths = read_widths(widths, a.size(1), "Kmax");
      break;
    case NestedDim::kWeightGrad:  // grad_out [M, Nmax], x [M, K]
      TORCH_CHECK(a.size(0) == b.size(0), "grad_out [M, Nmax] and x [M, K] must share M, got ",
                  a.sizes(), " and ", b.sizes());
      problem.widths = read_widths(widths, a.size(1), "grad_out columns Nmax");
      break;
  }
  check_offsets_shape(offsets, static_cast<int64_t>(problem.widths.size()), a);
  return problem;
}

}  // namespace flextron
