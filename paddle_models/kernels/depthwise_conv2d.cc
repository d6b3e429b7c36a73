// torch2paddle's CPU kernel for a depthwise 2-D cross-correlation: NCHW float32, one k x k filter per
// channel (odd k), stride 1, zero padding k / 2, optional bias.  Built on first use by
// paddle_models/native.py; used by dygraph forwards that record no gradient (see there for why).
//
// Paddle 3.3's CPU kernel runs a depthwise conv as one tiny im2col + GEMM per channel: 13x slower
// than torch's on [8, 2048, 7, 7] with a 3x3 filter.  Here each channel's map is one flat array and
// every filter tap is one multiply-add of the whole map shifted by (dy * W + dx): a loop the
// compiler vectorises whatever the map's width (7 wide maps included).  A tap's columns that would
// wrap around a row edge are masked out; its rows that would leave the map are not visited.
//
// Summation order: per output, each filter row's taps summed from zero, then the rows' sums in
// order, then the bias (as Paddle's conv followed by its bias add).  Summing by rows first is what
// keeps an 11x11 filter's error small: off a float64 conv on [8, 64, 56, 56], 1.1e-6 at most where
// one running sum over all 121 taps gave 2.6e-6, Paddle's conv 1.7e-6 and the FFT 1.4e-6; it costs
// 10-25% over the running sum.

#include <cstdint>
#include <vector>

#include "paddle/extension.h"

namespace {

// column_masks[kx * H * W + i]: whether tap column kx reaches a column inside the map from output i
std::vector<uint8_t> column_masks(int64_t H, int64_t W, int64_t K) {
  const int64_t pad = K / 2;
  std::vector<uint8_t> masks(K * H * W);
  for (int64_t kx = 0; kx < K; ++kx)
    for (int64_t i = 0; i < H * W; ++i) {
      const int64_t col = i % W + kx - pad;
      masks[kx * H * W + i] = col >= 0 && col < W;
    }
  return masks;
}

// out = in correlated with the k x k filter (+ bias), one channel's H x W map; row_sum: H * W scratch
void correlate_map(const float* __restrict__ in, const float* __restrict__ filter, const float* bias,
                   float* __restrict__ out, int64_t H, int64_t W, int64_t K,
                   const uint8_t* __restrict__ masks, float* __restrict__ row_sum) {
  const int64_t pad = K / 2, HW = H * W;
  for (int64_t i = 0; i < HW; ++i) out[i] = 0.f;
  for (int64_t ky = 0; ky < K; ++ky) {
    const int64_t dy = ky - pad;
    const int64_t first = (dy < 0 ? -dy : 0) * W, last = (dy > 0 ? H - dy : H) * W;
    for (int64_t i = first; i < last; ++i) row_sum[i] = 0.f;
    for (int64_t kx = 0; kx < K; ++kx) {
      const float tap = filter[ky * K + kx];
      const uint8_t* __restrict__ inside = masks + kx * HW;
      const float* __restrict__ shifted = in + dy * W + (kx - pad);
#pragma GCC ivdep
      for (int64_t i = first; i < last; ++i) row_sum[i] += inside[i] ? tap * shifted[i] : 0.f;
    }
    for (int64_t i = first; i < last; ++i) out[i] += row_sum[i];
  }
  if (bias != nullptr) {
    const float b = *bias;
    for (int64_t i = 0; i < HW; ++i) out[i] += b;
  }
}

}  // namespace

std::vector<paddle::Tensor> DepthwiseConv2dForward(const paddle::Tensor& x, const paddle::Tensor& weight,
                                                   const paddle::optional<paddle::Tensor>& bias) {
  PD_CHECK(x.is_cpu() && weight.is_cpu(), "t2p_depthwise_conv2d: CPU tensors only");
  PD_CHECK(x.dtype() == paddle::DataType::FLOAT32 && weight.dtype() == paddle::DataType::FLOAT32,
           "t2p_depthwise_conv2d: float32 only");
  const auto xs = x.shape(), ws = weight.shape();
  PD_CHECK(xs.size() == 4 && ws.size() == 4, "t2p_depthwise_conv2d: NCHW input, [C, 1, k, k] weight");
  const int64_t N = xs[0], C = xs[1], H = xs[2], W = xs[3], K = ws[2];
  PD_CHECK(ws[0] == C && ws[1] == 1 && ws[3] == K && K % 2 == 1,
           "t2p_depthwise_conv2d: weight must be [C, 1, k, k] with odd k");
  PD_CHECK(!bias || (bias->is_cpu() && bias->dtype() == paddle::DataType::FLOAT32 && bias->numel() == C),
           "t2p_depthwise_conv2d: bias must be C float32 values");

  auto out = paddle::empty(xs, paddle::DataType::FLOAT32, paddle::CPUPlace());
  const float* src = x.data<float>();
  const float* filters = weight.data<float>();
  const float* biases = bias ? bias->data<float>() : nullptr;
  float* dst = out.data<float>();
  const std::vector<uint8_t> masks = column_masks(H, W, K);
  std::vector<float> row_sum(H * W);
  for (int64_t map = 0; map < N * C; ++map) {
    const int64_t c = map % C;
    correlate_map(src + map * H * W, filters + c * K * K, biases ? biases + c : nullptr, dst + map * H * W,
                  H, W, K, masks.data(), row_sum.data());
  }
  return {out};
}

PD_BUILD_OP(t2p_depthwise_conv2d)
    .Inputs({"X", "Weight", paddle::Optional("Bias")})
    .Outputs({"Out"})
    .SetKernelFn(PD_KERNEL(DepthwiseConv2dForward));
