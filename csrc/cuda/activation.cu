// CUDA kernels of nested_activation and its backward: one block per row (grid-stride), the
// row's width from the device offsets, zeros past it. Elementwise, any architecture.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "activation.h"
#include "cuda/nested_gemm.h"

namespace flextron::cuda {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t, bool kBackward>
__global__ void nested_activation_kernel(const scalar_t* __restrict__ h,
                                         const scalar_t* __restrict__ gate,
                                         const scalar_t* __restrict__ grad,
                                         scalar_t* __restrict__ out, scalar_t* __restrict__ out_gate,
                                         int64_t rows, int64_t cols, Activation kind,
                                         const int32_t* __restrict__ offsets_global,
                                         GroupWidths widths) {
  using opmath_t = at::opmath_type<scalar_t>;
  __shared__ int32_t offsets[kMaxGroups + 1];
  for (int g = threadIdx.x; g <= widths.count; g += blockDim.x) offsets[g] = offsets_global[g];
  __syncthreads();
  if (threadIdx.x == 0 && blockIdx.x == 0) {
    CUDA_KERNEL_ASSERT(offsets[0] == 0 && offsets[widths.count] == rows &&
                       "offsets must start at 0 and end at M");
  }
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t width = widths.values[group_of_row(offsets, widths.count, row)];
    const int64_t base = row * cols;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
      const int64_t i = base + c;
      if (c >= width) {
        out[i] = scalar_t(0);
        if (out_gate != nullptr) out_gate[i] = scalar_t(0);
        continue;
      }
      const opmath_t hv = static_cast<opmath_t>(h[i]);
      const opmath_t gv = gate != nullptr ? static_cast<opmath_t>(gate[i]) : opmath_t(0);
      if constexpr (kBackward) {
        opmath_t dh, dg;
        activation_backward<opmath_t>(kind, static_cast<opmath_t>(grad[i]), hv, gv, &dh, &dg);
        out[i] = static_cast<scalar_t>(dh);
        if (out_gate != nullptr) out_gate[i] = static_cast<scalar_t>(dg);
      } else {
        out[i] = static_cast<scalar_t>(activation_forward<opmath_t>(kind, hv, gv));
      }
    }
  }
}

template <bool kBackward>
void launch(const at::Tensor& h, const at::Tensor* gate, const at::Tensor* grad, at::Tensor& out,
            at::Tensor* out_gate, const at::Tensor& offsets, const ActivationProblem& problem) {
  const int64_t rows = h.size(0), cols = h.size(1);
  if (rows == 0 || cols == 0) return;
  const int blocks = static_cast<int>(std::min<int64_t>(rows, 65535));
  const int threads = static_cast<int>(std::min<int64_t>(kThreads, std::max<int64_t>(32, cols)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "nested_activation_cuda", [&] {
    nested_activation_kernel<scalar_t, kBackward><<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
        h.data_ptr<scalar_t>(), gate != nullptr ? gate->data_ptr<scalar_t>() : nullptr,
        grad != nullptr ? grad->data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(),
        out_gate != nullptr ? out_gate->data_ptr<scalar_t>() : nullptr, rows, cols, problem.kind,
        offsets.data_ptr<int32_t>(), to_group_widths(problem.widths));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor nested_activation_cuda(const at::Tensor& h, const std::optional<at::Tensor>& gate,
                                  const at::Tensor& offsets, const at::Tensor& widths,
                                  c10::string_view activation) {
  const auto problem = check_activation_inputs(h, gate, offsets, widths, std::string(activation));
  const c10::cuda::CUDAGuard guard(h.device());
  const auto hc = h.contiguous();
  const auto gc = gate.has_value() ? gate->contiguous() : at::Tensor();
  auto out = at::empty_like(hc);
  launch<false>(hc, gate.has_value() ? &gc : nullptr, nullptr, out, nullptr, offsets, problem);
  return out;
}

std::tuple<at::Tensor, at::Tensor> nested_activation_backward_cuda(
    const at::Tensor& grad, const at::Tensor& h, const std::optional<at::Tensor>& gate,
    const at::Tensor& offsets, const at::Tensor& widths, c10::string_view activation) {
  const auto problem =
      check_activation_backward_inputs(grad, h, gate, offsets, widths, std::string(activation));
  const c10::cuda::CUDAGuard guard(h.device());
  const auto hc = h.contiguous();
  const auto gc = gate.has_value() ? gate->contiguous() : at::Tensor();
  const auto dy = grad.contiguous();
  auto grad_h = at::empty_like(hc);
  auto grad_gate = gate.has_value() ? at::empty_like(hc) : at::empty({0}, hc.options());
  launch<true>(hc, gate.has_value() ? &gc : nullptr, &dy, grad_h,
               gate.has_value() ? &grad_gate : nullptr, offsets, problem);
  return {grad_h, grad_gate};
}

}  // namespace

TORCH_LIBRARY_IMPL(flextron, CUDA, m) {
  m.impl("nested_activation", &nested_activation_cuda);
  m.impl("nested_activation_backward", &nested_activation_backward_cuda);
}

}  // namespace flextron::cuda
