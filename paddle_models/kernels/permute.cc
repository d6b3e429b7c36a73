// torch2paddle's CPU kernel for a dense permutation that keeps the last axis last: out = x.transpose(perm)
// written contiguously, any dtype of 4 bytes (float32 here).  Built and used as paddle_models/native.py
// says (layers.permute, where the permutation keeps the last axis).
//
// Attention splits and merges its heads by such permutations ([B, N, 3, heads, d] -> [3, B, heads, N, d],
// [B, heads, N, d] -> [B, N, heads, d]; window partitions [B, h, s, w, s, C] -> [B, h, w, s, s, C]).
// Paddle 3.3's CPU transpose makes a strided view that the next op copies through a slow generic path,
// and einsum's dense permutation runs one thread: on [512, 49, 3, 3, 32] -> [3, 512, 3, 49, 32] einsum
// takes 12.2 ms at two threads, torch's copy 2.1.  Here each output row (the d or C values of the kept
// last axis) is one contiguous copy from the input, the rows split among threads; the values are
// copied, never computed, so the result is the same whatever the thread count.

#include <cstdint>
#include <cstring>
#include <vector>

#include "paddle/extension.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

// The permutation's output axes with their sizes and input strides (in elements), neighbours that are
// also neighbours in the input merged, and the kept last axis folded into the row length.
struct Plan {
  std::vector<int64_t> sizes, strides;  // outer output axes
  int64_t row = 1;                      // contiguous values per output row
};

Plan MakePlan(const std::vector<int64_t>& shape, const std::vector<int64_t>& perm) {
  const int64_t rank = static_cast<int64_t>(shape.size());
  std::vector<int64_t> in_strides(rank, 1);
  for (int64_t a = rank - 2; a >= 0; --a) in_strides[a] = in_strides[a + 1] * shape[a + 1];
  Plan plan;
  plan.row = shape[rank - 1];
  for (int64_t i = 0; i + 1 < rank; ++i) {
    const int64_t size = shape[perm[i]], stride = in_strides[perm[i]];
    if (size == 1) continue;
    if (!plan.sizes.empty() && plan.strides.back() == stride * size) {  // contiguous with the previous
      plan.sizes.back() *= size;
      plan.strides.back() = stride;
    } else {
      plan.sizes.push_back(size);
      plan.strides.push_back(stride);
    }
  }
  // an innermost outer axis that is contiguous with the row joins it
  while (!plan.sizes.empty() && plan.strides.back() == plan.row) {
    plan.row *= plan.sizes.back();
    plan.sizes.pop_back();
    plan.strides.pop_back();
  }
  return plan;
}

void PermuteRows(const float* src, float* dst, const Plan& plan, int threads) {
  const int64_t axes = static_cast<int64_t>(plan.sizes.size());
  int64_t rows = 1;
  for (int64_t size : plan.sizes) rows *= size;
  const int64_t bytes = plan.row * static_cast<int64_t>(sizeof(float));
#pragma omp parallel num_threads(threads)
  {
    int64_t team = 1, me = 0;
#ifdef _OPENMP
    team = omp_get_num_threads();
    me = omp_get_thread_num();
#endif
    const int64_t first = rows * me / team, last = rows * (me + 1) / team;
    // the first row's index on each outer axis, then an odometer
    std::vector<int64_t> index(axes, 0);
    int64_t rest = first, offset = 0;
    for (int64_t a = axes - 1; a >= 0; --a) {
      index[a] = rest % plan.sizes[a];
      rest /= plan.sizes[a];
      offset += index[a] * plan.strides[a];
    }
    for (int64_t r = first; r < last; ++r) {
      std::memcpy(dst + r * plan.row, src + offset, bytes);
      for (int64_t a = axes - 1; a >= 0; --a) {
        offset += plan.strides[a];
        if (++index[a] < plan.sizes[a]) break;
        offset -= index[a] * plan.strides[a];
        index[a] = 0;
      }
    }
  }
}

}  // namespace

std::vector<paddle::Tensor> PermuteForward(const paddle::Tensor& x, const std::vector<int64_t>& perm, int threads) {
  PD_CHECK(x.is_cpu() && x.dtype() == paddle::DataType::FLOAT32, "t2p_permute: float32 CPU tensors only");
  const auto shape = x.shape();
  const int64_t rank = static_cast<int64_t>(shape.size());
  PD_CHECK(rank >= 1 && static_cast<int64_t>(perm.size()) == rank && perm[rank - 1] == rank - 1,
           "t2p_permute: a permutation of x's axes that keeps the last one");
  std::vector<int64_t> out_shape(rank), seen(rank, 0);
  for (int64_t i = 0; i < rank; ++i) {
    PD_CHECK(perm[i] >= 0 && perm[i] < rank && !seen[perm[i]]++, "t2p_permute: not a permutation");
    out_shape[i] = shape[perm[i]];
  }
  auto out = paddle::empty(out_shape, paddle::DataType::FLOAT32, paddle::CPUPlace());
  if (x.numel() > 0) PermuteRows(x.data<float>(), out.data<float>(), MakePlan(shape, perm), threads);
  return {out};
}

std::vector<std::vector<int64_t>> PermuteShape(const std::vector<int64_t>& x, const std::vector<int64_t>& perm, int) {
  std::vector<int64_t> out(x.size());
  for (size_t i = 0; i < x.size() && i < perm.size(); ++i) out[i] = x[perm[i]];
  return {out};
}

std::vector<paddle::DataType> PermuteDtype(const paddle::DataType& x) { return {x}; }

PD_BUILD_OP(t2p_permute)
    .Inputs({"X"})
    .Outputs({"Out"})
    .Attrs({"perm: std::vector<int64_t>", "threads: int"})
    .SetKernelFn(PD_KERNEL(PermuteForward))
    .SetInferShapeFn(PD_INFER_SHAPE(PermuteShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(PermuteDtype));
