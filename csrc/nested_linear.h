// Validation and operand geometry shared by the CPU and CUDA nested GEMM entry points.
#pragma once

#include <atomic>
#include <vector>

#include "checks.h"
#include "masked_tiles.h"
#include "nested_groups.h"

namespace flextron {

inline GroupWidths to_group_widths(const std::vector<int64_t>& widths) {
  GroupWidths out{};
  out.count = static_cast<int32_t>(widths.size());
  for (size_t g = 0; g < widths.size(); ++g) out.values[g] = static_cast<int32_t>(widths[g]);
  return out;
}

// a, b as the op receives them: (x, weight) for kNestedN/K, (grad_out, x) for the weight
// gradients. Returns the validated widths.
inline GroupWidths check_nested_inputs(NestedGemmKind kind, const at::Tensor& a,
                                       const at::Tensor& b, const at::Tensor& offsets,
                                       const at::Tensor& widths) {
  const bool forward = kind == NestedGemmKind::kNestedN || kind == NestedGemmKind::kNestedK;
  const char* a_name = forward ? "x" : "grad_out";
  const char* b_name = forward ? "weight" : "x";
  check_dtype_float(a, a_name);
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), a_name, " and ", b_name,
                   " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
  check_same_device(a, a_name, b, b_name);
  TORCH_CHECK_VALUE(a.dim() == 2, a_name, " must be 2-D, got shape ", a.sizes());
  TORCH_CHECK_VALUE(b.dim() == 2, b_name, " must be 2-D, got shape ", b.sizes());
  std::vector<int64_t> values;
  switch (kind) {
    case NestedGemmKind::kNestedN:  // x [M, K], weight [Nmax, K]
      TORCH_CHECK_VALUE(a.size(1) == b.size(1), "x [M, K] and weight [Nmax, K] must share K, got ",
                        a.sizes(), " and ", b.sizes());
      values = read_widths(widths, b.size(0), "weight rows Nmax");
      break;
    case NestedGemmKind::kNestedK:  // x [M, Kmax], weight [N, Kmax]
      TORCH_CHECK_VALUE(a.size(1) == b.size(1),
                        "x [M, Kmax] and weight [N, Kmax] must share Kmax, got ", a.sizes(),
                        " and ", b.sizes());
      values = read_widths(widths, a.size(1), "Kmax");
      break;
    case NestedGemmKind::kWeightGradN:  // grad_out [M, Nmax], x [M, K]
      TORCH_CHECK_VALUE(a.size(0) == b.size(0),
                        "grad_out [M, Nmax] and x [M, K] must share M, got ", a.sizes(), " and ",
                        b.sizes());
      values = read_widths(widths, a.size(1), "grad_out columns Nmax");
      break;
    case NestedGemmKind::kWeightGradK:  // grad_out [M, N], x [M, Kmax]
      TORCH_CHECK_VALUE(a.size(0) == b.size(0),
                        "grad_out [M, N] and x [M, Kmax] must share M, got ", a.sizes(), " and ",
                        b.sizes());
      values = read_widths(widths, b.size(1), "x columns Kmax");
      break;
  }
  check_offsets_shape(offsets, static_cast<int64_t>(values.size()), a);
  return to_group_widths(values);
}

// [M, Nmax], [M, N], [Nmax, K] or [N, Kmax].
inline std::vector<int64_t> nested_output_shape(NestedGemmKind kind, const at::Tensor& a,
                                                const at::Tensor& b) {
  const bool forward = kind == NestedGemmKind::kNestedN || kind == NestedGemmKind::kNestedK;
  return forward ? std::vector<int64_t>{a.size(0), b.size(0)}
                 : std::vector<int64_t>{a.size(1), b.size(1)};
}

// The grouped GEMM's view of the operands (nested_groups.h): a row-major with a unit column
// stride; b row-major for the weight gradients, and for kNestedN/K either layout (a weight,
// or its transposed view in the backward).
inline NestedOperands nested_operands(NestedGemmKind kind, const at::Tensor& a,
                                      const at::Tensor& b) {
  const auto out = nested_output_shape(kind, a, b);
  NestedOperands ops{};
  ops.rows = a.size(0);
  ops.lda = a.stride(0);
  ops.ldb = b.stride(1) == 1 ? b.stride(0) : b.stride(1);
  ops.ldd = out[1];
  ops.n_full = kind == NestedGemmKind::kWeightGradK ? a.size(1) : out[1];
  ops.k_full = a.size(1);
  return ops;
}

// The masked tiled GEMM's view of the operands (masked_tiles.h), at their strides. The
// column-band weight gradient (kWeightGradK) is the row-band one on swapped operands, written
// through a transposed output.
struct TiledOperands {
  MaskedGemmArgs args;
  at::Tensor a, b;
};

inline TiledOperands masked_gemm_args(NestedGemmKind kind, const at::Tensor& a, const at::Tensor& b,
                                      const at::Tensor& out) {
  MaskedGemmArgs p{};
  p.tokens = a.size(0);
  if (kind == NestedGemmKind::kNestedN || kind == NestedGemmKind::kNestedK) {
    // A(i, l) = x[i, l], B(j, l) = weight[j, l]
    p.kind = kind;
    p.a_row = a.stride(0), p.a_depth = a.stride(1), p.b_col = b.stride(0), p.b_depth = b.stride(1);
    p.out_row = out.stride(0), p.out_col = out.stride(1);
    p.rows = out.size(0), p.cols = out.size(1), p.depth = a.size(1);
    return {p, a, b};
  }
  const bool swap = kind == NestedGemmKind::kWeightGradK;
  const at::Tensor& rows_of = swap ? b : a;  // A(n, t) = rows_of[t, n]
  const at::Tensor& cols_of = swap ? a : b;  // B(k, t) = cols_of[t, k]
  p.kind = NestedGemmKind::kWeightGradN;
  p.a_row = rows_of.stride(1), p.a_depth = rows_of.stride(0);
  p.b_col = cols_of.stride(1), p.b_depth = cols_of.stride(0);
  p.out_row = out.stride(swap ? 1 : 0), p.out_col = out.stride(swap ? 0 : 1);
  p.rows = out.size(swap ? 1 : 0), p.cols = out.size(swap ? 0 : 1), p.depth = a.size(0);
  return {p, rows_of, cols_of};
}

// Token counts up to this run kNestedN/K on the GPU as one dense GEMM at the widest width
// (cuBLAS), reading each weight row once, instead of a grouped GEMM that reads the weight
// prefix once per group. Set from the GPU check's measurements; flextron._C changes it.
inline std::atomic<int64_t>& dense_rows_limit() {
  static std::atomic<int64_t> limit{64};
  return limit;
}

}  // namespace flextron
