// CUDA entry points of nested_linear_n, nested_linear_k, nested_weight_grad and
// nested_weight_grad_k. The dispatch rule, per call:
//   1. nested_linear_n/k with at most dense_rows_limit() tokens: one dense cuBLAS GEMM at the
//      widest width (each weight row read once; a grouped GEMM would read the weight prefix
//      once per group), with each row's tail masked;
//   2. bf16/fp16 on sm_90 with 16-byte aligned widths and leading dimensions: the CUTLASS
//      grouped GEMM (sm90), operands read in place in either weight layout;
//   3. everything else: the SIMT masked tiled kernel (any dtype, width and strides).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include "cuda/nested_gemm.h"

namespace flextron::cuda {
namespace {

constexpr int64_t kTmaElements = 8;  // 16 bytes of a 16-bit type

bool is_hopper(const at::Tensor& t) {
  const auto* props = at::cuda::getDeviceProperties(t.device().index());
  return props->major == 9 && props->minor == 0;
}

bool tma_aligned(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// A row-major operand with a 16-byte aligned base and leading dimension, else a copy into a
// fresh allocation (aligned, leading dimension = columns; contiguous() would keep a one-row
// view's odd stride).
at::Tensor tma_row_major(const at::Tensor& t) {
  if (t.stride(1) == 1 && t.stride(0) % kTmaElements == 0 && tma_aligned(t)) return t;
  return at::empty(t.sizes(), t.options()).copy_(t);
}

// A weight in either layout with aligned base and leading dimension, else a row-major copy.
at::Tensor tma_weight(const at::Tensor& w) {
  const bool k_major = w.stride(1) == 1 && w.stride(0) % kTmaElements == 0;
  const bool n_major = w.stride(0) == 1 && w.stride(1) % kTmaElements == 0;
  return (k_major || n_major) && tma_aligned(w) ? w : tma_row_major(w);
}

// Whether the sm90 kernel can run this call: dtype, architecture, and 16-byte aligned
// extents (TMA). Widths that are not multiples of 8 run on the SIMT kernel, with a warning.
bool use_sm90(NestedGemmKind kind, const at::Tensor& a, const at::Tensor& b,
              const GroupWidths& widths) {
#ifdef FLEXTRON_HAS_SM90
  if (a.scalar_type() != at::kBFloat16 && a.scalar_type() != at::kHalf) return false;
  if (!is_hopper(a)) return false;
  // The unit-stride extents: K, N (and Nmax) for nested_linear_n/k; for the weight gradients
  // the feature sizes, not the token count (their contraction, a strided mode).
  const bool forward = kind == NestedGemmKind::kNestedN || kind == NestedGemmKind::kNestedK;
  bool aligned = a.size(1) % kTmaElements == 0 && b.size(1) % kTmaElements == 0 &&
                 (!forward || b.size(0) % kTmaElements == 0);
  for (int g = 0; g < widths.count; ++g) aligned = aligned && widths.values[g] % kTmaElements == 0;
  if (!aligned) {
    TORCH_WARN_ONCE(
        "flextron: nested GEMM shapes or widths that are not multiples "
        "of 8 run on the slower SIMT kernel (the sm90 TMA kernel needs 16-byte "
        "alignment); got ",
        a.sizes(), ", ", b.sizes());
  }
  return aligned;
#else
  return false;
#endif
}

#ifdef FLEXTRON_HAS_SM90
template <at::ScalarType dtype>
void run_sm90_typed(NestedGemmKind kind, const at::Tensor& a, const at::Tensor& b, at::Tensor& out,
                    const at::Tensor& offsets, const GroupWidths& widths, cudaStream_t stream) {
  const auto ops = nested_operands(kind, a, b);
  if (kind == NestedGemmKind::kWeightGradN || kind == NestedGemmKind::kWeightGradK) {
    nested_gemm_sm90<dtype, OperandLayout::kWeightGrad>(kind, a, b, out, offsets, widths, ops,
                                                        stream);
  } else if (b.stride(1) == 1) {
    nested_gemm_sm90<dtype, OperandLayout::kForward>(kind, a, b, out, offsets, widths, ops, stream);
  } else {
    nested_gemm_sm90<dtype, OperandLayout::kTransposedWeight>(kind, a, b, out, offsets, widths, ops,
                                                              stream);
  }
}
#endif

void zero_tails(at::Tensor& out, const at::Tensor& offsets, const GroupWidths& widths);

#ifdef FLEXTRON_HAS_SM90
// The sm90 backend and its output contract: operands copied where TMA needs alignment, the
// rows/columns past widths[0] of a weight gradient zeroed (the kernel writes the bands), and
// for nested_linear_n the tails past each row's width zeroed when asked.
void run_sm90(NestedGemmKind kind, const at::Tensor& a, const at::Tensor& b, at::Tensor& out,
              const at::Tensor& offsets, const GroupWidths& widths, bool zero_tails_out) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool weight_grad =
      kind == NestedGemmKind::kWeightGradN || kind == NestedGemmKind::kWeightGradK;
  const auto a_tma = tma_row_major(a);
  const auto b_tma = weight_grad ? tma_row_major(b) : tma_weight(b);
  if (weight_grad) {
    const int dim = kind == NestedGemmKind::kWeightGradN ? 0 : 1;
    out.narrow(dim, widths.values[0], out.size(dim) - widths.values[0]).zero_();
  }
  if (a.scalar_type() == at::kBFloat16) {
    run_sm90_typed<at::kBFloat16>(kind, a_tma, b_tma, out, offsets, widths, stream);
  } else {
    run_sm90_typed<at::kHalf>(kind, a_tma, b_tma, out, offsets, widths, stream);
  }
  if (kind == NestedGemmKind::kNestedN && zero_tails_out) zero_tails(out, offsets, widths);
}
#endif

// The grouped GEMM on the first backend that can run it; each writes every element of
// `out` the op's contract defines (the SIMT kernel takes any dtype, width and strides and
// writes the zeros itself).
void run_grouped(NestedGemmKind kind, const at::Tensor& a, const at::Tensor& b, at::Tensor& out,
                 const at::Tensor& offsets, const GroupWidths& widths, bool zero_tails_out) {
#ifdef FLEXTRON_HAS_SM90
  if (use_sm90(kind, a, b, widths)) {
    run_sm90(kind, a, b, out, offsets, widths, zero_tails_out);
    return;
  }
#endif
  nested_gemm_simt(kind, a, b, out, offsets, widths, at::cuda::getCurrentCUDAStream());
}

// Zeros columns [width of the row's group, cols) of every row. Any dtype and width: 16-byte
// stores where the row, widths and base allow, element stores otherwise.
template <typename store_t>
__global__ void zero_tails_kernel(store_t* __restrict__ out, int64_t rows, int64_t row_stores,
                                  int elements_per_store,
                                  const int32_t* __restrict__ offsets_global, GroupWidths widths) {
  __shared__ int32_t offsets[kMaxGroups + 1];
  for (int g = threadIdx.x; g <= widths.count; g += blockDim.x) offsets[g] = offsets_global[g];
  __syncthreads();
  const bool valid = offsets_valid(offsets, widths.count, rows);
  CUDA_KERNEL_ASSERT(valid && "offsets must start at 0, not decrease and end at M");
  if (!valid) return;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t first =
        widths.values[group_of_row(offsets, widths.count, row)] / elements_per_store;
    for (int64_t v = first + threadIdx.x; v < row_stores; v += blockDim.x) {
      out[row * row_stores + v] = store_t{};
    }
  }
}

void zero_tails(at::Tensor& out, const at::Tensor& offsets, const GroupWidths& widths) {
  const int64_t rows = out.size(0), cols = out.size(1);
  if (rows == 0 || widths.values[widths.count - 1] == cols) return;
  const int64_t element = out.element_size();
  bool vectors =
      reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0 && (cols * element) % 16 == 0;
  for (int g = 0; g < widths.count; ++g)
    vectors = vectors && (widths.values[g] * element) % 16 == 0;
  const int blocks = static_cast<int>(std::min<int64_t>(rows, 65535));
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int32_t* bounds = offsets.data_ptr<int32_t>();
  if (vectors) {
    const int per_store = static_cast<int>(16 / element);
    zero_tails_kernel<uint4><<<blocks, 128, 0, stream>>>(
        static_cast<uint4*>(out.data_ptr()), rows, cols / per_store, per_store, bounds, widths);
  } else if (element == 2) {
    zero_tails_kernel<uint16_t><<<blocks, 128, 0, stream>>>(static_cast<uint16_t*>(out.data_ptr()),
                                                            rows, cols, 1, bounds, widths);
  } else if (element == 4) {
    zero_tails_kernel<uint32_t><<<blocks, 128, 0, stream>>>(static_cast<uint32_t*>(out.data_ptr()),
                                                            rows, cols, 1, bounds, widths);
  } else {
    zero_tails_kernel<uint64_t><<<blocks, 128, 0, stream>>>(static_cast<uint64_t*>(out.data_ptr()),
                                                            rows, cols, 1, bounds, widths);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool use_dense(const at::Tensor& x) {
  return x.size(0) <= dense_rows_limit().load(std::memory_order_relaxed);
}

at::Tensor nested_linear_n_cuda(const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& offsets_in, const at::Tensor& widths_in,
                                bool zero_tails_out) {
  const auto widths =
      check_nested_inputs(NestedGemmKind::kNestedN, x, weight, offsets_in, widths_in);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto offsets = offsets_in.contiguous();
  auto out = at::empty({x.size(0), weight.size(0)}, x.options());
  if (x.size(0) == 0) return out;
  if (x.size(1) == 0) return out.zero_();
  if (!use_dense(x)) {
    run_grouped(NestedGemmKind::kNestedN, x, weight, out, offsets, widths, zero_tails_out);
    return out;
  }
  // Dense: columns [width, widths[0]) hold full-width values until zeroed.
  auto head = out.narrow(1, 0, widths.values[0]);
  at::mm_out(head, x, weight.narrow(0, 0, widths.values[0]).t());
  if (zero_tails_out) zero_tails(out, offsets, widths);
  return out;
}

at::Tensor nested_linear_k_cuda(const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& offsets_in, const at::Tensor& widths_in) {
  const auto widths =
      check_nested_inputs(NestedGemmKind::kNestedK, x, weight, offsets_in, widths_in);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto offsets = offsets_in.contiguous();
  auto out = at::empty({x.size(0), weight.size(0)}, x.options());
  if (x.size(0) == 0 || weight.size(0) == 0) return out;
  if (use_dense(x)) {  // x masked past each row's width, then one GEMM at the widest width
    auto masked = x.narrow(1, 0, widths.values[0]).contiguous();
    if (masked.data_ptr() == x.data_ptr()) masked = masked.clone();
    zero_tails(masked, offsets, widths);
    return at::mm_out(out, masked, weight.narrow(1, 0, widths.values[0]).t());
  }
  run_grouped(NestedGemmKind::kNestedK, x, weight, out, offsets, widths, false);
  return out;
}

// kWeightGradN: out [Nmax, K], rows >= widths[0] zero; kWeightGradK: out [N, Kmax], columns
// >= widths[0] zero (each backend writes all of it: run_grouped).
at::Tensor weight_grad_cuda(NestedGemmKind kind, const at::Tensor& grad_out, const at::Tensor& x,
                            const at::Tensor& offsets_in, const at::Tensor& widths_in) {
  const auto widths = check_nested_inputs(kind, grad_out, x, offsets_in, widths_in);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto offsets = offsets_in.contiguous();
  const auto shape = nested_output_shape(kind, grad_out, x);
  auto out = at::empty(shape, x.options());
  if (x.size(0) == 0 || out.numel() == 0) return out.zero_();
  run_grouped(kind, grad_out, x, out, offsets, widths, false);
  return out;
}

at::Tensor nested_weight_grad_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                   const at::Tensor& offsets, const at::Tensor& widths) {
  return weight_grad_cuda(NestedGemmKind::kWeightGradN, grad_out, x, offsets, widths);
}

at::Tensor nested_weight_grad_k_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                     const at::Tensor& offsets, const at::Tensor& widths) {
  return weight_grad_cuda(NestedGemmKind::kWeightGradK, grad_out, x, offsets, widths);
}

#ifdef FLEXTRON_HAS_SM90
// CUTLASS's host-side check of group problems ([G, 8] int64 from _nested_group_problems):
// host code only, so CPU tests run it on machines without a GPU.
bool sm90_can_implement_host(const at::Tensor& problems, at::ScalarType dtype, int64_t layout) {
  TORCH_CHECK(problems.dim() == 2 && problems.size(1) == 8 && problems.scalar_type() == at::kLong,
              "problems must be int64 [G, 8], got ", problems.sizes(), " ", problems.scalar_type());
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf,
              "dtype must be bfloat16 or float16, got ", dtype);
  TORCH_CHECK(layout >= 0 && layout <= 2, "layout must be 0..2 (OperandLayout), got ", layout);
  const auto rows = problems.contiguous();
  std::vector<GroupProblem> list;
  for (int64_t g = 0; g < rows.size(0); ++g) {
    const int64_t* r = rows.data_ptr<int64_t>() + g * 8;
    list.push_back({int32_t(r[0]), int32_t(r[1]), int32_t(r[2]), r[3], r[4], r[5], int32_t(r[6]),
                    int32_t(r[7])});
  }
  const auto which = static_cast<OperandLayout>(layout);
  const auto check = [&]<at::ScalarType kDtype>() {
    switch (which) {
      case OperandLayout::kForward:
        return sm90_can_implement<kDtype, OperandLayout::kForward>(list);
      case OperandLayout::kTransposedWeight:
        return sm90_can_implement<kDtype, OperandLayout::kTransposedWeight>(list);
      default:
        return sm90_can_implement<kDtype, OperandLayout::kWeightGrad>(list);
    }
  };
  return dtype == at::kBFloat16 ? check.template operator()<at::kBFloat16>()
                                : check.template operator()<at::kHalf>();
}
#endif

}  // namespace

#ifdef FLEXTRON_HAS_SM90
TORCH_LIBRARY_IMPL(flextron, CPU, m) {
  m.impl("_sm90_can_implement", &sm90_can_implement_host);
}
#endif

TORCH_LIBRARY_IMPL(flextron, CUDA, m) {
  m.impl("nested_linear_n", &nested_linear_n_cuda);
  m.impl("nested_linear_k", &nested_linear_k_cuda);
  m.impl("nested_weight_grad", &nested_weight_grad_cuda);
  m.impl("nested_weight_grad_k", &nested_weight_grad_k_cuda);
}

}  // namespace flextron::cuda
