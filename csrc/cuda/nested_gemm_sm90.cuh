// CUTLASS 3.x grouped GEMM for the nested GEMMs on Hopper (sm_90a): ptr-array grouped GEMM,
// TMA loads, wgmma, warp-specialized schedule, fp32 accumulate, D = A B^T per group.
//
// One instantiation per operand layout (OperandLayout, nested_gemm.h), each in its own .cu so
// they compile in parallel. Every group's problem shape, pointers and strides are written on
// the device by build_groups_kernel from the device offsets through group_problem()
// (nested_groups.h, which the CPU tests run too): no host sync, CUDA-graph safe. Groups with
// an empty token prefix are skipped (M = 0; K stays > 0) and their block is zeroed by
// zero_skipped_blocks_kernel. Columns past a row's width (kNestedN) are the caller's.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAMacros.h>

#include <array>
#include <mutex>

#include "cuda/nested_gemm.h"
#include "cute/tensor.hpp"
#include "cutlass/bfloat16.h"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/half.h"

namespace flextron::cuda::sm90 {

using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;  // M, N, K

// Named schedules, after CUTLASS example 57. The dispatch rule (nested_linear.cu): token
// counts up to dense_rows_limit() run one dense cuBLAS GEMM at the widest width; above it,
// CooperativeConfig.
struct CooperativeConfig {
  using TileShape = cute::Shape<cute::_128, cute::_256, cute::_64>;  // 2 consumer warpgroups
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;    // groups are few and tall
  using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
};

template <at::ScalarType dtype>
struct ElementOf;
template <>
struct ElementOf<at::kBFloat16> {
  using type = cutlass::bfloat16_t;
};
template <>
struct ElementOf<at::kHalf> {
  using type = cutlass::half_t;
};

// CUTLASS layout tags of A and B ("B" is [N, K]: ColumnMajor = K-major, RowMajor = N-major).
template <OperandLayout layout>
struct LayoutsOf;
template <>
struct LayoutsOf<OperandLayout::kForward> {  // x [M, K], weight [N, K]
  using A = cutlass::layout::RowMajor;
  using B = cutlass::layout::ColumnMajor;
};
template <>
struct LayoutsOf<OperandLayout::kTransposedWeight> {  // x [M, K], weight.t() read in place
  using A = cutlass::layout::RowMajor;
  using B = cutlass::layout::RowMajor;
};
template <>
struct LayoutsOf<OperandLayout::kWeightGrad> {  // A = grad_out^T, B = x^T
  using A = cutlass::layout::ColumnMajor;
  using B = cutlass::layout::RowMajor;
};

// The mode of a packed stride that holds the leading dimension (the other is a static 1).
template <typename Stride>
constexpr int leading_mode() {
  return cute::is_static<cute::remove_cvref_t<decltype(cute::get<0>(Stride{}))>>::value ? 1 : 0;
}

template <at::ScalarType dtype, OperandLayout layout, typename Schedule>
struct NestedGemm {
  using Element = typename ElementOf<dtype>::type;
  using LayoutA = typename LayoutsOf<layout>::A;
  using LayoutB = typename LayoutsOf<layout>::B;
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlignment = 128 / cutlass::sizeof_bits<Element>::value;  // 16 bytes

  // No source operand (C = void): D = acc.
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, typename Schedule::TileShape,
      typename Schedule::ClusterShape, cutlass::epilogue::collective::EpilogueTileAuto, float,
      float, void, LayoutD*, kAlignment, Element, LayoutD*, kAlignment,
      typename Schedule::EpilogueSchedule,
      cutlass::epilogue::fusion::LinearCombination<Element, float>>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA*, kAlignment, Element,
      LayoutB*, kAlignment, float, typename Schedule::TileShape, typename Schedule::ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      typename Schedule::KernelSchedule>::CollectiveOp;

  using Kernel =
      cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;

  // group_problem() gives leading dimensions for these layouts: A row-major has its leading
  // dimension in mode 0 (M), column-major in mode 1 (K); B K-major in mode 0 (N); D in mode 0.
  static_assert(leading_mode<StrideA>() ==
                (std::is_same_v<LayoutA, cutlass::layout::RowMajor> ? 0 : 1));
  static_assert(leading_mode<StrideB>() ==
                (std::is_same_v<LayoutB, cutlass::layout::ColumnMajor> ? 0 : 1));
  static_assert(leading_mode<StrideD>() == 0);
  static_assert(Kernel::SharedStorageSize <= 227 * 1024, "over the sm_90 shared memory per block");
};

template <typename Config>
struct GroupArrays {
  using Element = typename Config::Element;
  typename ProblemShape::UnderlyingProblemShape* shapes;
  const Element** ptr_a;
  const Element** ptr_b;
  Element** ptr_d;
  typename Config::StrideA* stride_a;
  typename Config::StrideB* stride_b;
  typename Config::StrideD* stride_d;
};

template <typename Stride>
__device__ Stride leading_stride(int64_t ld) {
  Stride stride{};
  cute::get<leading_mode<Stride>()>(stride) = ld;
  return stride;
}

// One thread per group.
template <typename Config>
__global__ void build_groups_kernel(GroupArrays<Config> arrays, NestedGemmKind kind,
                                    const typename Config::Element* a,
                                    const typename Config::Element* b, typename Config::Element* d,
                                    NestedOperands ops, const int32_t* __restrict__ offsets_global,
                                    GroupWidths widths) {
  __shared__ int32_t offsets[kMaxGroups + 1];
  for (int g = threadIdx.x; g <= widths.count; g += blockDim.x) offsets[g] = offsets_global[g];
  __syncthreads();
  // Invalid offsets would make TMA read and write out of bounds: no group runs then.
  const bool valid = offsets_valid(offsets, widths.count, ops.rows);
  CUDA_KERNEL_ASSERT(valid && "offsets must start at 0, not decrease and end at M");
  const int g = threadIdx.x;
  if (g >= widths.count) return;
  GroupProblem p{0, 0, kSkippedK, 0, 0, 0, 0, 0};
  if (valid) p = group_problem(kind, g, offsets, widths, ops);
  arrays.shapes[g] = {p.m, p.n, p.k};
  arrays.ptr_a[g] = a + p.a_offset;
  arrays.ptr_b[g] = b + p.b_offset;
  arrays.ptr_d[g] = d + p.d_offset;
  arrays.stride_a[g] = leading_stride<typename Config::StrideA>(ops.lda);
  arrays.stride_b[g] = leading_stride<typename Config::StrideB>(ops.ldb);
  arrays.stride_d[g] = leading_stride<typename Config::StrideD>(ops.ldd);
}

// Zeros the output blocks of skipped groups (an empty token prefix of a weight gradient).
template <typename Element>
__global__ void zero_skipped_blocks_kernel(Element* d, NestedGemmKind kind, NestedOperands ops,
                                           const int32_t* __restrict__ offsets_global,
                                           GroupWidths widths) {
  __shared__ int32_t offsets[kMaxGroups + 1];
  for (int g = threadIdx.x; g <= widths.count; g += blockDim.x) offsets[g] = offsets_global[g];
  __syncthreads();
  if (!offsets_valid(offsets, widths.count, ops.rows)) return;
  for (int g = 0; g < widths.count; ++g) {
    const GroupProblem p = group_problem(kind, g, offsets, widths, ops);
    const int64_t elements = int64_t(p.zero_m) * p.zero_n;
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < elements;
         i += int64_t(gridDim.x) * blockDim.x) {
      d[p.d_offset + (i / p.zero_n) * ops.ldd + i % p.zero_n] = Element(0);
    }
  }
}

// cudaFuncSetAttribute once per device and kernel, not per call.
template <typename Kernel>
void allow_shared_memory_once(int device) {
  static std::array<std::once_flag, C10_COMPILE_TIME_MAX_GPUS> once;
  TORCH_CHECK(device >= 0 && device < C10_COMPILE_TIME_MAX_GPUS, "device index ", device,
              " out of range");
  std::call_once(once[device], [] {
    if (Kernel::SharedStorageSize >= (48 << 10)) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(cutlass::device_kernel<Kernel>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          Kernel::SharedStorageSize));
    }
  });
}

inline size_t align_up(size_t bytes) {
  return (bytes + 255) / 256 * 256;
}

template <typename Config>
typename Config::Gemm::Arguments make_arguments(const GroupArrays<Config>& arrays, int groups,
                                                int device, int sm_count) {
  cutlass::KernelHardwareInfo hw_info;
  hw_info.device_id = device;
  hw_info.sm_count = sm_count;
  typename Config::Gemm::Arguments arguments{
      cutlass::gemm::GemmUniversalMode::kGrouped,
      {groups, arrays.shapes, nullptr},  // device-only shapes: no host copy, no sync
      {arrays.ptr_a, arrays.stride_a, arrays.ptr_b, arrays.stride_b},
      {{}, nullptr, nullptr, arrays.ptr_d, arrays.stride_d},
      hw_info};
  arguments.epilogue.thread.alpha = 1.0f;
  arguments.epilogue.thread.beta = 0.0f;
  return arguments;
}

// One allocation per call holds the group arrays and CUTLASS's workspace.
template <typename Config>
void run(NestedGemmKind kind, const at::Tensor& a, const at::Tensor& b, at::Tensor& d,
         const at::Tensor& offsets, const GroupWidths& widths, const NestedOperands& ops,
         cudaStream_t stream) {
  using Element = typename Config::Element;
  using Gemm = typename Config::Gemm;
  const int groups = widths.count;
  const int device = a.device().index();
  const size_t sizes[] = {sizeof(typename ProblemShape::UnderlyingProblemShape) * groups,
                          sizeof(Element*) * groups,
                          sizeof(Element*) * groups,
                          sizeof(Element*) * groups,
                          sizeof(typename Config::StrideA) * groups,
                          sizeof(typename Config::StrideB) * groups,
                          sizeof(typename Config::StrideD) * groups};
  size_t arrays_bytes = 0;
  for (const size_t s : sizes) arrays_bytes += align_up(s);
  const int sm_count = at::cuda::getDeviceProperties(device)->multiProcessorCount;
  const size_t workspace_bytes =
      Gemm::get_workspace_size(make_arguments(GroupArrays<Config>{}, groups, device, sm_count));
  auto buffer = at::empty({static_cast<int64_t>(arrays_bytes + align_up(workspace_bytes))},
                          a.options().dtype(at::kByte));
  char* cursor = static_cast<char*>(buffer.data_ptr());
  const auto take = [&](size_t bytes) {
    char* p = cursor;
    cursor += align_up(bytes);
    return p;
  };
  GroupArrays<Config> arrays{};
  arrays.shapes = reinterpret_cast<typename ProblemShape::UnderlyingProblemShape*>(take(sizes[0]));
  arrays.ptr_a = reinterpret_cast<const Element**>(take(sizes[1]));
  arrays.ptr_b = reinterpret_cast<const Element**>(take(sizes[2]));
  arrays.ptr_d = reinterpret_cast<Element**>(take(sizes[3]));
  arrays.stride_a = reinterpret_cast<typename Config::StrideA*>(take(sizes[4]));
  arrays.stride_b = reinterpret_cast<typename Config::StrideB*>(take(sizes[5]));
  arrays.stride_d = reinterpret_cast<typename Config::StrideD*>(take(sizes[6]));
  void* workspace = cursor;

  const auto* a_ptr = reinterpret_cast<const Element*>(a.data_ptr());
  const auto* b_ptr = reinterpret_cast<const Element*>(b.data_ptr());
  auto* d_ptr = reinterpret_cast<Element*>(d.data_ptr());
  const int32_t* offsets_ptr = offsets.data_ptr<int32_t>();
  build_groups_kernel<Config>
      <<<1, kMaxGroups, 0, stream>>>(arrays, kind, a_ptr, b_ptr, d_ptr, ops, offsets_ptr, widths);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (kind == NestedGemmKind::kWeightGradN || kind == NestedGemmKind::kWeightGradK) {
    zero_skipped_blocks_kernel<Element>
        <<<128, 256, 0, stream>>>(d_ptr, kind, ops, offsets_ptr, widths);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  const auto arguments = make_arguments(arrays, groups, device, sm_count);
  TORCH_CHECK(Gemm::can_implement(arguments) == cutlass::Status::kSuccess,
              "nested GEMM (sm90): CUTLASS cannot implement this problem");
  TORCH_CHECK(Config::Kernel::initialize_workspace(arguments, workspace, stream) ==
                  cutlass::Status::kSuccess,
              "nested GEMM (sm90): CUTLASS workspace initialization failed");
  auto params = Config::Kernel::to_underlying_arguments(arguments, workspace);
  allow_shared_memory_once<typename Config::Kernel>(device);
  TORCH_CHECK(Gemm::run(params, stream) == cutlass::Status::kSuccess,
              "nested GEMM (sm90): CUTLASS kernel launch failed");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Host-side: CUTLASS's own check of host problem shapes (alignment of every group), for the
// CPU tests that sweep shapes. Needs no GPU.
template <typename Config>
bool can_implement(const std::vector<GroupProblem>& problems) {
  std::vector<typename ProblemShape::UnderlyingProblemShape> shapes;
  for (const auto& p : problems) shapes.push_back({p.m, p.n, p.k});
  auto arguments = make_arguments(GroupArrays<Config>{}, static_cast<int>(problems.size()), 0, 1);
  arguments.problem_shape = {static_cast<int>(problems.size()), nullptr, shapes.data()};
  return Config::Gemm::can_implement(arguments) == cutlass::Status::kSuccess;
}

}  // namespace flextron::cuda::sm90

namespace flextron::cuda {

template <at::ScalarType dtype, OperandLayout layout>
void nested_gemm_sm90(NestedGemmKind kind, const at::Tensor& a, const at::Tensor& b,
                      at::Tensor& out, const at::Tensor& offsets, const GroupWidths& widths,
                      const NestedOperands& ops, cudaStream_t stream) {
  sm90::run<sm90::NestedGemm<dtype, layout, sm90::CooperativeConfig>>(kind, a, b, out, offsets,
                                                                      widths, ops, stream);
}

template <at::ScalarType dtype, OperandLayout layout>
bool sm90_can_implement(const std::vector<GroupProblem>& problems) {
  return sm90::can_implement<sm90::NestedGemm<dtype, layout, sm90::CooperativeConfig>>(problems);
}

}  // namespace flextron::cuda

// One (dtype, layout) per .cu file.
#define FLEXTRON_INSTANTIATE_SM90(dtype, layout)                                        \
  template void flextron::cuda::nested_gemm_sm90<dtype, layout>(                        \
      flextron::NestedGemmKind, const at::Tensor&, const at::Tensor&, at::Tensor&,      \
      const at::Tensor&, const flextron::GroupWidths&, const flextron::NestedOperands&, \
      cudaStream_t);                                                                    \
  template bool flextron::cuda::sm90_can_implement<dtype, layout>(                      \
      const std::vector<flextron::GroupProblem>&);
