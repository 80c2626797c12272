// Where each group of a nested grouped GEMM reads and writes. Host-device: the CUDA argument
// kernel of the sm90 backend calls group_problem() for every group, and CPU tests call the same
// function through flextron._C (debug entry points) to check coverage, bounds and the K > 0
// rule against reference.py.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace flextron {

// Groups are few (a handful of width choices); kernels take them by value.
constexpr int64_t kMaxGroups = 64;

// The four nested GEMMs. P_g = offsets[g+1] is the sorted-token prefix of groups 0..g, the
// tokens whose width covers the band [d_{g+1}, d_g) (d_G = 0).
enum class NestedGemmKind : int {
  kNestedN = 0,      // out[M, Nmax]: rows of group g = x @ w[:d_g].T in columns < d_g
  kNestedK = 1,      // out[M, N]:    rows of group g = x[:, :d_g] @ w[:, :d_g].T
  kWeightGradN = 2,  // out[Nmax, K]: row band [d_{g+1}, d_g) = dy[:P_g, band].T @ x[:P_g]
  kWeightGradK = 3,  // out[N, Kmax]: column band [d_{g+1}, d_g) = dy[:P_g].T @ x[:P_g, band]
};

struct GroupWidths {
  int32_t count;
  int32_t values[kMaxGroups];
};

// The operands of one call, in elements. a, b, d are as CUTLASS sees them:
//   kNestedN/K:  a = x [rows, *] row-major, b = weight (either layout: ldb is its leading
//                dimension), d = out;  n_full = out columns (kNestedK), k_full = x columns.
//   kWeightGrad: a = grad_out [rows, *], b = x [rows, *], d = out; n_full = d's other extent.
struct NestedOperands {
  int64_t rows;    // M: sorted tokens
  int64_t n_full;  // kNestedK: N; kWeightGradN: K (x columns); kWeightGradK: N (dy columns)
  int64_t k_full;  // kNestedN: K (x columns)
  int64_t lda, ldb, ldd;
};

// One GEMM of the grouped launch: D[m, n] = sum_k A[m, k] B[n, k] over the block at the
// offsets. A group with nothing to contract (an empty token prefix) gets m = 0, so CUTLASS
// skips it, and k > 0 still: a problem with K = 0 hangs the kernel
// (https://github.com/NVIDIA/cutlass/pull/1593). Its output block (zero_m x zero_n at
// d_offset, ldd) must then be zeroed by the caller.
struct GroupProblem {
  int32_t m, n, k;
  int64_t a_offset, b_offset, d_offset;
  int32_t zero_m, zero_n;
};

// The k given to skipped problems: one TMA-aligned vector of 16-bit elements.
constexpr int32_t kSkippedK = 8;

C10_HOST_DEVICE inline bool offsets_valid(const int32_t* offsets, int groups, int64_t rows) {
  if (offsets[0] != 0 || offsets[groups] != rows) return false;
  for (int g = 0; g < groups; ++g) {
    if (offsets[g] > offsets[g + 1]) return false;
  }
  return true;
}

// Group of a sorted row (token): groups are few, so a linear scan.
C10_HOST_DEVICE inline int group_of_row(const int32_t* offsets, int groups, int64_t row) {
  int g = 0;
  while (g + 1 < groups && row >= offsets[g + 1]) ++g;
  return g;
}

// Offsets must be valid (offsets_valid); an invalid set gives every group an empty problem.
C10_HOST_DEVICE inline GroupProblem group_problem(NestedGemmKind kind, int g,
                                                  const int32_t* offsets, const GroupWidths& widths,
                                                  const NestedOperands& ops) {
  GroupProblem p{0, 0, kSkippedK, 0, 0, 0, 0, 0};
  const int32_t start = offsets[g], end = offsets[g + 1];
  const int32_t width = widths.values[g];
  const int32_t next = g + 1 < widths.count ? widths.values[g + 1] : 0;
  switch (kind) {
    case NestedGemmKind::kNestedN:  // rows [start, end) x columns [0, width), K = x columns
      p.m = end - start, p.n = width, p.k = static_cast<int32_t>(ops.k_full);
      p.a_offset = start * ops.lda, p.d_offset = start * ops.ldd;
      break;
    case NestedGemmKind::kNestedK:  // rows [start, end), all N columns, K = width
      p.m = end - start, p.n = static_cast<int32_t>(ops.n_full), p.k = width;
      p.a_offset = start * ops.lda, p.d_offset = start * ops.ldd;
      break;
    case NestedGemmKind::kWeightGradN:  // out rows [next, width) over the token prefix [0, end)
      p.m = width - next, p.n = static_cast<int32_t>(ops.n_full), p.k = end;
      p.a_offset = next, p.d_offset = next * ops.ldd;  // A = dy^T: column `next` of dy
      break;
    case NestedGemmKind::kWeightGradK:  // out columns [next, width) over the prefix [0, end)
      p.m = static_cast<int32_t>(ops.n_full), p.n = width - next, p.k = end;
      p.b_offset = next, p.d_offset = next;  // B = x[:, next:], D = out[:, next:]
      break;
  }
  if (p.k == 0) {  // empty prefix (weight gradients only): skip the GEMM, zero the block
    p.zero_m = p.m, p.zero_n = p.n;
    p.m = 0, p.k = kSkippedK;
  }
  return p;
}

}  // namespace flextron
