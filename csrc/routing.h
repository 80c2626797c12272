// Validation shared by the CPU and CUDA routing kernels.
#pragma once

#include "checks.h"

namespace flextron {

inline void check_route_plan_inputs(const at::Tensor& choice, int64_t num_groups) {
  TORCH_CHECK_TYPE(choice.scalar_type() == at::kInt || choice.scalar_type() == at::kLong,
                   "choice must be int32 or int64, got ", choice.scalar_type());
  TORCH_CHECK_VALUE(choice.dim() == 1, "choice must be 1-D [T], got shape ", choice.sizes());
  TORCH_CHECK_VALUE(num_groups >= 1 && num_groups <= kMaxGroups, "num_groups must be in [1, ",
                    kMaxGroups, "], got ", num_groups);
  TORCH_CHECK_VALUE(choice.numel() < (int64_t{1} << 31),
                    "route_plan supports fewer than 2^31 tokens, got ", choice.numel());
}

inline void check_perm(const at::Tensor& perm, const at::Tensor& data, const char* data_name) {
  check_index_tensor(perm, "perm", at::kLong, 1);
  check_same_device(perm, "perm", data, data_name);
  TORCH_CHECK_VALUE(data.dim() >= 1, data_name,
                    " must have a leading token dimension, got a scalar");
  TORCH_CHECK_VALUE(perm.numel() == data.size(0), "perm has ", perm.numel(), " entries but ",
                    data_name, " has ", data.size(0), " rows");
}

inline void check_scale(const at::Tensor& scale, const at::Tensor& y) {
  check_same_device(scale, "scale", y, "y");
  TORCH_CHECK_TYPE(scale.scalar_type() == y.scalar_type(), "scale must have the dtype of y (",
                   y.scalar_type(), "), got ", scale.scalar_type());
  TORCH_CHECK_VALUE(scale.dim() == 1 && scale.numel() == y.size(0),
                    "scale must be 1-D with one entry "
                    "per token (",
                    y.size(0), "), got shape ", scale.sizes());
}

}  // namespace flextron
