// Schemas of the flextron torch ops. Kernels are registered per backend in cpu/ and cuda/;
// fake (meta) kernels and autograd live in python/flextron/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(flextron, m) {
  // Stable counting sort of tokens by width choice (group 0 = widest first).
  // Returns perm (int64 [T]: sorted position -> token) and offsets (int32 [G+1]).
  m.def("route_plan(Tensor choice, int num_groups) -> (Tensor perm, Tensor offsets)");
  // out[i] = x[perm[i]]
  m.def("permute(Tensor x, Tensor perm) -> Tensor");
  // out[perm[i]] = y[i] * scale[perm[i]]   (scale is per token, in original order)
  m.def("unpermute(Tensor y, Tensor perm, Tensor? scale=None) -> Tensor");
  // Rows of group g: y[:, :d_g] = x @ weight[:d_g].T, y[:, d_g:] = 0 (unspecified with
  // zero_tails=False, for consumers that read only each row's width).
  m.def(
      "nested_linear_n(Tensor x, Tensor weight, Tensor offsets, Tensor widths, bool "
      "zero_tails=True) -> Tensor");
  // Rows of group g: y = x[:, :d_g] @ weight[:, :d_g].T.
  m.def("nested_linear_k(Tensor x, Tensor weight, Tensor offsets, Tensor widths) -> Tensor");
  // Staircase weight gradient of nested_linear_n: out[Nmax, K], row band [d_{g+1}, d_g) is
  // grad_out[:P_g, band].T @ x[:P_g] with P_g = offsets[g+1]; rows >= d_0 are zero.
  m.def("nested_weight_grad(Tensor grad_out, Tensor x, Tensor offsets, Tensor widths) -> Tensor");
  // Staircase weight gradient of nested_linear_k: out[N, Kmax], column band [d_{g+1}, d_g) is
  // grad_out[:P_g].T @ x[:P_g, band]; columns >= d_0 are zero.
  m.def("nested_weight_grad_k(Tensor grad_out, Tensor x, Tensor offsets, Tensor widths) -> Tensor");
  // Rows of group g: out[:, :d_g] = act(h, gate)[:, :d_g], out[:, d_g:] = 0. activation is
  // "swiglu" (silu(gate) * h, gate required), "gelu" or "gelu_tanh" (gate must be None).
  m.def(
      "nested_activation(Tensor h, Tensor? gate, Tensor offsets, Tensor widths, str activation) -> "
      "Tensor");
  // Gradients of nested_activation in h and gate (gate's is empty without a gate).
  m.def(
      "nested_activation_backward(Tensor grad, Tensor h, Tensor? gate, Tensor offsets, Tensor "
      "widths, str activation) -> (Tensor grad_h, Tensor grad_gate)");

  // Debug entry points for the CPU tests of the CUDA index logic (not API; cpu/emulation.cpp):
  // the sm90 backend's group problems [G, 8], the SIMT backend's tile loop emulated in fp64
  // (out, writes per element, reads out of bounds), and CUTLASS's host-side can_implement.
  m.def(
      "_nested_group_problems(int kind, Tensor a, Tensor b, Tensor offsets, Tensor widths) -> "
      "Tensor");
  m.def(
      "_masked_gemm_emulate(int kind, Tensor a, Tensor b, Tensor offsets, Tensor widths) -> "
      "(Tensor, Tensor, Tensor)");
  m.def("_sm90_can_implement(Tensor problems, ScalarType dtype, int layout) -> bool");
}
