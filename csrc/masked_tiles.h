// Index logic of the masked tiled GEMM (the SIMT backend, cuda/nested_gemm_simt.cu): which
// rows, columns and depths each output tile reads and writes. Host-device: the kernel calls
// these functions, and the CPU emulation (cpu/emulation.cpp) runs the kernel's tile loop on
// the host with the same functions, so CPU tests check coverage, bounds and values.
#pragma once

#include <c10/macros/Macros.h>

#include "nested_groups.h"

namespace flextron {

constexpr int kTileRows = 64;
constexpr int kTileCols = 64;
constexpr int kTileDepth = 16;
constexpr int kTileThreads = 256;  // 16 x 16 threads, 4 x 4 outputs each

// out[i, j] = sum_{l < depth(i)} A(i, l) * B(j, l) for j < col_limit(i), else 0, with
// A(i, l) = a[i * a_row + l * a_depth], B(j, l) = b[j * b_col + l * b_depth] and
// out[i, j] at i * out_row + j * out_col. Any strides: transposed views are read in place.
struct MaskedGemmArgs {
  NestedGemmKind kind;  // kNestedN, kNestedK or kWeightGradN (kWeightGradK is kWeightGradN
                        // on swapped operands with a transposed output)
  int64_t a_row, a_depth;
  int64_t b_col, b_depth;
  int64_t out_row, out_col;
  int64_t rows, cols, depth;  // depth: the full contraction length
  int64_t tokens;             // offsets[G] must equal this
};

struct RowLimits {
  int64_t depth;      // contraction length of this output row
  int64_t col_limit;  // columns >= col_limit are zeros
};

C10_HOST_DEVICE inline RowLimits row_limits(const MaskedGemmArgs& p, int64_t row,
                                            const int32_t* offsets, const GroupWidths& widths) {
  const int groups = widths.count;
  if (p.kind == NestedGemmKind::kNestedN) {
    return {p.depth, widths.values[group_of_row(offsets, groups, row)]};
  }
  if (p.kind == NestedGemmKind::kNestedK) {
    return {widths.values[group_of_row(offsets, groups, row)], p.cols};
  }
  // Weight row `row` lies in band g when widths[g+1] <= row < widths[g]; the tokens of groups
  // 0..g (the sorted prefix [0, offsets[g+1])) use it. Rows past widths[0]: no tokens.
  int g = -1;
  while (g + 1 < groups && row < widths.values[g + 1]) ++g;
  return {g < 0 ? 0 : offsets[g + 1], p.cols};
}

// The contraction a tile runs: none when no row of the tile keeps a column of it.
C10_HOST_DEVICE inline int64_t tile_contraction(int64_t col0, int64_t max_depth,
                                                int64_t max_col_limit) {
  return col0 >= max_col_limit ? 0 : max_depth;
}

struct TileLoad {
  int index;  // row (A) or column (B) within the tile
  int depth;  // depth within the kTileDepth slice
};

// Load map of element e of a tile slice: consecutive threads walk the operand's contiguous
// dimension (depth when depth_stride == 1, else the tile's rows/columns).
C10_HOST_DEVICE inline TileLoad tile_load(int e, int extent, int64_t depth_stride) {
  if (depth_stride == 1) return {e / kTileDepth, e % kTileDepth};
  return {e % extent, e / extent};
}

// Element offset of A(row, depth), or -1 where the tile reads a zero instead.
C10_HOST_DEVICE inline int64_t a_element(const MaskedGemmArgs& p, int64_t row, int64_t depth,
                                         int64_t row_depth) {
  return row < p.rows && depth < row_depth ? row * p.a_row + depth * p.a_depth : -1;
}

// Element offset of B(col, depth), or -1 where the tile reads a zero instead.
C10_HOST_DEVICE inline int64_t b_element(const MaskedGemmArgs& p, int64_t col, int64_t depth,
                                         int64_t max_depth) {
  return col < p.cols && depth < max_depth ? col * p.b_col + depth * p.b_depth : -1;
}

}  // namespace flextron
