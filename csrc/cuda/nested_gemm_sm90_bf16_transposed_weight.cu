// The sm90 nested grouped GEMM for bf16, operand layout kTransposedWeight (one instantiation per
// file so they compile in parallel).
#include "cuda/nested_gemm_sm90.cuh"

FLEXTRON_INSTANTIATE_SM90(at::kBFloat16, flextron::cuda::OperandLayout::kTransposedWeight)
