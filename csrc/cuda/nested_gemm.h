// The nested grouped GEMM backends on the GPU. Both read group boundaries from device
// `offsets` and take widths by value: no host sync, CUDA-graph safe.
//   SIMT (nested_gemm_simt.cu): any float dtype, width, stride and architecture; writes every
//     output element (zeros where masked).
//   sm90 (nested_gemm_sm90.cuh): bf16/fp16 on sm_90a, TMA + wgmma; needs 16-byte aligned
//     operands, widths and leading dimensions (multiples of 8 elements). Writes the nested
//     blocks and zeroes skipped weight-gradient blocks; the caller zeroes the rest.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include <vector>

#include "nested_linear.h"

namespace flextron::cuda {

void nested_gemm_simt(NestedGemmKind kind, const at::Tensor& a, const at::Tensor& b,
                      at::Tensor& out, const at::Tensor& offsets, const GroupWidths& widths,
                      cudaStream_t stream);

// Operand layouts of the sm90 instantiations.
enum class OperandLayout {
  kForward,           // nested_linear_n/k: x row-major, weight [N, K] row-major (K-major B)
  kTransposedWeight,  // nested_linear_n/k on weight.t() (the backward), read in place
  kWeightGrad,        // nested_weight_grad(_k): grad_out and x row-major, read transposed
};

template <at::ScalarType dtype, OperandLayout layout>
void nested_gemm_sm90(NestedGemmKind kind, const at::Tensor& a, const at::Tensor& b,
                      at::Tensor& out, const at::Tensor& offsets, const GroupWidths& widths,
                      const NestedOperands& ops, cudaStream_t stream);

// CUTLASS's host-side check of these problems (no GPU needed).
template <at::ScalarType dtype, OperandLayout layout>
bool sm90_can_implement(const std::vector<GroupProblem>& problems);

}  // namespace flextron::cuda
