// torch2paddle's CPU kernels for a layer's bias, added in place, float32: a conv's, x[n, c, ...] += bias[c]
// (layers.Conv2D, on its fresh output), and a Linear's, x[..., c] += bias[c] (layers.Linear, on its
// product).  Built and used as paddle_models/native.py says.
//
// Paddle 3.3's in-place add of a [C, 1, 1] tensor to an NCHW map runs its generic broadcast kernel at
// ~1.2 ns per value (15 ms for a [8, 512, 56, 56] conv output; 9% of fcvit_b12's dygraph forward at
// batch 8); this is one vectorised pass per channel's plane.  Its in-place add of a bias along the last
// axis takes ~0.5-0.9 ns per value, single-threaded (a [8, 3136, 384] product: 5.6-10.5 ms; torch 0.7 at two
// threads; crossformer_small's Linears' biases 117 ms of its 700 ms dygraph forward at batch 8, two
// threads); this is one vectorised pass per row.  The sums are the same single float32 additions, bit
// for bit.

#include <cstdint>
#include <vector>

#include "paddle/extension.h"

static void CheckFloat32Cpu(const paddle::Tensor& x, const paddle::Tensor& bias, const char* what) {
  PD_CHECK(x.is_cpu() && bias.is_cpu(), what, ": CPU tensors only");
  PD_CHECK(x.dtype() == paddle::DataType::FLOAT32 && bias.dtype() == paddle::DataType::FLOAT32, what, ": float32 only");
}

void AddChannelBias(paddle::Tensor& x, const paddle::Tensor& bias, int threads) {  // NOLINT: in place, as Paddle's API wants
  CheckFloat32Cpu(x, bias, "t2p_add_channel_bias");
  const auto shape = x.shape();
  PD_CHECK(shape.size() >= 2 && bias.numel() == shape[1], "t2p_add_channel_bias: x [N, C, ...], bias [C]");
  const int64_t batch = shape[0], channels = shape[1];
  const int64_t plane = batch * channels == 0 ? 0 : x.numel() / (batch * channels);
  float* data = x.data<float>();
  const float* biases = bias.data<float>();
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t map = 0; map < batch * channels; ++map) {
    float* __restrict__ values = data + map * plane;
    const float b = biases[map % channels];
#pragma omp simd
    for (int64_t i = 0; i < plane; ++i) values[i] += b;
  }
}

std::vector<std::vector<int64_t>> SameShape(const std::vector<int64_t>& x, const std::vector<int64_t>&) {
  return {x};
}

std::vector<paddle::DataType> SameDtype(const paddle::DataType& x, const paddle::DataType&) { return {x}; }

PD_BUILD_OP(t2p_add_channel_bias)
    .Inputs({"X", "Bias"})
    .Outputs({"Out"})
    .Attrs({"threads: int"})
    .SetInplaceMap({{"X", "Out"}})
    .SetKernelFn(PD_KERNEL(AddChannelBias))
    .SetInferShapeFn(PD_INFER_SHAPE(SameShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(SameDtype));

void AddRowBias(paddle::Tensor& x, const paddle::Tensor& bias, int threads) {  // NOLINT: in place, as Paddle's API wants
  CheckFloat32Cpu(x, bias, "t2p_add_row_bias");
  const auto shape = x.shape();
  PD_CHECK(!shape.empty() && bias.numel() == shape.back(), "t2p_add_row_bias: x [..., C], bias [C]");
  const int64_t width = shape.back(), rows = width == 0 ? 0 : x.numel() / width;
  float* data = x.data<float>();
  const float* __restrict__ biases = bias.data<float>();
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t row = 0; row < rows; ++row) {
    float* __restrict__ values = data + row * width;
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) values[i] += biases[i];
  }
}

PD_BUILD_OP(t2p_add_row_bias)
    .Inputs({"X", "Bias"})
    .Outputs({"Out"})
    .Attrs({"threads: int"})
    .SetInplaceMap({{"X", "Out"}})
    .SetKernelFn(PD_KERNEL(AddRowBias))
    .SetInferShapeFn(PD_INFER_SHAPE(SameShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(SameDtype));
