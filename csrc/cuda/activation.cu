// CUDA kernels of nested_activation and its backward: one block per row (grid-stride), the
// row's width from the device offsets, zeros past it; 16-byte loads and stores where the row
// length and base addresses allow. Elementwise, any architecture.
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

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename scalar_t, bool kBackward, int kVec>
__global__ void nested_activation_kernel(
    const scalar_t* __restrict__ h, const scalar_t* __restrict__ gate,
    const scalar_t* __restrict__ grad, scalar_t* __restrict__ out, scalar_t* __restrict__ out_gate,
    int64_t rows, int64_t cols, Activation kind, const int32_t* __restrict__ offsets_global,
    GroupWidths widths) {
  using opmath_t = at::opmath_type<scalar_t>;
  using pack_t = Pack<scalar_t, kVec>;
  __shared__ int32_t offsets[kMaxGroups + 1];
  for (int g = threadIdx.x; g <= widths.count; g += blockDim.x) offsets[g] = offsets_global[g];
  __syncthreads();
  const bool valid = offsets_valid(offsets, widths.count, rows);
  CUDA_KERNEL_ASSERT(valid && "offsets must start at 0, not decrease and end at M");
  if (!valid) return;
  const pack_t zeros{};
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t width = widths.values[group_of_row(offsets, widths.count, row)];
    const int64_t base = row * cols;
    for (int64_t c0 = int64_t(threadIdx.x) * kVec; c0 < cols; c0 += int64_t(blockDim.x) * kVec) {
      const int64_t i = (base + c0) / kVec;
      if (c0 >= width) {  // wholly past the width: zeros, nothing read
        reinterpret_cast<pack_t*>(out)[i] = zeros;
        if (out_gate != nullptr) reinterpret_cast<pack_t*>(out_gate)[i] = zeros;
        continue;
      }
      const pack_t hv = reinterpret_cast<const pack_t*>(h)[i];
      const pack_t gv = gate != nullptr ? reinterpret_cast<const pack_t*>(gate)[i] : zeros;
      pack_t result, result_gate;
      if constexpr (kBackward) {
        const pack_t dv = reinterpret_cast<const pack_t*>(grad)[i];
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          opmath_t dh = 0, dg = 0;
          if (c0 + j < width) {
            activation_backward<opmath_t>(kind, static_cast<opmath_t>(dv.v[j]),
                                          static_cast<opmath_t>(hv.v[j]),
                                          static_cast<opmath_t>(gv.v[j]), &dh, &dg);
          }
          result.v[j] = static_cast<scalar_t>(dh);
          result_gate.v[j] = static_cast<scalar_t>(dg);
        }
        if (out_gate != nullptr) reinterpret_cast<pack_t*>(out_gate)[i] = result_gate;
      } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const opmath_t value =
              c0 + j < width ? activation_forward<opmath_t>(kind, static_cast<opmath_t>(hv.v[j]),
                                                            static_cast<opmath_t>(gv.v[j]))
                             : opmath_t(0);
          result.v[j] = static_cast<scalar_t>(value);
        }
      }
      reinterpret_cast<pack_t*>(out)[i] = result;
    }
  }
}

bool aligned16(const at::Tensor* t) {
  return t == nullptr || reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0;
}

template <bool kBackward>
void launch(const at::Tensor& h, const at::Tensor* gate, const at::Tensor* grad, at::Tensor& out,
            at::Tensor* out_gate, const at::Tensor& offsets, const ActivationProblem& problem) {
  const int64_t rows = h.size(0), cols = h.size(1);
  if (rows == 0 || cols == 0) return;
  const int blocks = static_cast<int>(std::min<int64_t>(rows, 65535));
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto widths = to_group_widths(problem.widths);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, h.scalar_type(), "nested_activation_cuda", [&] {
        constexpr int kVec = 16 / sizeof(scalar_t);
        const bool vectors = cols % kVec == 0 && aligned16(&h) && aligned16(gate) &&
                             aligned16(grad) && aligned16(&out) && aligned16(out_gate);
        const int64_t lanes = vectors ? cols / kVec : cols;
        const int threads =
            static_cast<int>(std::min<int64_t>(kThreads, std::max<int64_t>(32, lanes)));
        const auto args = std::make_tuple(
            h.data_ptr<scalar_t>(), gate != nullptr ? gate->data_ptr<scalar_t>() : nullptr,
            grad != nullptr ? grad->data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(),
            out_gate != nullptr ? out_gate->data_ptr<scalar_t>() : nullptr, rows, cols,
            problem.kind, offsets.data_ptr<int32_t>(), widths);
        std::apply(
            [&](auto... a) {
              if (vectors) {
                nested_activation_kernel<scalar_t, kBackward, kVec>
                    <<<blocks, threads, 0, stream>>>(a...);
              } else {
                nested_activation_kernel<scalar_t, kBackward, 1>
                    <<<blocks, threads, 0, stream>>>(a...);
              }
            },
            args);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

at::Tensor nested_activation_cuda(const at::Tensor& h, const std::optional<at::Tensor>& gate,
                                  const at::Tensor& offsets_in, const at::Tensor& widths,
                                  c10::string_view activation) {
  const auto problem =
      check_activation_inputs(h, gate, offsets_in, widths, std::string(activation));
  const c10::cuda::CUDAGuard guard(h.device());
  const auto offsets = offsets_in.contiguous();
  const auto hc = h.contiguous();
  const auto gc = gate.has_value() ? gate->contiguous() : at::Tensor();
  auto out = at::empty_like(hc);
  launch<false>(hc, gate.has_value() ? &gc : nullptr, nullptr, out, nullptr, offsets, problem);
  return out;
}

std::tuple<at::Tensor, at::Tensor> nested_activation_backward_cuda(
    const at::Tensor& grad, const at::Tensor& h, const std::optional<at::Tensor>& gate,
    const at::Tensor& offsets_in, const at::Tensor& widths, c10::string_view activation) {
  const auto problem =
      check_activation_backward_inputs(grad, h, gate, offsets_in, widths, std::string(activation));
  const c10::cuda::CUDAGuard guard(h.device());
  const auto offsets = offsets_in.contiguous();
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
