// CUDA entry points of nested_linear_n, nested_linear_k and nested_weight_grad: validate,
// then run bf16/fp16 on the CUTLASS sm90 grouped GEMM when the GPU is a Hopper, and every
// other case on the SIMT tiled kernel.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include "cuda/nested_gemm.h"
#include "nested_linear.h"

namespace flextron::cuda {
namespace {

constexpr int kAlign = 8;  // elements: 16-byte TMA alignment for 16-bit types

void check_gpu_alignment(const std::vector<int64_t>& widths,
                         std::initializer_list<std::pair<const char*, int64_t>> sizes) {
  for (const int64_t w : widths) {
    TORCH_CHECK(w % kAlign == 0, "on the GPU, widths must be multiples of ", kAlign, ", got ",
                at::IntArrayRef(widths));
  }
  for (const auto& [name, size] : sizes) {
    TORCH_CHECK(size % kAlign == 0, "on the GPU, ", name, " must be a multiple of ", kAlign,
                ", got ", size);
  }
}

// Contiguous and 16-byte aligned (TMA needs aligned base addresses): a contiguous view with
// an odd storage offset is copied to a fresh allocation.
at::Tensor aligned_contiguous(const at::Tensor& t) {
  auto c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

bool use_sm90(const at::Tensor& a) {
#ifdef FLEXTRON_HAS_SM90
  if (a.scalar_type() != at::kBFloat16 && a.scalar_type() != at::kHalf) return false;
  const auto* props = at::cuda::getDeviceProperties(a.device().index());
  return props->major == 9 && props->minor == 0;
#else
  return false;
#endif
}

void run_nested_gemm(NestedGemmKind kind, const at::Tensor& a, const at::Tensor& b, at::Tensor& out,
                     const at::Tensor& offsets, const std::vector<int64_t>& widths) {
  const auto group_widths = to_group_widths(widths);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
#ifdef FLEXTRON_HAS_SM90
  if (use_sm90(a)) {
    if (a.scalar_type() == at::kBFloat16) {
      nested_gemm_sm90_bf16(kind, a, b, out, offsets, group_widths, stream);
    } else {
      nested_gemm_sm90_fp16(kind, a, b, out, offsets, group_widths, stream);
    }
    return;
  }
#endif
  nested_gemm_simt(kind, a, b, out, offsets, group_widths, stream);
}

// Zeros in columns [d_g, Nmax) of the rows of group g: the part of nested_linear_n's output
// that the CUTLASS GEMM does not write.
template <typename vec_t>
__global__ void zero_tails_kernel(vec_t* __restrict__ out, int64_t rows, int64_t vecs_per_row,
                                  int elems_per_vec, const int32_t* __restrict__ offsets_global,
                                  GroupWidths widths) {
  __shared__ int32_t offsets[kMaxGroups + 1];
  for (int g = threadIdx.x; g <= widths.count; g += blockDim.x) offsets[g] = offsets_global[g];
  __syncthreads();
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t first = widths.values[group_of_row(offsets, widths.count, row)] / elems_per_vec;
    for (int64_t v = first + threadIdx.x; v < vecs_per_row; v += blockDim.x) {
      out[row * vecs_per_row + v] = vec_t{};
    }
  }
}

void zero_tails(at::Tensor& out, const at::Tensor& offsets, const std::vector<int64_t>& widths) {
  const int64_t rows = out.size(0);
  if (rows == 0 || widths[widths.size() - 1] == out.size(1)) return;
  // Rows, widths are multiples of 8 16-bit elements: whole 16-byte vectors.
  const int elems_per_vec = static_cast<int>(16 / out.element_size());
  const int blocks = static_cast<int>(std::min<int64_t>(rows, 65535));
  zero_tails_kernel<uint4><<<blocks, 128, 0, at::cuda::getCurrentCUDAStream()>>>(
      static_cast<uint4*>(out.data_ptr()), rows, out.size(1) / elems_per_vec, elems_per_vec,
      offsets.data_ptr<int32_t>(), to_group_widths(widths));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor nested_linear_n_cuda(const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& offsets, const at::Tensor& widths) {
  const auto problem = check_nested_inputs(x, "x", weight, "weight", offsets, widths, NestedDim::kN);
  check_gpu_alignment(problem.widths, {{"K (x.size(1))", x.size(1)}, {"Nmax (weight.size(0))", weight.size(0)}});
  const c10::cuda::CUDAGuard guard(x.device());
  const auto a = aligned_contiguous(x);
  const auto w = aligned_contiguous(weight);
  if (a.size(1) == 0) return at::zeros({a.size(0), w.size(0)}, a.options());
  auto out = at::empty({a.size(0), w.size(0)}, a.options());
  if (a.size(0) == 0) return out;
  run_nested_gemm(NestedGemmKind::kNestedN, a, w, out, offsets, problem.widths);
  if (use_sm90(a)) zero_tails(out, offsets, problem.widths);
  return out;
}

at::Tensor nested_linear_k_cuda(const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& offsets, const at::Tensor& widths) {
  const auto problem = check_nested_inputs(x, "x", weight, "weight", offsets, widths, NestedDim::kK);
  check_gpu_alignment(problem.widths, {{"Kmax (x.size(1))", x.size(1)}, {"N (weight.size(0))", weight.size(0)}});
  const c10::cuda::CUDAGuard guard(x.device());
  const auto a = aligned_contiguous(x);
  const auto w = aligned_contiguous(weight);
  auto out = at::empty({a.size(0), w.size(0)}, a.options());
  if (a.size(0) == 0 || w.size(0) == 0) return out;
  run_nested_gemm(NestedGemmKind::kNestedK, a, w, out, offsets, problem.widths);
  return out;
}

at::Tensor nested_weight_grad_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                   const at::Tensor& offsets, const at::Tensor& widths) {
  const auto problem =
      check_nested_inputs(grad_out, "grad_out", x, "x", offsets, widths, NestedDim::kWeightGrad);
  check_gpu_alignment(problem.widths, {{"Nmax (grad_out.size(1))", grad_out.size(1)}, {"K (x.size(1))", x.size(1)}});
  const c10::cuda::CUDAGuard guard(x.device());
  const auto dy = aligned_contiguous(grad_out);
  const auto a = aligned_contiguous(x);
  // Bands of empty token prefixes and rows past widths[0] receive no GEMM: start from zeros.
  auto out = at::zeros({dy.size(1), a.size(1)}, a.options());
  if (a.size(0) == 0 || a.size(1) == 0) return out;
  run_nested_gemm(NestedGemmKind::kWeightGrad, dy, a, out, offsets, problem.widths);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(flextron, CUDA, m) {
  m.impl("nested_linear_n", &nested_linear_n_cuda);
  m.impl("nested_linear_k", &nested_linear_k_cuda);
  m.impl("nested_weight_grad", &nested_weight_grad_cuda);
}

}  // namespace flextron::cuda
