// CPU kernels of the nested GEMMs: BLAS calls (at::mm_out / addmm_) on weight slices, in
// staircase order. Tokens are sorted widest first, so the band of widths [d_{j+1}, d_j) is
// used by groups 0..j: the sorted prefix [0, offsets[j+1]). One GEMM per band over that
// prefix reads each weight element once and is taller than one GEMM per group (measured
// 0.46-0.81x the per-group time at 16-256 tokens, SmolLM shapes, 2 threads); bands whose
// prefixes are equal (the groups between them are empty) are one GEMM, so a single group is
// one GEMM as before. BLAS parallelises each call; bands run one after another.
#include <torch/library.h>

#include <vector>

#include "nested_linear.h"

namespace flextron {
namespace {

// BLAS takes a row-major or a column-major operand as it is: a transposed weight view (the
// backward passes weight.t()) is read in place instead of copied.
at::Tensor blas_operand(const at::Tensor& t) {
  return t.stride(1) == 1 || t.stride(0) == 1 ? t : t.contiguous();
}

// The bands [start, end) of widths and the token prefix that uses each, narrowest first,
// merging neighbours with the same prefix.
struct Band {
  int64_t start, end, prefix;
};

std::vector<Band> staircase(const GroupWidths& widths, const std::vector<int64_t>& bounds) {
  std::vector<Band> bands;
  for (int k = widths.count - 1; k >= 0;) {
    const int64_t prefix = bounds[k + 1];
    int j = k;
    while (j > 0 && bounds[j] == prefix) --j;  // groups j..k-1 past j are empty: same prefix
    const int64_t start = k + 1 < widths.count ? widths.values[k + 1] : 0;
    bands.push_back({start, widths.values[j], prefix});
    k = j - 1;
  }
  return bands;
}

at::Tensor nested_linear_n_cpu(const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& offsets, const at::Tensor& widths_in,
                               bool zero_tails) {
  const auto widths = check_nested_inputs(NestedGemmKind::kNestedN, x, weight, offsets, widths_in);
  const auto bounds = read_offsets_cpu(offsets, x.size(0));
  const auto a = x.contiguous();
  const auto w = blas_operand(weight);
  auto out = at::empty({a.size(0), w.size(0)}, a.options());
  for (const auto& band : staircase(widths, bounds)) {
    if (band.prefix == 0) continue;
    auto out_block = out.narrow(0, 0, band.prefix).narrow(1, band.start, band.end - band.start);
    if (a.size(1) == 0) {
      out_block.zero_();
    } else {
      at::mm_out(out_block, a.narrow(0, 0, band.prefix),
                 w.narrow(0, band.start, band.end - band.start).t());
    }
  }
  if (zero_tails) {
    for (int g = 0; g < widths.count; ++g) {
      const int64_t rows = bounds[g + 1] - bounds[g], d = widths.values[g];
      if (rows > 0) out.narrow(0, bounds[g], rows).narrow(1, d, w.size(0) - d).zero_();
    }
  }
  return out;
}

// y[:P] += x[:P, band] @ W[:, band]^T band by band; the narrowest band covers every token
// and writes y, the wider ones accumulate into their prefixes.
at::Tensor nested_linear_k_cpu(const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& offsets, const at::Tensor& widths_in) {
  const auto widths = check_nested_inputs(NestedGemmKind::kNestedK, x, weight, offsets, widths_in);
  const auto bounds = read_offsets_cpu(offsets, x.size(0));
  const auto a = x.contiguous();
  const auto w = blas_operand(weight);
  auto out = at::empty({a.size(0), w.size(0)}, a.options());
  bool written = false;
  for (const auto& band : staircase(widths, bounds)) {
    if (band.prefix == 0) continue;
    auto out_rows = out.narrow(0, 0, band.prefix);
    const auto x_band = a.narrow(0, 0, band.prefix).narrow(1, band.start, band.end - band.start);
    const auto w_band = w.narrow(1, band.start, band.end - band.start).t();
    if (written) {
      out_rows.addmm_(x_band, w_band);
    } else {
      at::mm_out(out_rows, x_band, w_band);
      written = true;
    }
  }
  return out;
}

// Staircase: the weight band [d_{g+1}, d_g) (rows for kWeightGradN, columns for kWeightGradK)
// is used by the tokens of groups 0..g, the sorted prefix [0, offsets[g+1]). Each band is
// written once, by one GEMM; bands no token uses, and the part past widths[0], are zero.
at::Tensor weight_grad_cpu(NestedGemmKind kind, const at::Tensor& grad_out, const at::Tensor& x,
                           const at::Tensor& offsets, const at::Tensor& widths_in) {
  const auto widths = check_nested_inputs(kind, grad_out, x, offsets, widths_in);
  const auto bounds = read_offsets_cpu(offsets, x.size(0));
  const auto dy = grad_out.contiguous();
  const auto a = x.contiguous();
  const bool row_bands = kind == NestedGemmKind::kWeightGradN;
  const int band_dim = row_bands ? 0 : 1;
  auto out = at::empty(nested_output_shape(kind, dy, a), a.options());
  out.narrow(band_dim, widths.values[0], out.size(band_dim) - widths.values[0]).zero_();
  for (int g = 0; g < widths.count; ++g) {
    const int64_t band_end = widths.values[g];
    const int64_t band_start = g + 1 < widths.count ? widths.values[g + 1] : 0;
    const int64_t prefix = bounds[g + 1];
    auto out_band = out.narrow(band_dim, band_start, band_end - band_start);
    if (prefix == 0 || out.numel() == 0) {
      out_band.zero_();
      continue;
    }
    const auto dy_rows = dy.narrow(0, 0, prefix);
    const auto x_rows = a.narrow(0, 0, prefix);
    if (row_bands) {  // dy[:P, band].T @ x[:P]
      at::mm_out(out_band, dy_rows.narrow(1, band_start, band_end - band_start).t(), x_rows);
    } else {  // dy[:P].T @ x[:P, band]
      at::mm_out(out_band, dy_rows.t(), x_rows.narrow(1, band_start, band_end - band_start));
    }
  }
  return out;
}

at::Tensor nested_weight_grad_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                  const at::Tensor& offsets, const at::Tensor& widths) {
  return weight_grad_cpu(NestedGemmKind::kWeightGradN, grad_out, x, offsets, widths);
}

at::Tensor nested_weight_grad_k_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                    const at::Tensor& offsets, const at::Tensor& widths) {
  return weight_grad_cpu(NestedGemmKind::kWeightGradK, grad_out, x, offsets, widths);
}

}  // namespace

TORCH_LIBRARY_IMPL(flextron, CPU, m) {
  m.impl("nested_linear_n", &nested_linear_n_cpu);
  m.impl("nested_linear_k", &nested_linear_k_cpu);
  m.impl("nested_weight_grad", &nested_weight_grad_cpu);
  m.impl("nested_weight_grad_k", &nested_weight_grad_k_cpu);
}

}  // namespace flextron
