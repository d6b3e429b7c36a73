// torch2paddle's CPU kernel for the softmax over the last axis, float32.  Built and used as
// paddle_models/native.py says (layers.softmax: the attention weights of CrossFormer, RegionViT, BiFormer).
//
// Paddle 3.3's CPU softmax runs one thread at ~1 ns per value (crossformer_small's attention: 63 ms of
// its 640 ms dygraph forward at batch 8, two threads; torch's is multi-threaded).  Here each row is
// one task, the rows split among threads: its max, then exp(x - max) in double precision (glibc's
// vector exp, libmvec, under an OpenMP SIMD declaration as gelu.cc's erfc), their sum in double, and
// each quotient in double, rounded once to float.  So every output is within about half an ulp of the
// exact softmax of the float32 inputs, where float32 exponentials and sums are off by a few ulps
// (Paddle's and torch's kernels), and a row's values do not depend on the thread count.  Outputs below
// float32's normal range (a logit ~88 or more below its row's max: CrossFormer's -100 masks) are
// flushed to 0, as gelu.cc's: a subnormal weight would slow the next matmul's multiply-adds ~100x;
// Paddle's softmax instead floors exp(x - max) at exp(-64) ~1.6e-28, torch's writes the subnormals.

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "paddle/extension.h"

#pragma omp declare simd notinbranch
extern "C" double exp(double);

constexpr float kSmallestNormal = 1.17549435e-38f;

static void SoftmaxRows(const float* src, float* dst, int64_t rows, int64_t width, int threads) {
#pragma omp parallel num_threads(threads)
  {
    std::vector<double> exps(width);  // per thread
    double* __restrict__ e = exps.data();
#pragma omp for schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
      const float* __restrict__ v = src + row * width;
      float* __restrict__ out = dst + row * width;
      float top = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : top)
      for (int64_t i = 0; i < width; ++i) top = v[i] > top ? v[i] : top;
      const double shift = top;
      double sum = 0.0;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < width; ++i) {
        e[i] = exp(static_cast<double>(v[i]) - shift);
        sum += e[i];
      }
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) {
        const float q = static_cast<float>(e[i] / sum);
        out[i] = q < kSmallestNormal ? 0.0f : q;
      }
    }
  }
}

std::vector<paddle::Tensor> SoftmaxForward(const paddle::Tensor& x, int threads) {
  PD_CHECK(x.is_cpu() && x.dtype() == paddle::DataType::FLOAT32, "t2p_softmax: float32 CPU tensors only");
  const auto shape = x.shape();
  PD_CHECK(!shape.empty(), "t2p_softmax: a tensor of at least one axis");
  auto out = paddle::empty(shape, paddle::DataType::FLOAT32, paddle::CPUPlace());
  const int64_t width = shape.back();
  if (width > 0) SoftmaxRows(x.data<float>(), out.data<float>(), x.numel() / width, width, threads);
  return {out};
}

PD_BUILD_OP(t2p_softmax)
    .Inputs({"X"})
    .Outputs({"Out"})
    .Attrs({"threads: int"})
    .SetKernelFn(PD_KERNEL(SoftmaxForward));
