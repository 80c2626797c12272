// CPU kernels of route_plan, permute and unpermute.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "routing.h"

namespace flextron {
namespace {

template <typename index_t>
void counting_sort(const index_t* choice, int64_t tokens, int64_t groups, int64_t* perm,
                   int32_t* offsets) {
  std::vector<int64_t> counts(groups, 0);
  for (int64_t t = 0; t < tokens; ++t) {
    const index_t c = choice[t];
    TORCH_CHECK_VALUE(c >= 0 && c < groups, "choice values must be in [0, ", groups, "), got ",
                      static_cast<int64_t>(c), " at token ", t);
    ++counts[c];
  }
  std::vector<int64_t> cursor(groups, 0);
  offsets[0] = 0;
  for (int64_t g = 0; g < groups; ++g) {
    cursor[g] = offsets[g];
    offsets[g + 1] = static_cast<int32_t>(offsets[g] + counts[g]);
  }
  for (int64_t t = 0; t < tokens; ++t) perm[cursor[choice[t]]++] = t;
}

std::tuple<at::Tensor, at::Tensor> route_plan_cpu(const at::Tensor& choice, int64_t num_groups) {
  check_route_plan_inputs(choice, num_groups);
  const auto c = choice.contiguous();
  const int64_t tokens = c.numel();
  auto perm = at::empty({tokens}, c.options().dtype(at::kLong));
  auto offsets = at::empty({num_groups + 1}, c.options().dtype(at::kInt));
  if (c.scalar_type() == at::kInt) {
    counting_sort(c.data_ptr<int32_t>(), tokens, num_groups, perm.data_ptr<int64_t>(),
                  offsets.data_ptr<int32_t>());
  } else {
    counting_sort(c.data_ptr<int64_t>(), tokens, num_groups, perm.data_ptr<int64_t>(),
                  offsets.data_ptr<int32_t>());
  }
  return {perm, offsets};
}

// Rows are copied as raw bytes: permute is a pure gather and needs no dtype dispatch.
at::Tensor permute_cpu(const at::Tensor& x, const at::Tensor& perm) {
  check_perm(perm, x, "x");
  const auto src = x.contiguous();
  const auto p = perm.contiguous();
  auto out = at::empty_like(src);
  const int64_t rows = src.size(0);
  if (rows == 0 || src.numel() == 0) return out;
  const int64_t row_bytes = src.numel() / rows * src.element_size();
  const int64_t* idx = p.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows; ++i) {
    TORCH_CHECK_VALUE(idx[i] >= 0 && idx[i] < rows, "perm values must be in [0, ", rows, "), got ",
                      idx[i], " at position ", i);
  }
  const char* in_bytes = static_cast<const char*>(src.data_ptr());
  char* out_bytes = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      std::memcpy(out_bytes + i * row_bytes, in_bytes + idx[i] * row_bytes, row_bytes);
    }
  });
  return out;
}

at::Tensor unpermute_cpu(const at::Tensor& y, const at::Tensor& perm,
                         const std::optional<at::Tensor>& scale) {
  check_perm(perm, y, "y");
  check_dtype_float(y, "y");
  if (scale.has_value()) check_scale(*scale, y);
  const auto src = y.contiguous();
  const auto p = perm.contiguous();
  const int64_t rows = src.size(0);
  // Every row is written exactly once when perm is a permutation, which is checked here:
  // no zero fill first.
  auto out = at::empty_like(src);
  if (rows == 0 || src.numel() == 0) return out;
  const int64_t cols = src.numel() / rows;
  const int64_t* idx = p.data_ptr<int64_t>();
  std::vector<bool> reached(rows, false);
  for (int64_t i = 0; i < rows; ++i) {
    TORCH_CHECK_VALUE(idx[i] >= 0 && idx[i] < rows, "perm values must be in [0, ", rows, "), got ",
                      idx[i], " at position ", i);
    TORCH_CHECK_VALUE(!reached[idx[i]], "perm must be a permutation of [0, ", rows, "), got ",
                      idx[i], " twice");
    reached[idx[i]] = true;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, src.scalar_type(), "unpermute_cpu", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        const scalar_t* in = src.data_ptr<scalar_t>();
        scalar_t* o = out.data_ptr<scalar_t>();
        const scalar_t* s = nullptr;
        at::Tensor scale_contig;
        if (scale.has_value()) {
          scale_contig = scale->contiguous();
          s = scale_contig.data_ptr<scalar_t>();
        }
        at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            const int64_t token = idx[i];
            const scalar_t* row_in = in + i * cols;
            scalar_t* row_out = o + token * cols;
            if (s == nullptr) {
              std::memcpy(row_out, row_in, cols * sizeof(scalar_t));
            } else {
              const opmath_t factor = static_cast<opmath_t>(s[token]);
              for (int64_t j = 0; j < cols; ++j) {
                row_out[j] = static_cast<scalar_t>(static_cast<opmath_t>(row_in[j]) * factor);
              }
            }
          }
        });
      });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(flextron, CPU, m) {
  m.impl("route_plan", &route_plan_cpu);
  m.impl("permute", &permute_cpu);
  m.impl("unpermute", &unpermute_cpu);
}

}  // namespace flextron
