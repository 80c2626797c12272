// fp16 instantiations of the sm90 nested grouped GEMMs (one .cu per dtype so they compile
// in parallel).
#include <cutlass/half.h>

#include "cuda/nested_gemm_sm90.cuh"

namespace flextron::cuda {

void nested_gemm_sm90_fp16(NestedGemmKind kind, const at::Tensor& a, const at::Tensor& b,
                           at::Tensor& out, const at::Tensor& offsets, const GroupWidths& widths,
                           cudaStream_t stream) {
  sm90::dispatch<cutlass::half_t>(kind, a, b, out, offsets, widths, stream);
}

}  // namespace flextron::cuda
