// The flextron._C Python module: importing it loads the shared library, which registers the
// torch ops (torch.ops.flextron.*). It also reports how the extension was built.
#include <pybind11/pybind11.h>

#include <string>

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
}
