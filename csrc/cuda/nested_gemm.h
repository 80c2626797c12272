// The nested grouped GEMMs behind nested_linear_n, nested_linear_k and nested_weight_grad,
// as launched on the GPU. Both backends (CUTLASS sm90, SIMT tiles) read group boundaries
// from device `offsets` and widths passed by value: no host sync, CUDA-graph safe.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include <vector>

#include "checks.h"

namespace flextron::cuda {

enum class NestedGemmKind {
  kNestedN,     // out[M, Nmax]: rows of group g = x @ w[:d_g].T (cols >= d_g untouched)
  kNestedK,     // out[M, N]:    rows of group g = x[:, :d_g] @ w[:, :d_g].T
  kWeightGrad,  // out[Nmax, K]: band [d_{g+1}, d_g) = dy[:P_g, band].T @ x[:P_g]
};

struct GroupWidths {
  int32_t count;
  int32_t values[kMaxGroups];
};

inline GroupWidths to_group_widths(const std::vector<int64_t>& widths) {
  GroupWidths out{};
  out.count = static_cast<int32_t>(widths.size());
  for (size_t g = 0; g < widths.size(); ++g) out.values[g] = static_cast<int32_t>(widths[g]);
  return out;
}

// Any float dtype, any architecture; writes every output element (zeros where masked).
void nested_gemm_simt(NestedGemmKind kind, const at::Tensor& a, const at::Tensor& b,
                      at::Tensor& out, const at::Tensor& offsets, const GroupWidths& widths,
                      cudaStream_t stream);

#ifdef FLEXTRON_HAS_SM90
// bf16/fp16 on sm_90a (TMA + wgmma, ptr-array grouped GEMM). Writes only the nested
// blocks: the caller zero-fills the rest. All widths and feature sizes must be multiples
// of 8 (16-byte TMA alignment).
void nested_gemm_sm90_bf16(NestedGemmKind kind, const at::Tensor& a, const at::Tensor& b,
                           at::Tensor& out, const at::Tensor& offsets, const GroupWidths& widths,
                           cudaStream_t stream);
void nested_gemm_sm90_fp16(NestedGemmKind kind, const at::Tensor& a, const at::Tensor& b,
                           at::Tensor& out, const at::Tensor& offsets, const GroupWidths& widths,
                           cudaStream_t stream);
#endif

// Group of a sorted row (token) from the offsets: groups are few, so a linear scan.
__device__ __forceinline__ int group_of_row(const int32_t* offsets, int groups, int64_t row) {
  int g = 0;
  while (g + 1 < groups && row >= offsets[g + 1]) ++g;
  return g;
}

}  // namespace flextron::cuda
