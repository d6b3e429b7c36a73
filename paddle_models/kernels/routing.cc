// torch2paddle's CPU kernels for BiFormer's region routing, float32.  Built and used as
// paddle_models/native.py says.
//
// t2p_gather_blocks: out[m, j] = x[m, index[j]] for x [M, R, ...] (KVGather: every query region's
// routed key / value regions, each a block of tokens x d contiguous values).  Paddle 3.3's CPU gather
// along axis 1 runs one thread: 178 ms of biformer_small's 918 ms dygraph forward at batch 8, two
// threads.  Here each block is one copy, the blocks split among threads; copies, so the result is the
// same whatever the thread count.
//
// t2p_axis_mean: out[a, d] = mean over t of x[a, t, d] for x [A, T, D] (the region means the router
// compares), summed in double in t's order and divided in double, rounded once to float: what
// numerics.mean computes by casting to float64 and back (correctly rounded either way), without the
// float64 copy of the map and in one pass: Paddle's cast and float64 mean took 89 ms of that forward.

#include <cstdint>
#include <cstring>
#include <vector>

#include "paddle/extension.h"

std::vector<paddle::Tensor> GatherBlocksForward(const paddle::Tensor& x, const paddle::Tensor& index, int threads) {
  PD_CHECK(x.is_cpu() && index.is_cpu() && x.dtype() == paddle::DataType::FLOAT32,
           "t2p_gather_blocks: a float32 CPU x and a CPU index");
  PD_CHECK(index.dtype() == paddle::DataType::INT64, "t2p_gather_blocks: an int64 index");
  auto shape = x.shape();
  PD_CHECK(shape.size() >= 2 && index.shape().size() == 1, "t2p_gather_blocks: x [M, R, ...], index [J]");
  const int64_t outer = shape[0], regions = shape[1], picks = index.numel();
  const int64_t block = regions == 0 || outer == 0 ? 0 : x.numel() / (outer * regions);
  const int64_t* picked = index.data<int64_t>();
  for (int64_t j = 0; j < picks; ++j)
    PD_CHECK(picked[j] >= 0 && picked[j] < regions, "t2p_gather_blocks: an index out of range");
  shape[1] = picks;
  auto out = paddle::empty(shape, paddle::DataType::FLOAT32, paddle::CPUPlace());
  const float* src = x.data<float>();
  float* dst = out.data<float>();
  const size_t bytes = static_cast<size_t>(block) * sizeof(float);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t task = 0; task < outer * picks; ++task) {
    const int64_t m = task / picks, j = task % picks;
    std::memcpy(dst + task * block, src + (m * regions + picked[j]) * block, bytes);
  }
  return {out};
}

std::vector<paddle::Tensor> AxisMeanForward(const paddle::Tensor& x, int64_t outer, int64_t length, int threads) {
  PD_CHECK(x.is_cpu() && x.dtype() == paddle::DataType::FLOAT32, "t2p_axis_mean: float32 CPU tensors only");
  PD_CHECK(outer > 0 && length > 0 && x.numel() % (outer * length) == 0, "t2p_axis_mean: x [A, T, D]");
  const int64_t inner = x.numel() / (outer * length);
  auto out = paddle::empty({outer, inner}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  const float* src = x.data<float>();
  float* dst = out.data<float>();
#pragma omp parallel num_threads(threads)
  {
    std::vector<double> sums(inner);  // per thread
#pragma omp for schedule(static)
    for (int64_t a = 0; a < outer; ++a) {
      const float* __restrict__ rows = src + a * length * inner;
      double* __restrict__ sum = sums.data();
      for (int64_t d = 0; d < inner; ++d) sum[d] = 0.0;
      for (int64_t t = 0; t < length; ++t) {
#pragma omp simd
        for (int64_t d = 0; d < inner; ++d) sum[d] += rows[t * inner + d];
      }
      for (int64_t d = 0; d < inner; ++d) dst[a * inner + d] = static_cast<float>(sum[d] / static_cast<double>(length));
    }
  }
  return {out};
}

PD_BUILD_OP(t2p_gather_blocks)
    .Inputs({"X", "Index"})
    .Outputs({"Out"})
    .Attrs({"threads: int"})
    .SetKernelFn(PD_KERNEL(GatherBlocksForward));

PD_BUILD_OP(t2p_axis_mean)
    .Inputs({"X"})
    .Outputs({"Out"})
    .Attrs({"outer: int64_t", "length: int64_t", "threads: int"})
    .SetKernelFn(PD_KERNEL(AxisMeanForward));
