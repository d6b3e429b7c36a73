// torch2paddle's CPU kernel for a depthwise 2-D cross-correlation: NCHW float32, one k x k filter per
// channel (odd k), stride 1, zero padding k / 2, optional bias.  Built on first use by
// paddle_models/native.py; used by dygraph forwards that record no gradient (see there for why).
//
// Paddle 3.3's CPU kernel runs a depthwise conv as one tiny im2col + GEMM per channel: 13x slower
// than torch's on [8, 2048, 7, 7] with a 3x3 filter.  Two forms here, chosen by the filter's size:
//
// - Small filters (3x3, 5x5): each channel's map is one flat array and every filter tap is one
//   multiply-add of the whole map shifted by (dy * W + dx), a loop the compiler vectorises whatever
//   the map's width (7 wide maps included).  A tap's columns that would wrap around a row edge are
//   masked out; its rows that would leave the map are not visited.
// - Large filters (7x7 and up; FCViT's 11x11): 16 channels at a time are interleaved into a
//   zero-padded map of 16-float pixels (a channel per vector lane), so that each tap is one
//   multiply-add of aligned vectors -- the tap's 16 weights times a pixel -- for 8 neighbouring
//   outputs at once, their sums in registers.  The flat form loads every shifted map unaligned and
//   keeps its sums in memory, which the many taps of a large filter pay for: on an AVX-512 CPU, 11x11
//   on [8, 64, 56, 56] 11.8 -> 6.1 ms, on [8, 512, 7, 7] 4.2 -> 0.7 ms.  For 3x3 the interleaving
//   costs more than it saves ([8, 512, 28, 28]: 2.9 vs 5.5 ms).
//
// Summation order, both forms: per output, each filter row's taps summed from zero, then the rows'
// sums in order, then the bias (as Paddle's conv followed by its bias add); the interleaved form adds
// each product with one rounding (an FMA), the flat one rounds the product first (its mask select
// stops the contraction).  Summing by rows first is what keeps an 11x11 filter's error small: off a
// float64 conv on [8, 64, 56, 56], 1.1e-6 at most where one running sum over all 121 taps gave
// 2.6e-6, Paddle's conv 1.7e-6 and the FFT 1.4e-6.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "paddle/extension.h"

namespace {

constexpr int64_t kInterleavedFrom = 7;  // filter sizes from which the interleaved form runs
constexpr int64_t kLanes = 16;  // channels per group: one AVX-512 vector (two AVX2 ones)
constexpr int64_t kPixels = 8;  // output pixels of a row summed at once

// A float buffer of n zeros whose start is aligned to 64 bytes (a pixel of 16 floats is then one
// cache line, and no vector load straddles two).
class AlignedFloats {
 public:
  explicit AlignedFloats(int64_t n) : storage_(n + kLanes, 0.f) {
    const auto address = reinterpret_cast<std::uintptr_t>(storage_.data());
    start_ = storage_.data() + (64 - address % 64) % 64 / sizeof(float);
  }
  float* data() { return start_; }
  const float* data() const { return start_; }

 private:
  std::vector<float> storage_;
  float* start_;
};

// One group's buffers: the padded interleaved input (kPixels - 1 more zero columns on the right, read
// by a row's last block past the map; the padding stays zero from one group to the next), the
// interleaved filters and the interleaved output.
struct Scratch {
  Scratch(int64_t H, int64_t W, int64_t K)
      : H(H), W(W), K(K), Wp(W + K - 1 + kPixels - 1), padded((H + K - 1) * Wp * kLanes), taps(K * K * kLanes),
        result(H * W * kLanes) {}
  const int64_t H, W, K, Wp;
  AlignedFloats padded, taps, result;
};

// The sums of ``count`` (<= kPixels) outputs of row y from column x on: per filter row, its taps from
// zero, then the rows in order.
inline void correlate_pixels(const Scratch& s, int64_t y, int64_t x, int64_t count, float* __restrict__ out) {
  float total[kPixels][kLanes];
  for (int64_t ky = 0; ky < s.K; ++ky) {
    float row[kPixels][kLanes] = {};
    const float* __restrict__ line = s.padded.data() + ((y + ky) * s.Wp + x) * kLanes;
    for (int64_t kx = 0; kx < s.K; ++kx) {
      const float* __restrict__ tap = s.taps.data() + (ky * s.K + kx) * kLanes;
      for (int64_t p = 0; p < kPixels; ++p)
#pragma omp simd
        for (int64_t l = 0; l < kLanes; ++l) row[p][l] += tap[l] * line[(p + kx) * kLanes + l];
    }
    for (int64_t p = 0; p < kPixels; ++p)
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l) total[p][l] = ky == 0 ? row[p][l] : total[p][l] + row[p][l];
  }
  for (int64_t p = 0; p < count; ++p)
    for (int64_t l = 0; l < kLanes; ++l) out[p * kLanes + l] = total[p][l];
}

// out = in correlated with each channel's k x k filter (+ bias), for ``channels`` (<= kLanes) maps
void correlate_group(const float* __restrict__ in, const float* __restrict__ filters, const float* bias,
                     float* __restrict__ out, int64_t channels, Scratch& s) {
  const int64_t H = s.H, W = s.W, K = s.K, Wp = s.Wp, pad = K / 2, HW = H * W;
  float* __restrict__ padded = s.padded.data();
  for (int64_t c = 0; c < channels; ++c)
    for (int64_t t = 0; t < K * K; ++t) s.taps.data()[t * kLanes + c] = filters[c * K * K + t];
  for (int64_t c = 0; c < channels; ++c)
    for (int64_t y = 0; y < H; ++y)
      for (int64_t x = 0; x < W; ++x) padded[((y + pad) * Wp + pad + x) * kLanes + c] = in[c * HW + y * W + x];
  for (int64_t y = 0; y < H; ++y)
    for (int64_t x = 0; x < W; x += kPixels)
      correlate_pixels(s, y, x, std::min(kPixels, W - x), s.result.data() + (y * W + x) * kLanes);
  for (int64_t c = 0; c < channels; ++c) {
    const float* __restrict__ result = s.result.data() + c;
    float* __restrict__ map = out + c * HW;
    if (bias != nullptr)
      for (int64_t i = 0; i < HW; ++i) map[i] = result[i * kLanes] + bias[c];
    else
      for (int64_t i = 0; i < HW; ++i) map[i] = result[i * kLanes];
  }
}

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

// The flat form, for small filters: out = in correlated with the k x k filter (+ bias), one channel's
// H x W map, one pass over the map per tap; row_sum: H * W scratch
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
                                                   const paddle::optional<paddle::Tensor>& bias, int threads) {
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
  // Maps (or groups of kLanes channels) are independent: split among the threads, each with its own
  // scratch, every output summed as with one thread.
  if (K < kInterleavedFrom) {
    const std::vector<uint8_t> masks = column_masks(H, W, K);
#pragma omp parallel num_threads(threads)
    {
      std::vector<float> row_sum(H * W);
#pragma omp for schedule(static)
      for (int64_t map = 0; map < N * C; ++map) {
        const int64_t c = map % C;
        correlate_map(src + map * H * W, filters + c * K * K, biases ? biases + c : nullptr, dst + map * H * W,
                      H, W, K, masks.data(), row_sum.data());
      }
    }
    return {out};
  }
  const int64_t groups = (C + kLanes - 1) / kLanes;
#pragma omp parallel num_threads(threads)
  {
    Scratch scratch(H, W, K);
#pragma omp for schedule(static)
    for (int64_t job = 0; job < N * groups; ++job) {
      const int64_t n = job / groups, c = job % groups * kLanes;
      correlate_group(src + (n * C + c) * H * W, filters + c * K * K, biases ? biases + c : nullptr,
                      dst + (n * C + c) * H * W, std::min(kLanes, C - c), scratch);
    }
  }
  return {out};
}

PD_BUILD_OP(t2p_depthwise_conv2d)
    .Inputs({"X", "Weight", paddle::Optional("Bias")})
    .Outputs({"Out"})
    .Attrs({"threads: int"})
    .SetKernelFn(PD_KERNEL(DepthwiseConv2dForward));
