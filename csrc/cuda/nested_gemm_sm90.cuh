// CUTLASS 3.x configuration of the nested grouped GEMMs for Hopper (sm_90a): ptr-array
// grouped GEMM, TMA loads, wgmma, warp-specialized cooperative schedule, fp32 accumulate.
//
// One kernel configuration per operand layout:
//   forward  (nested_linear_n / nested_linear_k): A = activations [M, K] row-major,
//            B = weight [N, K] (K-major, "column-major B"), D row-major;
//   weight gradient: A = grad_out^T (M-major), B = x (N-major), D row-major.
// The problem shapes, pointers and strides of every group are written on the device by
// `build_groups_kernel` from the device offsets, so there is no host sync and the launch is
// CUDA-graph safe. Groups with no rows get M = 0 (CUTLASS skips them); no group ever has K = 0.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cuda/nested_gemm.h"

namespace flextron::cuda::sm90 {

using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;  // M, N, K

template <typename Element, typename LayoutA, typename LayoutB>
struct NestedGemmConfig {
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlignment = 128 / cutlass::sizeof_bits<Element>::value;
  using TileShape = cute::Shape<cute::_128, cute::_256, cute::_64>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;

  // No source operand (C = void): D = acc.
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutD*, kAlignment,
      Element, LayoutD*, kAlignment, EpilogueSchedule,
      cutlass::epilogue::fusion::LinearCombination<Element, float>>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA*, kAlignment, Element,
      LayoutB*, kAlignment, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;

  using GemmKernel =
      cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

  using StrideA = typename GemmKernel::InternalStrideA;
  using StrideB = typename GemmKernel::InternalStrideB;
  using StrideD = typename GemmKernel::InternalStrideD;
};

// A packed-stride type with one dynamic mode (the leading dimension) and static unit/zero
// modes: set the dynamic one.
template <typename Stride>
__device__ Stride leading_stride(int64_t ld) {
  Stride stride{};
  if constexpr (cute::is_static<cute::remove_cvref_t<decltype(cute::get<0>(stride))>>::value) {
    cute::get<1>(stride) = ld;
  } else {
    cute::get<0>(stride) = ld;
  }
  return stride;
}

template <typename Config, typename Element>
struct GroupArrays {
  typename ProblemShape::UnderlyingProblemShape* shapes;
  const Element** ptr_a;
  const Element** ptr_b;
  Element** ptr_d;
  typename Config::StrideA* stride_a;
  typename Config::StrideB* stride_b;
  typename Config::StrideD* stride_d;
};

// One thread per group. a, b, d are the whole operands; m_total the rows (tokens) of a.
template <typename Config, typename Element>
__global__ void build_groups_kernel(GroupArrays<Config, Element> arrays, NestedGemmKind kind,
                                    const Element* a, int64_t lda, const Element* b, int64_t ldb,
                                    Element* d, int64_t ldd, int64_t n_full, int64_t k_full,
                                    const int32_t* offsets, GroupWidths widths) {
  const int g = blockIdx.x * blockDim.x + threadIdx.x;
  if (g >= widths.count) return;
  const int32_t start = offsets[g], end = offsets[g + 1];
  CUDA_KERNEL_ASSERT(offsets[0] == 0 && start <= end && "offsets must start at 0 and not decrease");
  const int width = widths.values[g];
  int m = 0, n = 0, k = 0;
  const Element* group_a = a;
  const Element* group_b = b;
  Element* group_d = d;
  switch (kind) {
    case NestedGemmKind::kNestedN:  // rows [start, end): x @ w[:width].T -> d[:, :width]
      m = end - start, n = width, k = static_cast<int>(k_full);
      group_a = a + int64_t(start) * lda;
      group_d = d + int64_t(start) * ldd;
      break;
    case NestedGemmKind::kNestedK:  // rows [start, end): x[:, :width] @ w[:, :width].T
      m = end - start, n = static_cast<int>(n_full), k = width;
      group_a = a + int64_t(start) * lda;
      group_d = d + int64_t(start) * ldd;
      break;
    case NestedGemmKind::kWeightGrad: {  // band [next, width) over the token prefix [0, end)
      const int next = g + 1 < widths.count ? widths.values[g + 1] : 0;
      m = end > 0 ? width - next : 0, n = static_cast<int>(n_full), k = end > 0 ? end : 8;  // empty prefix: M = 0 skips the group; K stays > 0
      group_a = a + next;                // grad_out[:, next:], M-major, ld = Nmax
      group_d = d + int64_t(next) * ldd;
      break;
    }
  }
  arrays.shapes[g] = {m, n, k};
  arrays.ptr_a[g] = group_a;
  arrays.ptr_b[g] = group_b;
  arrays.ptr_d[g] = group_d;
  arrays.stride_a[g] = leading_stride<typename Config::StrideA>(lda);
  arrays.stride_b[g] = leading_stride<typename Config::StrideB>(ldb);
  arrays.stride_d[g] = leading_stride<typename Config::StrideD>(ldd);
}

inline size_t align_up(size_t bytes) {
  return (bytes + 255) / 256 * 256;
}

// Runs one nested grouped GEMM. For kNestedN/kNestedK: a = x, b = weight, d = out.
// For kWeightGrad: a = grad_out [M, Nmax], b = x [M, K], d = out [Nmax, K].
template <typename Config, typename Element>
void run(NestedGemmKind kind, const at::Tensor& a, const at::Tensor& b, at::Tensor& d,
         const at::Tensor& offsets, const GroupWidths& widths, cudaStream_t stream) {
  using Gemm = typename Config::Gemm;
  const int groups = widths.count;

  // One device buffer holds every per-group array.
  const size_t sizes[] = {
      sizeof(typename ProblemShape::UnderlyingProblemShape) * groups, sizeof(Element*) * groups,
      sizeof(Element*) * groups, sizeof(Element*) * groups,
      sizeof(typename Config::StrideA) * groups, sizeof(typename Config::StrideB) * groups,
      sizeof(typename Config::StrideD) * groups};
  size_t total = 0;
  for (const size_t s : sizes) total += align_up(s);
  auto buffer = at::empty({static_cast<int64_t>(total)}, a.options().dtype(at::kByte));
  char* cursor = static_cast<char*>(buffer.data_ptr());
  const auto take = [&](size_t bytes) {
    char* p = cursor;
    cursor += align_up(bytes);
    return p;
  };
  GroupArrays<Config, Element> arrays{};
  arrays.shapes = reinterpret_cast<typename ProblemShape::UnderlyingProblemShape*>(take(sizes[0]));
  arrays.ptr_a = reinterpret_cast<const Element**>(take(sizes[1]));
  arrays.ptr_b = reinterpret_cast<const Element**>(take(sizes[2]));
  arrays.ptr_d = reinterpret_cast<Element**>(take(sizes[3]));
  arrays.stride_a = reinterpret_cast<typename Config::StrideA*>(take(sizes[4]));
  arrays.stride_b = reinterpret_cast<typename Config::StrideB*>(take(sizes[5]));
  arrays.stride_d = reinterpret_cast<typename Config::StrideD*>(take(sizes[6]));

  const auto* a_ptr = reinterpret_cast<const Element*>(a.data_ptr());
  const auto* b_ptr = reinterpret_cast<const Element*>(b.data_ptr());
  auto* d_ptr = reinterpret_cast<Element*>(d.data_ptr());
  const int64_t lda = a.size(1), ldb = b.size(1), ldd = d.size(1);
  // n_full / k_full: the GEMM's N for kNestedK and kWeightGrad, its K for kNestedN.
  const int64_t n_full = kind == NestedGemmKind::kWeightGrad ? b.size(1) : b.size(0);
  const int64_t k_full = a.size(1);
  build_groups_kernel<Config, Element><<<1, kMaxGroups, 0, stream>>>(
      arrays, kind, a_ptr, lda, b_ptr, ldb, d_ptr, ldd, n_full, k_full,
      offsets.data_ptr<int32_t>(), widths);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  cutlass::KernelHardwareInfo hw_info;
  hw_info.device_id = a.device().index();
  hw_info.sm_count = at::cuda::getDeviceProperties(hw_info.device_id)->multiProcessorCount;

  typename Gemm::Arguments arguments{
      cutlass::gemm::GemmUniversalMode::kGrouped,
      {groups, arrays.shapes, nullptr},  // device-only shapes: no host copy, no sync
      {arrays.ptr_a, arrays.stride_a, arrays.ptr_b, arrays.stride_b},
      {{}, nullptr, nullptr, arrays.ptr_d, arrays.stride_d},
      hw_info};
  auto& fusion = arguments.epilogue.thread;
  fusion.alpha = 1.0f;
  fusion.beta = 0.0f;

  Gemm gemm;
  TORCH_CHECK(gemm.can_implement(arguments) == cutlass::Status::kSuccess,
              "nested GEMM (sm90): CUTLASS cannot implement this problem");
  const size_t workspace_bytes = Gemm::get_workspace_size(arguments);
  auto workspace = at::empty({static_cast<int64_t>(std::max<size_t>(workspace_bytes, 1))},
                             a.options().dtype(at::kByte));
  TORCH_CHECK(gemm.initialize(arguments, workspace.data_ptr(), stream) == cutlass::Status::kSuccess,
              "nested GEMM (sm90): CUTLASS initialization failed");
  TORCH_CHECK(gemm.run(stream) == cutlass::Status::kSuccess,
              "nested GEMM (sm90): CUTLASS kernel launch failed");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Element>
void dispatch(NestedGemmKind kind, const at::Tensor& a, const at::Tensor& b, at::Tensor& d,
              const at::Tensor& offsets, const GroupWidths& widths, cudaStream_t stream) {
  if (kind == NestedGemmKind::kWeightGrad) {
    using Config = NestedGemmConfig<Element, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;
    run<Config, Element>(kind, a, b, d, offsets, widths, stream);
  } else {
    using Config = NestedGemmConfig<Element, cutlass::layout::RowMajor, cutlass::layout::ColumnMajor>;
    run<Config, Element>(kind, a, b, d, offsets, widths, stream);
  }
}

}  // namespace flextron::cuda::sm90
