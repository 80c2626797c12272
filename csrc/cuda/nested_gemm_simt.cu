// A masked tiled GEMM on CUDA cores: the portable path (any float dtype, any architecture;
// sm_80 and the fp32/fp64 inputs use it). One launch covers all groups: each output row
// knows its group from the device offsets, a tile that spans two groups masks per row, so
// the result is exact whatever the tile boundaries.
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/macros/Macros.h>

#include "cuda/nested_gemm.h"

namespace flextron::cuda {
namespace {

constexpr int kTileRows = 64;
constexpr int kTileCols = 64;
constexpr int kTileDepth = 16;
constexpr int kThreads = 256;  // 16 x 16 threads, 4 x 4 outputs each

// out[i, j] = sum_{l < depth(i)} A(i, l) * B(j, l) for j < col_limit(i), else 0, with
// A(i, l) = a[i * a_row + l * a_depth] and B(j, l) = b[j * b_col + l * b_depth].
template <typename scalar_t>
struct MaskedGemm {
  const scalar_t* a;
  int64_t a_row, a_depth;
  const scalar_t* b;
  int64_t b_col, b_depth;
  scalar_t* out;
  int64_t ldo;
  int64_t rows, cols, depth;  // depth: the full contraction length
  int64_t offsets_end;        // offsets[G] must equal this (M tokens)
};

template <NestedGemmKind kind>
__device__ void row_limits(int64_t row, const int32_t* offsets, const GroupWidths& widths,
                           int64_t depth, int64_t cols, int64_t* row_depth, int64_t* col_limit) {
  const int groups = widths.count;
  if constexpr (kind == NestedGemmKind::kNestedN) {
    *row_depth = depth;
    *col_limit = widths.values[group_of_row(offsets, groups, row)];
  } else if constexpr (kind == NestedGemmKind::kNestedK) {
    *row_depth = widths.values[group_of_row(offsets, groups, row)];
    *col_limit = cols;
  } else {
    // Weight row `row` lies in band g when widths[g+1] <= row < widths[g]; tokens of groups
    // 0..g (the sorted prefix [0, offsets[g+1])) use it.
    int g = -1;
    while (g + 1 < groups && row < widths.values[g + 1]) ++g;
    *row_depth = g < 0 ? 0 : offsets[g + 1];
    *col_limit = cols;
  }
}

template <typename scalar_t, NestedGemmKind kind>
__global__ void __launch_bounds__(kThreads)
    masked_gemm_kernel(MaskedGemm<scalar_t> p, const int32_t* __restrict__ offsets_global,
                       GroupWidths widths) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ int32_t offsets[kMaxGroups + 1];
  __shared__ int64_t tile_depth[kTileRows];
  __shared__ int64_t tile_col_limit[kTileRows];
  __shared__ acc_t a_tile[kTileDepth][kTileRows + 1];
  __shared__ acc_t b_tile[kTileDepth][kTileCols + 1];

  const int tid = threadIdx.x;
  const int64_t row0 = int64_t(blockIdx.x) * kTileRows;
  const int64_t col0 = int64_t(blockIdx.y) * kTileCols;
  for (int g = tid; g <= widths.count; g += kThreads) offsets[g] = offsets_global[g];
  __syncthreads();
  if (tid == 0) {
    CUDA_KERNEL_ASSERT(offsets[0] == 0 && "offsets must start at 0");
    CUDA_KERNEL_ASSERT(offsets[widths.count] == p.offsets_end && "offsets must end at M");
    for (int g = 0; g < widths.count; ++g) {
      CUDA_KERNEL_ASSERT(offsets[g] <= offsets[g + 1] && "offsets must be non-decreasing");
    }
  }
  int64_t max_depth = 0, max_col_limit = 0;
  for (int r = tid; r < kTileRows; r += kThreads) {
    int64_t d = 0, c = 0;
    if (row0 + r < p.rows) row_limits<kind>(row0 + r, offsets, widths, p.depth, p.cols, &d, &c);
    tile_depth[r] = d;
    tile_col_limit[r] = c;
  }
  __syncthreads();
  for (int r = 0; r < kTileRows; ++r) {
    max_depth = max(max_depth, tile_depth[r]);
    max_col_limit = max(max_col_limit, tile_col_limit[r]);
  }
  // Columns no row of this tile keeps: zeros only, no contraction.
  if (col0 >= max_col_limit) max_depth = 0;

  const int tx = tid % 16, ty = tid / 16;
  acc_t acc[4][4] = {};
  for (int64_t l0 = 0; l0 < max_depth; l0 += kTileDepth) {
    for (int e = tid; e < kTileRows * kTileDepth; e += kThreads) {
      // Walk the operand's contiguous dimension with consecutive threads.
      const int r = p.a_depth == 1 ? e / kTileDepth : e % kTileRows;
      const int l = p.a_depth == 1 ? e % kTileDepth : e / kTileRows;
      const int64_t row = row0 + r, depth = l0 + l;
      acc_t v = 0;
      if (row < p.rows && depth < tile_depth[r]) v = static_cast<acc_t>(p.a[row * p.a_row + depth * p.a_depth]);
      a_tile[l][r] = v;
    }
    for (int e = tid; e < kTileCols * kTileDepth; e += kThreads) {
      const int c = p.b_depth == 1 ? e / kTileDepth : e % kTileCols;
      const int l = p.b_depth == 1 ? e % kTileDepth : e / kTileCols;
      const int64_t col = col0 + c, depth = l0 + l;
      acc_t v = 0;
      if (col < p.cols && depth < max_depth) v = static_cast<acc_t>(p.b[col * p.b_col + depth * p.b_depth]);
      b_tile[l][c] = v;
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
      p.out[row * p.ldo + col] = col < tile_col_limit[r] ? static_cast<scalar_t>(acc[i][j]) : scalar_t(0);
    }
  }
}

template <typename scalar_t, NestedGemmKind kind>
void launch(MaskedGemm<scalar_t> p, const at::Tensor& offsets, const GroupWidths& widths,
            cudaStream_t stream) {
  if (p.rows == 0 || p.cols == 0) return;
  const dim3 grid((p.rows + kTileRows - 1) / kTileRows, (p.cols + kTileCols - 1) / kTileCols);
  TORCH_CHECK(grid.y <= 65535, "nested GEMM: too many output columns (", p.cols, ")");
  masked_gemm_kernel<scalar_t, kind><<<grid, kThreads, 0, stream>>>(p, offsets.data_ptr<int32_t>(), widths);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void nested_gemm_simt(NestedGemmKind kind, const at::Tensor& a, const at::Tensor& b,
                      at::Tensor& out, const at::Tensor& offsets, const GroupWidths& widths,
                      cudaStream_t stream) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "nested_gemm_simt", [&] {
    MaskedGemm<scalar_t> p{};
    p.a = a.data_ptr<scalar_t>();
    p.b = b.data_ptr<scalar_t>();
    p.out = out.data_ptr<scalar_t>();
    p.ldo = out.size(1);
    p.rows = out.size(0);
    p.cols = out.size(1);
    switch (kind) {
      case NestedGemmKind::kNestedN:  // a = x [M, K], b = w [Nmax, K]
      case NestedGemmKind::kNestedK:  // a = x [M, Kmax], b = w [N, Kmax]
        p.a_row = a.size(1), p.a_depth = 1, p.b_col = b.size(1), p.b_depth = 1;
        p.depth = a.size(1);
        p.offsets_end = a.size(0);
        if (kind == NestedGemmKind::kNestedN) {
          launch<scalar_t, NestedGemmKind::kNestedN>(p, offsets, widths, stream);
        } else {
          launch<scalar_t, NestedGemmKind::kNestedK>(p, offsets, widths, stream);
        }
        break;
      case NestedGemmKind::kWeightGrad:  // a = dy [M, Nmax] read as A(n, t), b = x [M, K] as B(k, t)
        p.a_row = 1, p.a_depth = a.size(1), p.b_col = 1, p.b_depth = b.size(1);
        p.depth = a.size(0);
        p.offsets_end = a.size(0);
        launch<scalar_t, NestedGemmKind::kWeightGrad>(p, offsets, widths, stream);
        break;
    }
  });
}

}  // namespace flextron::cuda
