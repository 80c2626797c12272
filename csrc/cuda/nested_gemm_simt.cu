// A masked tiled GEMM on CUDA cores: the portable path (any float dtype, any width, any
// operand strides, any architecture; sm_80 and the fp32/fp64 inputs use it). One launch
// covers all groups: each output row knows its group from the device offsets, a tile that
// spans two groups masks per row, so the result is exact whatever the tile boundaries. Every
// output element is written (zeros where masked). The index logic is masked_tiles.h, which
// the CPU tests run through cpu/emulation.cpp.
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/macros/Macros.h>

#include "cuda/nested_gemm.h"

namespace flextron::cuda {
namespace {

template <typename scalar_t>
__global__ void __launch_bounds__(kTileThreads, 1)
    masked_gemm_kernel(MaskedGemmArgs p, const scalar_t* __restrict__ a,
                       const scalar_t* __restrict__ b, scalar_t* __restrict__ out,
                       const int32_t* __restrict__ offsets_global, GroupWidths widths) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ int32_t offsets[kMaxGroups + 1];
  __shared__ int64_t row_depth[kTileRows];
  __shared__ int64_t col_limit[kTileRows];
  __shared__ acc_t a_tile[kTileDepth][kTileRows + 1];
  __shared__ acc_t b_tile[kTileDepth][kTileCols + 1];

  const int tid = threadIdx.x;
  const int64_t row0 = int64_t(blockIdx.x) * kTileRows;
  const int64_t col0 = int64_t(blockIdx.y) * kTileCols;
  for (int g = tid; g <= widths.count; g += kTileThreads) offsets[g] = offsets_global[g];
  __syncthreads();
  const bool valid = offsets_valid(offsets, widths.count, p.tokens);
  if (tid == 0) CUDA_KERNEL_ASSERT(valid && "offsets must start at 0, not decrease and end at M");
  for (int r = tid; r < kTileRows; r += kTileThreads) {
    RowLimits limits{0, 0};
    if (valid && row0 + r < p.rows) limits = row_limits(p, row0 + r, offsets, widths);
    row_depth[r] = limits.depth;
    col_limit[r] = limits.col_limit;
  }
  __syncthreads();
  int64_t max_depth = 0, max_col_limit = 0;
  for (int r = 0; r < kTileRows; ++r) {
    max_depth = max(max_depth, row_depth[r]);
    max_col_limit = max(max_col_limit, col_limit[r]);
  }
  const int64_t contraction = tile_contraction(col0, max_depth, max_col_limit);

  const int tx = tid % 16, ty = tid / 16;
  acc_t acc[4][4] = {};
  for (int64_t l0 = 0; l0 < contraction; l0 += kTileDepth) {
    for (int e = tid; e < kTileRows * kTileDepth; e += kTileThreads) {
      const auto load = tile_load(e, kTileRows, p.a_depth);
      const int64_t i = a_element(p, row0 + load.index, l0 + load.depth, row_depth[load.index]);
      a_tile[load.depth][load.index] = i < 0 ? acc_t(0) : static_cast<acc_t>(a[i]);
    }
    for (int e = tid; e < kTileCols * kTileDepth; e += kTileThreads) {
      const auto bt = tile_load(e, kTileCols, p.b_depth);
      const int64_t i = b_element(p, col0 + bt.index, l0 + bt.depth, contraction);
      b_tile[bt.depth][bt.index] = i < 0 ? acc_t(0) : static_cast<acc_t>(b[i]);
    }
    __syncthreads();
#pragma unroll
    for (int l = 0; l < kTileDepth; ++l) {
      acc_t a_frag[4], b_frag[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a_frag[i] = a_tile[l][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b_frag[j] = b_tile[l][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += a_frag[i] * b_frag[j];
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = ty + 16 * i;
    const int64_t row = row0 + r;
    if (row >= p.rows) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t col = col0 + tx + 16 * j;
      if (col >= p.cols) continue;
      out[row * p.out_row + col * p.out_col] =
          col < col_limit[r] ? static_cast<scalar_t>(acc[i][j]) : scalar_t(0);
    }
  }
}

}  // namespace

void nested_gemm_simt(NestedGemmKind kind, const at::Tensor& a, const at::Tensor& b,
                      at::Tensor& out, const at::Tensor& offsets, const GroupWidths& widths,
                      cudaStream_t stream) {
  const auto tiled = masked_gemm_args(kind, a, b, out);
  const auto& p = tiled.args;
  if (p.rows == 0 || p.cols == 0) return;
  const dim3 grid((p.rows + kTileRows - 1) / kTileRows, (p.cols + kTileCols - 1) / kTileCols);
  TORCH_CHECK(grid.y <= 65535, "nested GEMM: too many output columns (", p.cols, ")");
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a.scalar_type(), "nested_gemm_simt", [&] {
        masked_gemm_kernel<scalar_t><<<grid, kTileThreads, 0, stream>>>(
            p, tiled.a.data_ptr<scalar_t>(), tiled.b.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
            offsets.data_ptr<int32_t>(), widths);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

}  // namespace flextron::cuda
