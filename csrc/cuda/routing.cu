// CUDA kernels of route_plan, permute and unpermute. No host syncs: values that can only be
// checked on the device (choice range, perm range) are checked with device-side asserts.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>
#include <cub/device/device_radix_sort.cuh>

#include "routing.h"

namespace flextron {
namespace {

constexpr int kThreads = 256;

template <typename index_t>
__global__ void count_choices_kernel(const index_t* __restrict__ choice, int64_t tokens, int groups,
                                     int32_t* __restrict__ counts) {
  __shared__ int32_t local[kMaxGroups];
  for (int g = threadIdx.x; g < groups; g += blockDim.x) local[g] = 0;
  __syncthreads();
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < tokens;
       t += int64_t(gridDim.x) * blockDim.x) {
    const index_t c = choice[t];
    CUDA_KERNEL_ASSERT(c >= 0 && c < groups && "choice values must be in [0, num_groups)");
    atomicAdd(&local[c], 1);
  }
  __syncthreads();
  for (int g = threadIdx.x; g < groups; g += blockDim.x) {
    if (local[g] != 0) atomicAdd(&counts[g], local[g]);
  }
}

// offsets = [0, cumsum(counts)], written in place: offsets[1:] holds the counts on entry.
__global__ void counts_to_offsets_kernel(int32_t* offsets, int groups) {
  if (threadIdx.x == 0 && blockIdx.x == 0) {
    offsets[0] = 0;
    for (int g = 1; g <= groups; ++g) offsets[g] += offsets[g - 1];
  }
}

__global__ void iota_kernel(int64_t* out, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    out[i] = i;
  }
}

int grid_for(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, 4096)));
}

int bits_for(int64_t groups) {
  int bits = 1;
  while ((int64_t{1} << bits) < groups) ++bits;
  return bits;
}

std::tuple<at::Tensor, at::Tensor> route_plan_cuda(const at::Tensor& choice, int64_t num_groups) {
  check_route_plan_inputs(choice, num_groups);
  const c10::cuda::CUDAGuard guard(choice.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto choice_contig = choice.contiguous();
  const int64_t tokens = choice_contig.numel();
  auto offsets = at::zeros({num_groups + 1}, choice_contig.options().dtype(at::kInt));
  auto perm = at::empty({tokens}, choice_contig.options().dtype(at::kLong));
  if (tokens > 0) {
    // Counted (and range-checked) in the caller's dtype, before the cast to 32-bit sort keys.
    AT_DISPATCH_INDEX_TYPES(choice_contig.scalar_type(), "route_plan_cuda", [&] {
      count_choices_kernel<index_t><<<grid_for(tokens), kThreads, 0, stream>>>(
          choice_contig.data_ptr<index_t>(), tokens, static_cast<int>(num_groups),
          offsets.data_ptr<int32_t>() + 1);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  counts_to_offsets_kernel<<<1, 1, 0, stream>>>(offsets.data_ptr<int32_t>(),
                                                static_cast<int>(num_groups));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (tokens == 0) return {perm, offsets};

  // A stable radix sort of (choice, token index) over just the bits the choices use.
  const auto keys = choice_contig.to(at::kInt);
  auto token_index = at::empty({tokens}, perm.options());
  iota_kernel<<<grid_for(tokens), kThreads, 0, stream>>>(token_index.data_ptr<int64_t>(), tokens);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto sorted_keys = at::empty_like(keys);
  const int end_bit = bits_for(num_groups);
  size_t temp_bytes = 0;
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      nullptr, temp_bytes, keys.data_ptr<int32_t>(), sorted_keys.data_ptr<int32_t>(),
      token_index.data_ptr<int64_t>(), perm.data_ptr<int64_t>(), static_cast<int>(tokens), 0,
      end_bit, stream));
  auto temp = at::empty({static_cast<int64_t>(temp_bytes)}, keys.options().dtype(at::kByte));
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      temp.data_ptr(), temp_bytes, keys.data_ptr<int32_t>(), sorted_keys.data_ptr<int32_t>(),
      token_index.data_ptr<int64_t>(), perm.data_ptr<int64_t>(), static_cast<int>(tokens), 0,
      end_bit, stream));
  return {perm, offsets};
}

// Row gather (permute) or scatter (unpermute without scale) as raw vectors of `vec_t`.
template <typename vec_t, bool kScatter>
__global__ void move_rows_kernel(const vec_t* __restrict__ in, vec_t* __restrict__ out,
                                 const int64_t* __restrict__ perm, int64_t rows,
                                 int64_t vecs_per_row) {
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t other = perm[row];
    CUDA_KERNEL_ASSERT(other >= 0 && other < rows && "perm values must be in [0, rows)");
    const vec_t* src = in + (kScatter ? row : other) * vecs_per_row;
    vec_t* dst = out + (kScatter ? other : row) * vecs_per_row;
    for (int64_t j = threadIdx.x; j < vecs_per_row; j += blockDim.x) dst[j] = src[j];
  }
}

template <bool kScatter>
void move_rows(const at::Tensor& in, at::Tensor& out, const at::Tensor& perm) {
  const int64_t rows = in.size(0);
  if (rows == 0 || in.numel() == 0) return;
  const int64_t row_bytes = in.numel() / rows * in.element_size();
  const int blocks = static_cast<int>(std::min<int64_t>(rows, 65535));
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto launch = [&](auto vec_tag) {
    using vec_t = decltype(vec_tag);
    const int64_t vecs = row_bytes / static_cast<int64_t>(sizeof(vec_t));
    const int threads = static_cast<int>(std::min<int64_t>(kThreads, std::max<int64_t>(32, vecs)));
    move_rows_kernel<vec_t, kScatter><<<blocks, threads, 0, stream>>>(
        static_cast<const vec_t*>(in.data_ptr()), static_cast<vec_t*>(out.data_ptr()),
        perm.data_ptr<int64_t>(), rows, vecs);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  // The widest vector that divides the row size and both base addresses (a contiguous view
  // may start at any element) is aligned for every row.
  const auto fits = [&](size_t bytes) {
    return row_bytes % static_cast<int64_t>(bytes) == 0 &&
           reinterpret_cast<uintptr_t>(in.data_ptr()) % bytes == 0 &&
           reinterpret_cast<uintptr_t>(out.data_ptr()) % bytes == 0;
  };
  if (fits(16)) {
    launch(uint4{});
  } else if (fits(8)) {
    launch(uint2{});
  } else if (fits(4)) {
    launch(uint32_t{});
  } else if (fits(2)) {
    launch(uint16_t{});
  } else {
    launch(uint8_t{});
  }
}

at::Tensor permute_cuda(const at::Tensor& x, const at::Tensor& perm) {
  check_perm(perm, x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto src = x.contiguous();
  const auto p = perm.contiguous();
  auto out = at::empty_like(src);
  move_rows</*kScatter=*/false>(src, out, p);
  return out;
}

template <typename scalar_t>
__global__ void scatter_scaled_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out,
                                      const int64_t* __restrict__ perm,
                                      const scalar_t* __restrict__ scale, int64_t rows,
                                      int64_t cols) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t token = perm[row];
    CUDA_KERNEL_ASSERT(token >= 0 && token < rows && "perm values must be in [0, rows)");
    const opmath_t factor = static_cast<opmath_t>(scale[token]);
    const scalar_t* src = in + row * cols;
    scalar_t* dst = out + token * cols;
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
      dst[j] = static_cast<scalar_t>(static_cast<opmath_t>(src[j]) * factor);
    }
  }
}

at::Tensor unpermute_cuda(const at::Tensor& y, const at::Tensor& perm,
                          const std::optional<at::Tensor>& scale) {
  check_perm(perm, y, "y");
  check_dtype_float(y, "y");
  if (scale.has_value()) check_scale(*scale, y);
  const c10::cuda::CUDAGuard guard(y.device());
  const auto src = y.contiguous();
  const auto p = perm.contiguous();
  // perm is a permutation (route_plan's; the CPU kernel checks it): every row is written, so
  // no zero fill first.
  auto out = at::empty_like(src);
  const int64_t rows = src.size(0);
  if (rows == 0 || src.numel() == 0) return out;
  if (!scale.has_value()) {
    move_rows</*kScatter=*/true>(src, out, p);
    return out;
  }
  const auto s = scale->contiguous();
  const int64_t cols = src.numel() / rows;
  const int blocks = static_cast<int>(std::min<int64_t>(rows, 65535));
  const int threads = static_cast<int>(std::min<int64_t>(kThreads, std::max<int64_t>(32, cols)));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, src.scalar_type(), "unpermute_cuda", [&] {
        scatter_scaled_kernel<scalar_t><<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
            src.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), p.data_ptr<int64_t>(),
            s.data_ptr<scalar_t>(), rows, cols);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(flextron, CUDA, m) {
  m.impl("route_plan", &route_plan_cuda);
  m.impl("permute", &permute_cuda);
  m.impl("unpermute", &unpermute_cuda);
}

}  // namespace flextron
