// Input validation shared by the CPU and CUDA entry points of every flextron op.
// Errors say what was expected and what was given.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string>
#include <vector>

#include "nested_groups.h"

namespace flextron {

inline void check_dtype_float(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
                   name, " must be float64, float32, float16 or bfloat16, got ", dt);
}

inline void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                              const char* b_name) {
  TORCH_CHECK_VALUE(a.device() == b.device(), a_name, " and ", b_name,
                    " must be on the same device, got ", a.device(), " and ", b.device());
}

inline void check_index_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype,
                               int64_t dim) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must be ", dim, "-D, got shape ", t.sizes());
}

// Widths are configuration, not data: they live on the host so that they can be validated
// without a device sync and passed to kernels by value.
inline std::vector<int64_t> read_widths(const at::Tensor& widths, int64_t max_width,
                                        const char* max_name) {
  TORCH_CHECK_VALUE(
      widths.device().is_cpu(),
      "widths must be a CPU int32 tensor (it is configuration, read on the host), got a "
      "tensor on ",
      widths.device());
  check_index_tensor(widths, "widths", at::kInt, 1);
  const int64_t groups = widths.numel();
  TORCH_CHECK_VALUE(groups >= 1 && groups <= kMaxGroups, "widths must hold between 1 and ",
                    kMaxGroups, " entries, got ", groups);
  const auto w = widths.contiguous();
  const int32_t* p = w.data_ptr<int32_t>();
  std::vector<int64_t> out(p, p + groups);
  for (int64_t g = 0; g < groups; ++g) {
    TORCH_CHECK_VALUE(out[g] > 0, "widths must be positive, got ", at::IntArrayRef(out));
    TORCH_CHECK_VALUE(g == 0 || out[g] < out[g - 1], "widths must be strictly decreasing, got ",
                      at::IntArrayRef(out));
  }
  TORCH_CHECK_VALUE(out[0] <= max_width, "widths[0]=", out[0], " exceeds ", max_name, "=",
                    max_width);
  return out;
}

// Offsets are data (computed on the device by route_plan): shape and dtype are checked here,
// values on the host for CPU tensors and by device-side asserts in CUDA kernels.
inline void check_offsets_shape(const at::Tensor& offsets, int64_t groups, const at::Tensor& x) {
  check_index_tensor(offsets, "offsets", at::kInt, 1);
  TORCH_CHECK_VALUE(offsets.numel() == groups + 1, "offsets must have len(widths)+1=", groups + 1,
                    " entries, got ", offsets.numel());
  check_same_device(offsets, "offsets", x, "x");
}

inline void check_offsets_values_cpu(const at::Tensor& offsets, int64_t rows) {
  const auto o = offsets.contiguous();
  const int32_t* p = o.data_ptr<int32_t>();
  const int64_t n = o.numel();
  TORCH_CHECK_VALUE(p[0] == 0, "offsets must start at 0, got ", p[0]);
  for (int64_t i = 1; i < n; ++i) {
    TORCH_CHECK_VALUE(p[i] >= p[i - 1], "offsets must be non-decreasing, got offsets[", i - 1,
                      "]=", p[i - 1], " > offsets[", i, "]=", p[i]);
  }
  TORCH_CHECK_VALUE(p[n - 1] == rows, "offsets must end at the number of rows M=", rows, ", got ",
                    p[n - 1]);
}

// Validated host copy of CPU offsets, as int64 row bounds.
inline std::vector<int64_t> read_offsets_cpu(const at::Tensor& offsets, int64_t rows) {
  check_offsets_values_cpu(offsets, rows);
  const auto o = offsets.contiguous();
  const int32_t* p = o.data_ptr<int32_t>();
  return std::vector<int64_t>(p, p + o.numel());
}

}  // namespace flextron
