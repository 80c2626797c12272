// The flextron._C Python module: importing it loads the shared library, which registers the
// torch ops (torch.ops.flextron.*). It also reports how the extension was built, and holds
// the one dispatch knob the GPU check sets from measurements.
#include <pybind11/pybind11.h>

#include <string>

#include "nested_linear.h"

namespace {

#ifdef FLEXTRON_WITH_CUDA
constexpr bool kWithCuda = true;
constexpr const char* kCudaArchs = FLEXTRON_CUDA_ARCHS_STRING;
#else
constexpr bool kWithCuda = false;
constexpr const char* kCudaArchs = "";
#endif

#ifdef FLEXTRON_HAS_SM90
constexpr bool kWithSm90 = true;
#else
constexpr bool kWithSm90 = false;
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "flextron native kernels (ops are registered as torch.ops.flextron.*)";
  m.attr("with_cuda") = kWithCuda;
  m.attr("with_sm90") = kWithSm90;
  m.attr("cuda_archs") = std::string(kCudaArchs);
  m.def(
      "set_dense_rows_limit",
      [](int64_t rows) {
        if (rows < 0)
          throw pybind11::value_error("dense_rows_limit must be >= 0, got " + std::to_string(rows));
        return flextron::dense_rows_limit().exchange(rows);
      },
      pybind11::arg("rows"),
      "Token counts up to `rows` run nested_linear_n/k on the GPU as one dense GEMM at the widest "
      "width (the rest: the grouped GEMM). Returns the previous limit.");
}
