// CPU emulation of the CUDA nested GEMM backends' index logic, for tests on machines without a
// GPU. Both run the same host-device functions as the kernels (nested_groups.h,
// masked_tiles.h) on the same operands; only the arithmetic is done here in float64.
//   _nested_group_problems: the sm90 backend's per-group GEMM problems, as the device
//     argument kernel writes them (tests replay them against reference.py).
//   _masked_gemm_emulate: the SIMT backend's tile loop, thread loads included; returns the
//     output, how often each output element was written, and reads outside the operands.
#include <torch/library.h>

#include <vector>

#include "masked_tiles.h"
#include "nested_linear.h"

namespace flextron {
namespace {

NestedGemmKind to_kind(int64_t kind) {
  TORCH_CHECK_VALUE(kind >= 0 && kind <= 3, "kind must be 0..3 (NestedGemmKind), got ", kind);
  return static_cast<NestedGemmKind>(kind);
}

// Contiguous offsets, checked with the same function the device kernels use.
at::Tensor valid_offsets(const at::Tensor& offsets, const GroupWidths& widths, int64_t rows) {
  auto bounds = offsets.contiguous();
  TORCH_CHECK_VALUE(offsets_valid(bounds.data_ptr<int32_t>(), widths.count, rows),
                    "offsets must start at 0, not decrease and end at M=", rows);
  return bounds;
}

// [G, 8] int64: m, n, k, a_offset, b_offset, d_offset, zero_m, zero_n of every group.
at::Tensor nested_group_problems(int64_t kind_index, const at::Tensor& a, const at::Tensor& b,
                                 const at::Tensor& offsets, const at::Tensor& widths) {
  const auto kind = to_kind(kind_index);
  const auto checked = check_nested_inputs(kind, a, b, offsets, widths);
  const auto bounds = valid_offsets(offsets, checked, a.size(0));
  const auto operands = nested_operands(kind, a, b);
  auto out = at::empty({int64_t{checked.count}, 8}, at::kLong);
  auto* row = out.data_ptr<int64_t>();
  for (int g = 0; g < checked.count; ++g, row += 8) {
    const auto p = group_problem(kind, g, bounds.data_ptr<int32_t>(), checked, operands);
    const int64_t values[8] = {p.m,        p.n,        p.k,      p.a_offset,
                               p.b_offset, p.d_offset, p.zero_m, p.zero_n};
    std::copy(values, values + 8, row);
  }
  return out;
}

// Largest element offset a strided view can address.
int64_t last_element(const at::Tensor& t) {
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  return t.numel() == 0 ? -1 : last;
}

struct Emulation {
  const MaskedGemmArgs& p;
  const double* a;
  const double* b;
  int64_t a_last, b_last;
  const int32_t* offsets;
  const GroupWidths& widths;
  double* out;
  int32_t* writes;
  int64_t bad_reads = 0;

  double read(const double* base, int64_t element, int64_t last) {
    if (element < 0) return 0.0;
    if (element > last) {
      ++bad_reads;
      return 0.0;
    }
    return base[element];
  }

  void run_tile(int64_t row0, int64_t col0) {
    std::vector<int64_t> row_depth(kTileRows, 0), col_limit(kTileRows, 0);
    int64_t max_depth = 0, max_col_limit = 0;
    for (int r = 0; r < kTileRows; ++r) {
      if (row0 + r < p.rows) {
        const auto limits = row_limits(p, row0 + r, offsets, widths);
        row_depth[r] = limits.depth, col_limit[r] = limits.col_limit;
      }
      max_depth = std::max(max_depth, row_depth[r]);
      max_col_limit = std::max(max_col_limit, col_limit[r]);
    }
    const int64_t contraction = tile_contraction(col0, max_depth, max_col_limit);
    std::vector<double> acc(kTileRows * kTileCols, 0.0);
    std::vector<double> a_tile(kTileDepth * kTileRows), b_tile(kTileDepth * kTileCols);
    for (int64_t l0 = 0; l0 < contraction; l0 += kTileDepth) {
      for (int e = 0; e < kTileRows * kTileDepth; ++e) {
        const auto load = tile_load(e, kTileRows, p.a_depth);
        const int64_t element =
            a_element(p, row0 + load.index, l0 + load.depth, row_depth[load.index]);
        a_tile[load.depth * kTileRows + load.index] = read(a, element, a_last);
      }
      for (int e = 0; e < kTileCols * kTileDepth; ++e) {
        const auto bt = tile_load(e, kTileCols, p.b_depth);
        const int64_t element = b_element(p, col0 + bt.index, l0 + bt.depth, contraction);
        b_tile[bt.depth * kTileCols + bt.index] = read(b, element, b_last);
      }
      for (int l = 0; l < kTileDepth; ++l)
        for (int r = 0; r < kTileRows; ++r)
          for (int c = 0; c < kTileCols; ++c)
            acc[r * kTileCols + c] += a_tile[l * kTileRows + r] * b_tile[l * kTileCols + c];
    }
    for (int r = 0; r < kTileRows && row0 + r < p.rows; ++r) {
      for (int c = 0; c < kTileCols && col0 + c < p.cols; ++c) {
        const int64_t i = (row0 + r) * p.out_row + (col0 + c) * p.out_col;
        out[i] = col0 + c < col_limit[r] ? acc[r * kTileCols + c] : 0.0;
        ++writes[i];
      }
    }
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_gemm_emulate(int64_t kind_index,
                                                                   const at::Tensor& a,
                                                                   const at::Tensor& b,
                                                                   const at::Tensor& offsets,
                                                                   const at::Tensor& widths) {
  const auto kind = to_kind(kind_index);
  const auto checked = check_nested_inputs(kind, a, b, offsets, widths);
  const auto bounds = valid_offsets(offsets, checked, a.size(0));
  const auto shape = nested_output_shape(kind, a, b);
  auto out = at::empty(shape, a.options().dtype(at::kDouble));
  auto writes = at::zeros(shape, a.options().dtype(at::kInt));
  const auto tiled = masked_gemm_args(kind, a, b, out);
  // The kernel reads the operands in place, at their strides: keep the strides, in float64.
  const auto a64 =
      at::empty_strided(tiled.a.sizes(), tiled.a.strides(), at::kDouble).copy_(tiled.a);
  const auto b64 =
      at::empty_strided(tiled.b.sizes(), tiled.b.strides(), at::kDouble).copy_(tiled.b);
  Emulation emulation{tiled.args,        a64.data_ptr<double>(), b64.data_ptr<double>(),
                      last_element(a64), last_element(b64),      bounds.data_ptr<int32_t>(),
                      checked,           out.data_ptr<double>(), writes.data_ptr<int32_t>()};
  for (int64_t row0 = 0; row0 < tiled.args.rows; row0 += kTileRows) {
    for (int64_t col0 = 0; col0 < tiled.args.cols; col0 += kTileCols)
      emulation.run_tile(row0, col0);
  }
  return {out, writes, at::scalar_tensor(emulation.bad_reads, at::kLong)};
}

}  // namespace

TORCH_LIBRARY_IMPL(flextron, CPU, m) {
  m.impl("_nested_group_problems", &nested_group_problems);
  m.impl("_masked_gemm_emulate", &masked_gemm_emulate);
}

}  // namespace flextron
